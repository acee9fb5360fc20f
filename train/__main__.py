"""Per-rank entry used by launchers: `python -m ondol.train CONFIG [overrides]` (same as `ondol train`).

Errors are the same one line as `ondol train` prints (exit codes in ondol/errors.py), so the launch supervisor
shows the failing rank's line once instead of a traceback per rank."""

import argparse
import sys

from ondol.configs import add_config_args, parse_config_args
from ondol.errors import debug_requested, exit_process, reported
from ondol.train.cli import train_command
from ondol.train.deepspeed_log import drop_import_noise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ondol.train", description="Train one rank (see `ondol train`).")
    add_config_args(parser)
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    drop_import_noise(debug)
    args = parse_config_args(parser, argv)
    return reported(lambda: train_command(args), "python -m ondol.train", debug)


if __name__ == "__main__":
    exit_process(main())
