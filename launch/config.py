"""Typed configuration of how a job is started (one machine, a hostfile cluster, or Slurm)."""

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("local", "pdsh", "openmpi", "mvapich", "slurm")
HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$")  # a host name or IP address, nothing a shell interprets
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """NAME=value lines (`#` comments, blank lines) of launch.env_file. The file holds secrets: it must belong
    to this user and be readable by nobody else (chmod 600). Errors are one line naming the file (and line)."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"launch.env_file {path}: cannot read it ({e.strerror})") from None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"launch.env_file {path} is readable by others (mode {stat.filemode(info.st_mode)}): "
                         f"run chmod 600 {path}")
    found = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or not ENV_NAME.match(name):
            raise ValueError(f"launch.env_file {path}:{number}: expected NAME=value")
        found[name] = value
    return found


@dataclass
class SlurmConfig:
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines before srun; empty: activate ondol's own venv
    container: str | None = None  # container image for srun (pyxis: --container-image)
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST pairs; the working directory is added
    request_gpus: bool = True  # False: a CPU partition, gpus_per_node gloo workers per node
    # CPUs for the one task per node (the launcher and its ranks): --cpus-per-task=N; 0: the whole node
    # (--exclusive, and the step takes $SLURM_CPUS_ON_NODE), as training jobs use every GPU of their nodes
    cpus_per_node: int = 0
    job_name: str | None = None  # None: ondol-<run dir name>
    extra_sbatch: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. "--constraint=h100"
    # Slurm sends USR1 to the batch script this many seconds before the time limit (--signal=B:USR1@N): every
    # rank saves and stops, and with `requeue` the job queues itself again and resumes; 0: no early signal
    stop_signal_s: int = 300
    requeue: bool = True

    def __post_init__(self) -> None:
        if self.cpus_per_node < 0:
            raise ValueError("launch.slurm.cpus_per_node must be >= 0 (0: the whole node, --exclusive)")
        if self.stop_signal_s < 0:
            raise ValueError("launch.slurm.stop_signal_s must be >= 0 (0: no signal before the time limit)")


@dataclass
class LaunchConfig:
    launcher: str = "local"  # local | pdsh | openmpi | mvapich | slurm
    nodes: int = 1
    gpus_per_node: int = 1  # on CPU: number of gloo worker processes
    hostfile: str | None = None  # MPI-style `host slots=N` lines; pdsh / openmpi / mvapich
    launcher_args: str = ""  # hostfile runners: extra pdsh/mpirun options, e.g. "--mca btl_tcp_if_include ib0"
    master_addr: str = "127.0.0.1"  # multi-node: 127.0.0.1 means the first host; Slurm: the first allocated node
    master_port: int = 29500  # 0: a free port (local); Slurm derives it from the job id
    global_batch_size: int = 0  # expected micro x grad_accum x data-parallel size; 0: not checked
    # memory of one GPU for the pre-launch memory plan (`ondol plan`); 0: this machine's GPU when launching
    # locally, else unknown (the plan is printed, not checked)
    gpu_memory_gib: float = 0.0
    # NAME=value lines (chmod 600) every rank reads on its own node: secrets such as WANDB_API_KEY reach the
    # ranks without being on a command line, in a log or in a generated file
    env_file: str | None = None
    watchdog_minutes: float = 30.0  # stop the job when no rank log grew for this long; 0: never
    failure_grace_s: float = 15.0  # after a rank fails, how long the others get to exit before being stopped
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launch.launcher must be one of {', '.join(LAUNCHERS)}, not '{self.launcher}'")
        if self.nodes < 1:
            raise ValueError("launch.nodes must be >= 1")
        if self.gpus_per_node < 1:
            raise ValueError("launch.gpus_per_node must be >= 1")
        if not HOSTNAME.match(self.master_addr):
            raise ValueError(f"launch.master_addr must be a host name or IP address, not {self.master_addr!r}")
        if not 0 <= self.master_port < 65536:
            raise ValueError("launch.master_port must lie in [0, 65535] (0: pick a free port)")
        if self.global_batch_size < 0:
            raise ValueError("launch.global_batch_size must be >= 0 (0: not checked)")
        if self.gpu_memory_gib < 0:
            raise ValueError("launch.gpu_memory_gib must be >= 0 (0: this machine's GPU, or not checked)")
        if self.watchdog_minutes < 0 or self.failure_grace_s < 0:
            raise ValueError("launch.watchdog_minutes and launch.failure_grace_s must be >= 0")
        if self.launcher == "local" and self.nodes > 1:
            raise ValueError("launch.nodes > 1 needs launch.launcher=pdsh, openmpi, mvapich (with launch.hostfile) "
                             "or slurm")
        if self.launcher in ("pdsh", "openmpi", "mvapich") and not self.hostfile:
            raise ValueError(f"launch.launcher={self.launcher} needs launch.hostfile (lines like 'node1 slots=8')")


@dataclass
class GenerateConfig:
    prompt: str | None = None  # None: the first words of the first validation document (chat: its user message)
    # answer the prompt as a user's message through the chat template (data/chat.py), stopping at the end of
    # the assistant's turn: a model fine-tuned on chat data (train.init_from)
    chat: bool = False
    prompt_words: int = 3
    max_new_tokens: int = 40
    min_new_tokens: int = 8  # eos is not chosen before this many tokens
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    speculative: bool = False  # greedy only: draft with the model's MTP depth 1 and verify (same output, faster)
    compile: bool = False  # torch.compile the one-token decoding step (first call compiles; faster for long outputs)
