"""The `ondol` command: a thin shell over each package's API; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import sys

from ondol.configs import parse_config_args
from ondol.errors import debug_requested, exit_process, reported


def build_parser() -> argparse.ArgumentParser:
    from ondol.data.cli import register as register_data
    from ondol.launch.launcher_cli import register as register_launch
    from ondol.launch.pipeline import register as register_run
    from ondol.launch.plan_cli import register as register_plan
    from ondol.model.cli import register as register_model
    from ondol.tokenizer.cli import register as register_tokenizer
    from ondol.train.cli import register as register_train

    parser = argparse.ArgumentParser(
        prog="ondol",
        description="Korean-first foundation-model training: tokenizer -> data -> model -> train -> export.",
        epilog="Errors are one line; add --debug (anywhere) or set ONDOL_DEBUG=1 for the traceback. Exit codes: "
        "2 config, 3 data, 4 tokenizer, 5 model, 6 train, 7 launch, 75 stopped after saving, 130 Ctrl-C, "
        "143 SIGTERM, 1 anything else.",
    )
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_run, register_tokenizer, register_data, register_train, register_launch,
                     register_plan, register_model):
        register(sub)
    return parser


def version() -> str:
    """Ondol's installed version and the torch and DeepSpeed it runs on (from package metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ondol {of('ondol')} (torch {of('torch')}, deepspeed {of('deepspeed')}, Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr with the exit codes listed in ondol/errors.py."""
    from ondol.train.deepspeed_log import drop_import_noise

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    drop_import_noise(debug)
    args = parse_config_args(build_parser(), argv)
    return reported(lambda: args.func(args), "ondol", debug)


def run() -> None:
    """The `ondol` program (pyproject's console script)."""
    exit_process(main())


if __name__ == "__main__":
    run()
