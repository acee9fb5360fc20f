"""User-facing errors: one class per package, each printed as one line with its own exit code.

Every `ondol` command (and each rank of a launch) runs through `reported()`: an `OndolError` prints
`PROG: KIND error: MESSAGE` (the message names the file, line or key and what to do) and exits with its class's
code; anything else is a bug or an OS error, printed as one line too. The traceback is printed only with
`--debug` or ONDOL_DEBUG=1.

Signals, outside training (which saves a checkpoint first: train/preemption.py): SIGINT (Ctrl-C) and SIGTERM
end the command cleanly (its worker processes stopped, its temporary files removed, finished work kept) with
one line and exit 130 or 143; a second signal while it cleans up stops it at once (its workers killed too).

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
  143  stopped by SIGTERM outside training
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
TERMINATED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a command stopped by kill or a scheduler
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_GRACE_S = 5.0  # how long a terminated worker may take before it is killed
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


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that `finally` blocks and
    `except BaseException` clean-ups run (a BaseException: `except Exception` does not swallow it)."""


def ignore_interrupts() -> None:
    """In a worker process: leave Ctrl-C to the parent, which stops the workers and reports it once (a worker
    that got SIGINT itself would print a traceback of its own); SIGTERM, which the parent sends to stop it,
    ends it at once, even inside C++ or Rust code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _workers() -> list:
    """The multiprocessing children of this process (none unless something here imported multiprocessing: this
    module is imported by every command, which should not pay for it)."""
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing.active_children() if multiprocessing is not None else []


def stop_children() -> None:
    """Terminate the worker processes this process started (multiprocessing's, pools' included) and wait for
    them; one still alive after CHILD_GRACE_S is killed."""
    children = _workers()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + CHILD_GRACE_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


class _StopSignals:
    """While a command runs: the first SIGINT or SIGTERM raises KeyboardInterrupt or Terminated in the main
    thread; a second one, while the command cleans up, kills its workers and exits at once. A process forked
    from this one that kept the handler ends as the signal's default would end it."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.received: str | None = None

    def __call__(self, signum: int, frame) -> None:
        if os.getpid() != self.owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"received {name} after {self.received}: stopping at once; a run of the same command redoes "
                  "what was not finished", file=sys.stderr, flush=True)
            for child in _workers():
                child.kill()
            os._exit(128 + signum)
        self.received = name
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopSignals | None]:
    """_StopSignals handles STOP_SIGNALS inside the block (from the main thread only: elsewhere Python cannot
    install handlers), and the previous handlers come back after it. An ignored SIGINT (a command started in
    the background by a shell) stays ignored."""
    previous, handler = {}, None
    if threading.current_thread() is threading.main_thread():
        handler = _StopSignals()
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        with _stop_signals() as signals:  # still handled while the error is reported: a second one stops at once
            return _run(call, prog, debug, signals)
    finally:
        if saved is None:
            os.environ.pop("ONDOL_DEBUG", None)
        else:
            os.environ["ONDOL_DEBUG"] = saved


def _run(call: Callable[[], int | None], prog: str, debug: bool, signals: _StopSignals | None) -> int:
    try:
        return int(call() or 0)
    except (KeyboardInterrupt, Terminated) as e:
        return _stopped(prog, debug, isinstance(e, KeyboardInterrupt))
    except OndolError as e:
        if signals is not None and signals.received is not None:
            return _stopped(prog, debug, signals.received == "SIGINT")
        if debug:
            traceback.print_exc()
        print(f"{prog}: {e.kind}: {_first_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - every other failure is still one line unless --debug
        if signals is not None and signals.received is not None:  # the signal's exception, which a library
            return _stopped(prog, debug, signals.received == "SIGINT")  # turned into its own (safetensors)
        if debug:
            traceback.print_exc()
            return 1
        what = "error" if isinstance(e, OSError) else f"unexpected {type(e).__name__}"
        print(f"{prog}: {what}: {_first_line(e)} (run with --debug or ONDOL_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 1


def _stopped(prog: str, debug: bool, interrupted: bool) -> int:
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM: its workers stopped, one line, 130 or 143."""
    stop_children()
    if debug:
        traceback.print_exc()
    how, code = ("interrupted (Ctrl-C)", INTERRUPTED_EXIT) if interrupted else ("stopped by SIGTERM", TERMINATED_EXIT)
    print(f"{prog}: {how}; finished work is kept, run the same command to continue", file=sys.stderr, flush=True)
    return code


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
