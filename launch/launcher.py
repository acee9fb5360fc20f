"""The DeepSpeed launcher command for one machine or a hostfile cluster, and running it under supervision.

Every rank runs `python -m ondol.launch.rank --spec SPEC`, i.e. `python -m ondol.train RUN_DIR/launch/config.<hash>.yaml`
with the same rank environment and per-rank log (RUN_DIR/logs/rank{N}.log) whatever the runner. No value from
the config or the command line becomes a word of a shell command: the overrides are inside the resolved config
file the pre-flight checked (named by its content, so a queued job runs exactly that config), and the paths
reach the rank inside SPEC, base64url-encoded JSON made of letters, digits, '-', '_' and '=', which every
runner's remote shell (pdsh joins the command into one line and quotes only arguments with spaces) passes as
it is. Every value of the command and the spec is checked first (launch/script_values.py: no control
characters). Runners:
- local: `deepspeed --num_gpus N` on this machine (N gloo workers on CPU);
- pdsh / openmpi / mvapich: `deepspeed --hostfile RUN_DIR/launch/hostfile --launcher X`, the hostfile being the
  first `launch.nodes` hosts of `launch.hostfile` with `launch.gpus_per_node` slots each.
Slurm's sbatch script (launch/slurm.py) starts the same per-node command with srun.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ondol.configs import RunConfig, to_yaml
from ondol.files import write_atomic
from ondol.launch.preflight import Layout
from ondol.launch.script_values import option_words, script_value

DEFAULT_MODULE = "ondol.train"
SPEC_PREFIX = "--spec="


@dataclass
class LaunchPlan:
    """What a launch does: files it writes, variables it adds, the command it runs."""

    layout: Layout
    log_dir: Path
    command: list[str]
    files: dict[Path, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Every generated file, variable and the command, as `--dry-run` prints them (the rank spec decoded)."""
        parts = []
        for path, text in self.files.items():
            parts.append(f"# file {path}\n{text.rstrip()}\n# end of {path}")
        parts += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        parts.append(f"# each rank: {json.dumps(self.rank_spec)}")
        parts.append(shlex.join(self.command))
        return "\n".join(parts)

    @property
    def rank_spec(self) -> dict:
        """What every rank runs, decoded from the --spec word of the command or of the sbatch script."""
        text = " ".join([*self.command, *self.files.values()])
        return decode_spec(re.search(SPEC_PREFIX + r"([A-Za-z0-9_=-]+)", text).group(1))


def run_path(cfg: RunConfig) -> Path:
    """RUN_DIR as an absolute path, checked first: the launch writes paths under it into scripts and commands."""
    return Path(script_value("run_dir", cfg.run_dir)).resolve()


def log_dir(cfg: RunConfig) -> Path:
    return run_path(cfg) / "logs"


def launch_dir(cfg: RunConfig) -> Path:
    """Where generated launch files (hostfile, sbatch script) go."""
    return run_path(cfg) / "launch"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> str:
    """The `deepspeed` runner of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else (shutil.which("deepspeed") or "deepspeed")
    return script_value("the Python environment's deepspeed", found)


def encode_spec(spec: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(spec, sort_keys=True).encode("utf-8")).decode("ascii")


def decode_spec(text: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(text.encode("ascii")).decode("utf-8"))


def resolved_config(cfg: RunConfig) -> tuple[Path, str]:
    """(path, text) of the config every rank reads: the checked config with its overrides applied, named by
    its content so that a later launch into the same run directory cannot change what a queued job runs."""
    text = to_yaml(cfg)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return launch_dir(cfg) / f"config.{digest}.yaml", text


def rank_args(cfg: RunConfig, config_file: Path, module: str, master: tuple[str, int] | None = None) -> list[str]:
    """`--module --no_local_rank ondol.launch.rank --spec=SPEC`: the tail of every DeepSpeed runner command.

    `master` is passed on for MPI runners, which start ranks directly and set no MASTER_ADDR/MASTER_PORT."""
    env_file = None
    if cfg.launch.env_file:  # checked before and after resolving: a symlink may lead elsewhere
        env_file = script_value("launch.env_file", Path(script_value("launch.env_file", cfg.launch.env_file))
                                .expanduser().resolve())
    spec = {"log_dir": script_value("run_dir", log_dir(cfg)), "module": script_value("--module", module),
            "args": [script_value("run_dir", config_file)], "env_file": env_file}
    if master:
        spec.update(master_addr=master[0], master_port=master[1])
    return ["--module", "--no_local_rank", "ondol.launch.rank", SPEC_PREFIX + encode_spec(spec)]


def hostfile_text(layout: Layout) -> str:
    return "".join(f"{host} slots={layout.gpus_per_node}\n" for host in layout.hosts)


def plan_launch(cfg: RunConfig, layout: Layout, module: str = DEFAULT_MODULE) -> LaunchPlan:
    """The DeepSpeed runner command for the local or a hostfile launcher (see slurm.plan_slurm for Slurm)."""
    lc = cfg.launch
    ds = [deepspeed_executable()]
    env: dict[str, str] = {}
    config_file, config_text = resolved_config(cfg)
    files: dict[Path, str] = {config_file: config_text}
    if lc.launcher == "local":
        port = lc.master_port or free_port()
        ds += ["--num_gpus", str(layout.gpus_per_node), "--master_port", str(port)]
        addr = "127.0.0.1"
        if layout.cpu and "OMP_NUM_THREADS" not in os.environ:  # N workers share this machine's cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // layout.gpus_per_node))
    else:
        addr = layout.hosts[0] if lc.master_addr == "127.0.0.1" else lc.master_addr
        port = lc.master_port or 29500
        hostfile = launch_dir(cfg) / "hostfile"
        files[hostfile] = hostfile_text(layout)
        ds += ["--hostfile", script_value("run_dir", hostfile), "--launcher", lc.launcher, "--force_multi",
               "--master_addr", addr, "--master_port", str(port)]
        if lc.launcher_args:
            ds += ["--launcher_args", shlex.join(option_words("launch.launcher_args", lc.launcher_args))]
    mpi = lc.launcher in ("openmpi", "mvapich")
    ds += rank_args(cfg, config_file, module, (addr, port) if mpi else None)
    return LaunchPlan(layout, log_dir(cfg), ds, files, env)


def write_files(plan: LaunchPlan) -> None:
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)


def run_plan(cfg: RunConfig, plan: LaunchPlan) -> int:
    """Write the plan's files and run its command under the supervisor; the job's exit code."""
    from ondol.launch.supervise import supervise
    from ondol.train.preemption import stop_file

    write_files(plan)
    return supervise(plan.command, plan.log_dir, env={**os.environ, **plan.env},
                     watchdog_minutes=cfg.launch.watchdog_minutes, failure_grace_s=cfg.launch.failure_grace_s,
                     stop_path=stop_file(cfg.run_dir))
