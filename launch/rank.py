"""Per-rank entry the launchers start: `python -m ondol.launch.rank --spec=SPEC`.

SPEC (base64url JSON, see launch/launcher.py) holds the log directory, MODULE and its ARGS, and for MPI runners
the master address and port. Runs MODULE exactly like `python -m MODULE ARGS` (the trainer:
`python -m ondol.train RUN_DIR/launch/config.<hash>.yaml`) after making every runner look the same to it:
- MPI runners (OpenMPI, MVAPICH) set their own rank variables, not torch's RANK/WORLD_SIZE/LOCAL_RANK;
- the rank's stdout and stderr go to DIR/rank{RANK}.log (appended, one header per start);
- its exit code goes to DIR/rank{RANK}.exit, so the supervisor can tell the rank that failed first from the
  ranks that were stopped because of it;
- the variables of `launch.env_file` (secrets such as WANDB_API_KEY) are read from that file on the rank's own
  node, so their values are never part of a command line.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import runpy
import socket
import sys
import time
import traceback
from pathlib import Path

from ondol.errors import exit_process
from ondol.launch.config import read_env_file
from ondol.launch.launcher import SPEC_PREFIX, decode_spec

# (rank, world size, local rank) variables of the MPI implementations DeepSpeed's runners can use.
MPI_RANK_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def torch_rank_env(environ: dict[str, str], master_addr: str | None, master_port: int | None) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables to set. An MPI runner's rank variables and the master
    the launcher chose win over any inherited from the submitting shell (a stale RANK=0 there would make every
    rank rank 0); without them, the runner's own RANK stands."""
    added: dict[str, str] = {}
    for rank, size, local in MPI_RANK_VARS:
        if rank in environ and size in environ:
            added.update(RANK=environ[rank], WORLD_SIZE=environ[size], LOCAL_RANK=environ.get(local, "0"))
            break
    if master_addr:
        added["MASTER_ADDR"] = master_addr
    if master_port:
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
    parser.add_argument(SPEC_PREFIX.removesuffix("="), dest="spec", required=True,
                        help="base64url JSON: log_dir, module, args, env_file, master_addr, master_port")
    spec = decode_spec(parser.parse_args(argv).spec)
    os.environ.update(torch_rank_env(dict(os.environ), spec.get("master_addr"), spec.get("master_port")))
    rank = int(os.environ.get("RANK", "0"))
    log_dir = Path(spec["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    log, exit_record = log_paths(log_dir, rank)
    exit_record.unlink(missing_ok=True)
    _redirect_output(log)
    faulthandler.enable()  # a rank killed by SIGABRT/SIGSEGV leaves every thread's Python stack in its log
    host = socket.gethostname()
    module, args = spec["module"], spec["args"]
    print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}/{os.environ.get('WORLD_SIZE', '1')} on {host} "
          f"(pid {os.getpid()}): python -m {module} {' '.join(args)}", flush=True)
    try:
        if spec.get("env_file"):
            os.environ.update(read_env_file(spec["env_file"]))
        code = _run_module(module, args)
    except ValueError as e:  # the env file is unreadable or malformed
        print(f"ondol.launch.rank: {e}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    exit_record.write_text(json.dumps({"rank": rank, "host": host, "exit_code": code, "time": time.time()}))
    return code


if __name__ == "__main__":
    exit_process(main())
