"""Run a launcher command and watch its ranks: echo rank 0's log, stop the whole job when a rank fails or
when no rank has written anything for too long, and surface the failed rank's error (the tail of its log).

DeepSpeed's per-node launcher already stops its node when one of its ranks exits non-zero; across nodes the
others would sit in a collective until the process-group timeout. The supervisor reads the exit records that
`ondol.launch.rank` writes (shared run directory), so any rank's failure stops every node within
`failure_grace_s`, and a job that hangs without failing is stopped by the watchdog.

Signals (TERM, INT, HUP, USR1, USR2) to the supervisor are a request to stop: it writes the run's stop file,
every rank saves at the end of its step and exits with 75, and the supervisor exits with 75 too. A second
signal stops the whole job at once (SIGTERM to the launcher's process group, SIGKILL after 10 s), leaving no
process behind.

The launcher's own output (DeepSpeed's runner: its INFO/WARNING lines, "Setting CUDA_VISIBLE_DEVICES=..." even
on CPU, pdsh and ssh messages) goes to LOG_DIR/launcher.log, and its last lines are shown when the launcher
fails before any rank recorded an exit; ONDOL_DEBUG=1 leaves it on the console.

`python -m ondol.launch.supervise --log-dir DIR [--stop-file F] [--watchdog-minutes M] -- COMMAND...` is what the
sbatch script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ondol.errors import USER_ERROR_EXITS, debug_env
from ondol.train.preemption import PREEMPTED_EXIT, SignalScope

TAIL_LINES = 20
LAUNCHER_LOG = "launcher.log"
POLL_S = 0.5


@dataclass
class RankFailure:
    rank: int
    host: str
    exit_code: int
    time: float


@dataclass
class _Logs:
    """Growth of every rank{N}.log in the log directory since the launch started."""

    log_dir: Path
    start_sizes: dict[Path, int] = field(default_factory=dict)
    sizes: dict[Path, int] = field(default_factory=dict)
    echo_offset: int = -1

    def __post_init__(self) -> None:
        self.start_sizes = {p: p.stat().st_size for p in self.log_dir.glob("rank*.log")}
        self.sizes = dict(self.start_sizes)

    def grew(self) -> bool:
        grew = False
        for p in self.log_dir.glob("rank*.log"):
            size = p.stat().st_size
            if size != self.sizes.get(p):
                self.sizes[p], grew = size, True
        return grew

    def new_text(self, path: Path, since: int | None = None) -> str:
        """What `path` gained since the launch started (or since byte `since`)."""
        start = self.start_sizes.get(path, 0) if since is None else since
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def echo(self, out: TextIO, rank: int = 0) -> None:
        path = self.log_dir / f"rank{rank}.log"
        if self.echo_offset < 0:
            self.echo_offset = self.start_sizes.get(path, 0)
        text = self.new_text(path, self.echo_offset)
        complete = text.rfind("\n") + 1  # whole lines only
        if complete:
            out.write(text[:complete])
            out.flush()
            self.echo_offset += len(text[:complete].encode("utf-8"))


def clear_exit_records(log_dir: Path) -> None:
    """Exit records of a previous launch would read as failures of this one."""
    for record in log_dir.glob("rank*.exit"):
        record.unlink(missing_ok=True)


def rank_failures(log_dir: Path) -> list[RankFailure]:
    """Ranks that recorded a non-zero exit other than a stop on request, first failure first."""
    failures = []
    for record in log_dir.glob("rank*.exit"):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # being written right now; read again on the next poll
        if info.get("exit_code") not in (0, PREEMPTED_EXIT, None):
            failures.append(RankFailure(info["rank"], info.get("host", "?"), info["exit_code"], info["time"]))
    return sorted(failures, key=lambda f: f.time)


def stopped_ranks(log_dir: Path) -> int:
    """How many ranks recorded that they saved and stopped on request."""
    count = 0
    for record in log_dir.glob("rank*.exit"):
        try:
            count += json.loads(record.read_text()).get("exit_code") == PREEMPTED_EXIT
        except (OSError, ValueError):
            continue
    return count


class _StopSignals(SignalScope):
    """While supervising: the first signal writes the stop file, a second asks for an immediate stop."""

    def __init__(self, stop_path: Path | None, out: TextIO) -> None:
        self.signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
        self.stop_path, self.out = stop_path, out
        self.received: list[str] = []

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:
            return
        if self.stop_path is None:
            print(f"ondol launch: received {name}: stopping the job", file=self.out, flush=True)
            return
        self.stop_path.parent.mkdir(parents=True, exist_ok=True)
        self.stop_path.touch()
        print(f"ondol launch: received {name}: every rank saves a checkpoint at the end of its step and stops "
              "(signal again to stop at once)", file=self.out, flush=True)

    @property
    def now(self) -> bool:
        """Stop the job without waiting for the ranks: a second signal, or any when there is no stop file."""
        return len(self.received) > (0 if self.stop_path is None else 1)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's process group (it forwards to remote nodes), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines()[-n:])


def supervise(cmd: list[str], log_dir: str | os.PathLike, *, env: dict[str, str] | None = None,
              watchdog_minutes: float = 30.0, failure_grace_s: float = 15.0, echo_rank: int | None = 0,
              stop_path: str | os.PathLike | None = None, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """Run `cmd` (a launcher that starts `ondol.launch.rank` processes) to completion or failure; the exit code.
    `stop_path`: the stop file the ranks watch (train/preemption.py), written on the first signal."""
    out, err = out or sys.stdout, err or sys.stderr
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    clear_exit_records(log_dir)
    stop_path = Path(stop_path) if stop_path else None
    if stop_path is not None:
        stop_path.unlink(missing_ok=True)  # a request left by an earlier job is not one for this job
    with _StopSignals(stop_path, out) as signals:
        return _supervise(cmd, log_dir, env, watchdog_minutes, failure_grace_s, echo_rank, signals, out, err)


def _supervise(cmd: list[str], log_dir: Path, env: dict[str, str] | None, watchdog_minutes: float,
               failure_grace_s: float, echo_rank: int | None, signals: _StopSignals, out: TextIO,
               err: TextIO) -> int:
    logs = _Logs(log_dir)
    started = last_growth = time.monotonic()
    failing_since: float | None = None
    reason = None
    launcher_log = log_dir / LAUNCHER_LOG
    print(f"ondol launch: {shlex.join(cmd)}\n  rank logs: {log_dir}/rank*.log (rank 0 follows)"
          + ("" if debug_env() else f"; the launcher's own output: {launcher_log}"), file=out, flush=True)
    with open(launcher_log, "ab") as launcher_out:
        launcher_start = launcher_out.tell()
        output = {} if debug_env() else {"stdout": launcher_out, "stderr": subprocess.STDOUT}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, **output)
    try:
        while (code := proc.poll()) is None:
            time.sleep(POLL_S)
            now = time.monotonic()
            if logs.grew():
                last_growth = now
            if echo_rank is not None:
                logs.echo(out, echo_rank)
            if failing_since is None and rank_failures(log_dir):
                failing_since = now
            if signals.now:
                reason = f"stopped at once on a second signal ({', '.join(signals.received)})"
            elif failing_since is not None and now - failing_since > failure_grace_s:
                reason = f"a rank failed and the job was still running {failure_grace_s:.0f} s later: stopped it"
            elif watchdog_minutes and now - last_growth > watchdog_minutes * 60:
                reason = (f"watchdog: no rank log in {log_dir} grew for {watchdog_minutes:g} min "
                          f"(launch.watchdog_minutes): stopped the job as hung")
            if reason:
                _stop(proc)
                code = proc.returncode if proc.returncode else 1
                break
    finally:
        if proc.poll() is None:  # an exception in this loop: leave nothing running
            _stop(proc)
    if echo_rank is not None:
        logs.echo(out, echo_rank)
    elapsed = time.monotonic() - started
    failures = rank_failures(log_dir)
    if code == 0 and not failures:
        print(f"ondol launch: all ranks finished in {elapsed:.0f} s (logs in {log_dir})", file=out, flush=True)
        return 0
    if not failures and not reason and stopped_ranks(log_dir):
        print(f"ondol launch: stopped on request after {elapsed:.0f} s; every rank saved its checkpoint: run the same "
              f"command to resume (exit {PREEMPTED_EXIT})", file=out, flush=True)
        return PREEMPTED_EXIT
    code = code if code and code > 0 else 1  # killed by a signal (negative) or failed ranks under a clean exit
    if reason:
        print(f"ondol launch: {reason}", file=err)
    if failures:
        first = failures[0]
        log = log_dir / f"rank{first.rank}.log"
        text = logs.new_text(log)
        others = [str(f.rank) for f in failures[1:]]
        also = f" (also failed: ranks {', '.join(others)})" if others else ""
        print(f"ondol launch: rank {first.rank} on {first.host} failed with exit code {first.exit_code}{also}: "
              f"{_last_line(text)}", file=err)
        if first.exit_code in USER_ERROR_EXITS:  # the rank's one-line error says it all (ondol/errors.py)
            print(f"  rank log: {log}", file=err)
            err.flush()
            return first.exit_code
        print(f"  last lines of {log}:\n{_tail(text)}", file=err)
    else:
        if not reason:
            print(f"ondol launch: launcher exited with code {code} after {elapsed:.0f} s and no rank recorded an "
                  f"exit (killed by a signal, out of memory, or never started?); see {log_dir}", file=err)
        for log in [launcher_log, *sorted(log_dir.glob("rank*.log"))]:
            text = logs.new_text(log, launcher_start if log == launcher_log else None)
            if text:
                print(f"  last lines of {log}:\n{_tail(text, 5)}", file=err)
    err.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ondol.launch.supervise", description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", required=True, help="the run's logs/ folder (rank*.log, rank*.exit)")
    parser.add_argument("--watchdog-minutes", type=float, default=30.0, help="stop after this long without output")
    parser.add_argument("--failure-grace-s", type=float, default=15.0, help="wait after a rank fails, then stop")
    parser.add_argument("--stop-file", help="the run's stop file (RUN_DIR/launch/stop), written on a signal")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...: the launcher to run")
    ns = parser.parse_args(argv)
    cmd = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not cmd:
        parser.error("give the command to run after --")
    return supervise(cmd, ns.log_dir, watchdog_minutes=ns.watchdog_minutes, failure_grace_s=ns.failure_grace_s,
                     stop_path=ns.stop_file)


if __name__ == "__main__":
    sys.exit(main())
