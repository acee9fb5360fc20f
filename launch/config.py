"""Typed configuration of how a job is started (one machine, a hostfile cluster, or Slurm)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    time: str = "24:00:00"
    account: Optional[str] = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the launcher (venv, modules)
    container: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class LaunchConfig:
    launcher: str = "local"  # local | pdsh | openmpi | mvapich | slurm
    nodes: int = 1
    gpus_per_node: int = 1  # on CPU: number of gloo worker processes
    hostfile: Optional[str] = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class GenerateConfig:
    prompt: Optional[str] = None  # None: the first words of the first validation document
    prompt_words: int = 3
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
