"""Typed configuration of training: loop, optimizer, DeepSpeed engine and logging."""

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    backend: str = "auto"  # auto | gloo | nccl
    expert_parallel_size: int = 1
    timeout_minutes: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # merged into DeepSpeed's JSON config


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto | never | a checkpoint folder
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 10


@dataclass
class LoggingConfig:
    wandb_mode: str = "disabled"  # offline | online | disabled
    wandb_project: str = "ondol"
    wandb_run_name: Optional[str] = None
    progress: bool = True
    peak_tflops: float = 0.0  # 0: detect from the device (CPU: none, MFU not reported)
