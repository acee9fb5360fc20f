"""Stopping on request without losing work: a signal (SIGTERM from Slurm or a launcher, SIGUSR1 that Slurm
sends before a time limit, SIGINT from Ctrl-C; `train.stop_signals`) or the stop file that `ondol launch`'s
supervisor writes when it is signalled itself.

The trainer asks `StopRequest.agreed()` after every optimizer step; the ranks agree with one all-reduce, so
they all stop after the same step, save a complete checkpoint and exit with PREEMPTED_EXIT. Running the same
command again (or Slurm's requeue) resumes from that checkpoint. A second signal exits at once; the same
signal relayed by a launcher within REPEAT_WINDOW_S counts as one. Light to import (torch only when used):
the supervisor on a Slurm batch host shares the exit code and the stop file's place.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request after saving a checkpoint; run again to continue
REPEAT_WINDOW_S = 2.0


def stop_file(run_dir: str | os.PathLike) -> Path:
    """The file whose existence asks every rank of the run to save and stop (written by the supervisor)."""
    return Path(run_dir).resolve() / "launch" / "stop"


class Preempted(Exception):
    """Training stopped on request after saving the checkpoint of `step`."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"stopped on request ({reason}) after step {step}; its checkpoint is saved: run the same "
                         "command again to continue")
        self.step = step


class SignalScope:
    """`self._handle` handles `self.signals` inside a `with` block (installed from the main thread only;
    elsewhere signal.signal is not allowed), and the previous handlers come back after it."""

    signals: list[signal.Signals]
    previous: dict[signal.Signals, object]

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        raise NotImplementedError


class StopRequest(SignalScope):
    """Signal handlers plus the stop file (the only way to ask outside the main thread), within a `with` block."""

    def __init__(self, signals: list[str], stop_path: Path, device, world_size: int) -> None:
        self.signals = [signal.Signals[f"SIG{name}" if not name.startswith("SIG") else name] for name in signals]
        self.stop_path = stop_path
        self.device, self.world_size = device, world_size
        self.reason: str | None = None
        self.first_at = 0.0
        self.saved = False  # once the stop checkpoint is written, a further signal just ends the exit path

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason, self.first_at = name, time.monotonic()
            print(f"received {name}: finishing this optimizer step, saving a checkpoint, then exiting "
                  f"(signal again to stop at once)", file=sys.stderr, flush=True)
            return
        if self.reason == name and time.monotonic() - self.first_at < REPEAT_WINDOW_S:
            return  # the same request relayed by a launcher
        if self.saved:
            raise SystemExit(PREEMPTED_EXIT)
        print(f"received {name} again: exiting now without saving", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def local(self) -> bool:
        if self.reason is None and self.stop_path.exists():
            self.reason = f"stop file {self.stop_path}"
        return self.reason is not None

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was asked to stop."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return self.local()
        flag = torch.tensor([1.0 if self.local() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.reason is None:
            self.reason = "another rank"
        return flag.item() > 0
