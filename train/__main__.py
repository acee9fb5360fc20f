"""Per-rank entry used by launchers: `python -m ondol.train CONFIG [overrides]` (same as `ondol train`)."""

import argparse
import sys

from ondol.configs import ConfigError, add_config_args
from ondol.train.cli import train_command
from ondol.train.deepspeed_log import drop_import_noise


def main(argv: list[str] | None = None) -> int:
    drop_import_noise()
    parser = argparse.ArgumentParser(prog="python -m ondol.train", description="Train one rank (see `ondol train`).")
    add_config_args(parser)
    try:
        return train_command(parser.parse_args(argv))
    except ConfigError as e:
        print(f"python -m ondol.train: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
