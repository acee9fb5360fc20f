"""User-facing errors: one class per package, each printed as one line with its own exit code.

Every `ondol` command (and each rank of a launch) runs through `reported()`: an `OndolError` prints
`PROG: KIND error: MESSAGE` (the message names the file, line or key and what to do) and exits with its class's
code; Ctrl-C prints one line and exits 130; anything else is a bug or an OS error, printed as one line too.
The traceback is printed only with `--debug` or ONDOL_DEBUG=1.

Exit codes:
  0    success
  1    any other error: a file the OS refused, or a bug (run with --debug and report it)
  2    ConfigError: the config file, an override or a command-line argument
  3    DataError: a source, prepared shards or their manifest
  4    TokenizerError: training or loading the tokenizer
  5    ModelError: model weights, their config, or an export
  6    TrainError: a checkpoint that cannot continue this run, nothing left to train, non-finite training
  7    LaunchError: pre-flight checks, hostfile, job submission
  75   training stopped on request after saving a checkpoint (train/preemption.py): run again to continue
  130  interrupted by Ctrl-C (SIGINT) outside training
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
DEBUG_FLAG = "--debug"


class OndolError(Exception):
    """A mistake the user can fix; the message is one line naming the file, line or key and what to do."""

    exit_code = 1
    kind = "error"


class ConfigError(OndolError, ValueError):
    """The config file, an override or a command-line argument."""

    exit_code, kind = 2, "config error"


class DataError(OndolError, ValueError):
    """A data source, prepared shards or their manifest."""

    exit_code, kind = 3, "data error"


class TokenizerError(OndolError, RuntimeError):
    """Training or loading the tokenizer."""

    exit_code, kind = 4, "tokenizer error"


class ModelError(OndolError, ValueError):
    """Model weights, their config, or an export."""

    exit_code, kind = 5, "model error"


class TrainError(OndolError, RuntimeError):
    """A checkpoint that cannot continue the run, nothing to train, non-finite steps."""

    exit_code, kind = 6, "train error"


class LaunchError(OndolError, ValueError):
    """Pre-flight checks, the hostfile, job submission."""

    exit_code, kind = 7, "launch error"


USER_ERROR_EXITS = frozenset({2, 3, 4, 5, 6, 7})  # a rank exiting with one of these printed its one-line cause


def ignore_interrupts() -> None:
    """In a worker process: leave Ctrl-C to the parent, which stops the workers and reports it once (a worker
    that got SIGINT itself would print a traceback of its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def debug_env() -> bool:
    """ONDOL_DEBUG=1: tracebacks and every library's own console output are shown."""
    return os.environ.get("ONDOL_DEBUG", "") not in ("", "0")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether to show tracebacks, argv without --debug): the flag anywhere on the line, or ONDOL_DEBUG=1."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return len(rest) != len(argv) or debug_env(), rest


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def reported(call: Callable[[], int | None], prog: str, debug: bool) -> int:
    """Run a command; its exit code, with any error printed as one line on stderr (plus the traceback when
    `debug`). While it runs, `debug` is ONDOL_DEBUG=1, so the ranks and workers it starts follow it."""
    saved = os.environ.get("ONDOL_DEBUG")
    if debug:
        os.environ["ONDOL_DEBUG"] = "1"
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted (Ctrl-C); finished work is kept, run the same command to continue",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    except OndolError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {e.kind}: {_first_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - every other failure is still one line unless --debug
        if debug:
            traceback.print_exc()
            return 1
        what = "error" if isinstance(e, OSError) else f"unexpected {type(e).__name__}"
        print(f"{prog}: {what}: {_first_line(e)} (run with --debug or ONDOL_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if saved is None:
            os.environ.pop("ONDOL_DEBUG", None)
        else:
            os.environ["ONDOL_DEBUG"] = saved


_exit_code: list[int] = []  # the code exit_process was last given; read by _leave_after_training at exit


def exit_process(code: int) -> None:
    """End this program with `code` (raises SystemExit, so a caller such as the per-rank wrapper that runs a
    module in-process still gets control back). If DeepSpeed was imported (the process trained), the interpreter's
    own teardown is skipped: after stdio and logging are flushed the process leaves with os._exit. torch's gloo
    worker threads destroyed during that teardown can abort (SIGABRT, "terminate called without an active
    exception") a rank that finished and saved, and a launcher then kills the other ranks and reports a failure."""
    if not _exit_code:
        import atexit

        atexit.register(_leave_after_training)  # registered last, so it runs before other exit handlers
    _exit_code[:] = [int(code)]
    sys.exit(code)


def _leave_after_training() -> None:
    if "deepspeed" not in sys.modules:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code[0])
