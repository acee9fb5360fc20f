"""Per-rank entry the launchers start: `python -m ondol.launch.rank --log-dir DIR [...] -- MODULE ARGS...`.

Runs MODULE exactly like `python -m MODULE ARGS` (the trainer: `python -m ondol.train CONFIG overrides`) after
making every runner look the same to it:
- MPI runners (OpenMPI, MVAPICH) set their own rank variables, not torch's RANK/WORLD_SIZE/LOCAL_RANK;
- the rank's stdout and stderr go to DIR/rank{RANK}.log (appended, one header per start);
- its exit code goes to DIR/rank{RANK}.exit, so the supervisor can tell the rank that failed first from the
  ranks that were stopped because of it.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import socket
import sys
import time
import traceback
from pathlib import Path

# (rank, world size, local rank) variables of the MPI implementations DeepSpeed's runners can use.
MPI_RANK_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def torch_rank_env(environ: dict[str, str], master_addr: str | None, master_port: int | None) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables to add, taken from an MPI runner's when absent."""
    added: dict[str, str] = {}
    if "RANK" not in environ:
        for rank, size, local in MPI_RANK_VARS:
            if rank in environ and size in environ:
                added.update(RANK=environ[rank], WORLD_SIZE=environ[size], LOCAL_RANK=environ.get(local, "0"))
                break
    if master_addr and "MASTER_ADDR" not in environ:
        added["MASTER_ADDR"] = master_addr
    if master_port and "MASTER_PORT" not in environ:
        added["MASTER_PORT"] = str(master_port)
    return added


def log_paths(log_dir: Path, rank: int) -> tuple[Path, Path]:
    """(log, exit record) of one rank."""
    return log_dir / f"rank{rank}.log", log_dir / f"rank{rank}.exit"


def _redirect_output(log: Path) -> None:
    """Point this process's fd 1 and 2 (and so any child's) at the rank's log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_module(module: str, args: list[str]) -> int:
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the traceback is the rank's error report; the launcher surfaces it
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ondol.launch.rank", description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", required=True, help="where rank{RANK}.log and rank{RANK}.exit go")
    parser.add_argument("--master-addr", help="MASTER_ADDR when the runner does not set it (MPI runners)")
    parser.add_argument("--master-port", type=int, help="MASTER_PORT when the runner does not set it")
    parser.add_argument("module", help="module run as `python -m MODULE`, e.g. ondol.train")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    os.environ.update(torch_rank_env(dict(os.environ), ns.master_addr, ns.master_port))
    rank = int(os.environ.get("RANK", "0"))
    log_dir = Path(ns.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log, exit_record = log_paths(log_dir, rank)
    exit_record.unlink(missing_ok=True)
    _redirect_output(log)
    host = socket.gethostname()
    print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}/{os.environ.get('WORLD_SIZE', '1')} on {host} "
          f"(pid {os.getpid()}): python -m {ns.module} {' '.join(args)}", flush=True)
    code = _run_module(ns.module, args)
    sys.stdout.flush()
    sys.stderr.flush()
    exit_record.write_text(json.dumps({"rank": rank, "host": host, "exit_code": code, "time": time.time()}))
    return code


if __name__ == "__main__":
    sys.exit(main())
