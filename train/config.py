"""Typed configuration of training: loop, optimizer, DeepSpeed engine and logging."""

from dataclasses import dataclass, field
from typing import Any


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class OptimConfig:
    # adamw | muon (Muon on the blocks' matrices, each routed expert's separately, AdamW on embeddings, LM head,
    # router, norms and biases; the same lr and weight_decay: train/optim.py). Muon needs ZeRO 0, 1 or 2
    name: str = "adamw"
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
    adamw: str = "auto"  # auto (fused on CUDA, foreach elsewhere) | fused (one kernel for all tensors) | foreach
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update
    # QK-clip (MuonClip): after each update, shrink the query/key scale of attention heads whose largest logit
    # passed this value (Kimi K2 used 100); 0: off. Any optimizer; ZeRO 0-2, not attn_backend=flash (train/qk_clip.py)
    qk_clip: float = 0.0

    def __post_init__(self) -> None:
        _need(self.name in ("adamw", "muon"), f"optim.name must be adamw or muon, not '{self.name}'")
        _need(0.0 <= self.muon_momentum < 1.0, "optim.muon_momentum must lie in [0, 1)")
        _need(self.muon_ns_steps >= 1, "optim.muon_ns_steps must be >= 1")
        _need(self.qk_clip >= 0, "optim.qk_clip must be >= 0 (0 turns QK-clip off)")
        _need(self.adamw in ("auto", "fused", "foreach"), f"optim.adamw must be auto, fused or foreach, "
              f"not '{self.adamw}'")
        _need(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule must be cosine, wsd or constant, "
              f"not '{self.schedule}'")
        _need(self.lr > 0, "optim.lr must be positive")
        _need(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must lie in [0, 1]")
        _need(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _need(0.0 < self.decay_fraction <= 1.0, "optim.decay_fraction must lie in (0, 1]")
        _need(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _need(self.weight_decay >= 0, "optim.weight_decay must be >= 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    backend: str = "auto"  # auto | gloo | nccl
    expert_parallel_size: int = 1
    # DeepSpeed-Ulysses: each row's tokens split over this many consecutive ranks (train/sequence_parallel.py)
    sequence_parallel_size: int = 1
    timeout_minutes: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # merged into DeepSpeed's JSON config
    # ZeRO 1/2: gradient norm, clipping and non-finite skip as device work (foreach, no host sync) or DeepSpeed's
    # own (a norm per tensor, 4 host syncs a step); see train/zero_step.py
    zero_checks: str = "device"  # device | deepspeed

    def __post_init__(self) -> None:
        _need(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        _need(self.precision in ("fp32", "bf16"), f"deepspeed.precision must be fp32 or bf16, not '{self.precision}'")
        _need(self.backend in ("auto", "gloo", "nccl"), f"deepspeed.backend must be auto, gloo or nccl, "
              f"not '{self.backend}'")
        _need(self.zero_checks in ("device", "deepspeed"), f"deepspeed.zero_checks must be device or deepspeed, "
              f"not '{self.zero_checks}'")
        _need(self.expert_parallel_size >= 1, "deepspeed.expert_parallel_size must be >= 1")
        _need(self.sequence_parallel_size >= 1, "deepspeed.sequence_parallel_size must be >= 1")
        _need(self.expert_parallel_size == 1 or self.zero_stage in (0, 1, 2),
              f"deepspeed.zero_stage={self.zero_stage} is not supported with deepspeed.expert_parallel_size="
              f"{self.expert_parallel_size}: use ZeRO stage 0, 1 or 2")


def kv_repeat(n_kv_heads: int, sp_size: int) -> int:
    """How many times each KV head is repeated so that every rank of a sequence-parallel group holds a whole one
    (check_sequence_parallel allows sizes that divide n_kv_heads or are multiples of it)."""
    return 1 if n_kv_heads % sp_size == 0 else sp_size // n_kv_heads


def sequence_parallel_ok(sp_size: int, model, seq_len: int) -> bool:
    try:
        check_sequence_parallel(sp_size, model, seq_len)
    except ValueError:
        return False
    return True


def check_sequence_parallel(sp_size: int, model, seq_len: int) -> None:
    """Refuse what deepspeed.sequence_parallel_size cannot run with this model (a ModelConfig) and seq_len, in
    one line naming the key to change (the world size is checked when the ranks exist)."""
    if sp_size == 1:
        return
    key = f"deepspeed.sequence_parallel_size={sp_size}"
    _need(model.n_heads % sp_size == 0, f"{key} must divide model.n_heads={model.n_heads} (each rank attends "
          "with n_heads / N query heads)")
    kv = model.n_kv_heads
    if kv % sp_size and sp_size % kv:
        allowed = max(n for n in range(1, sp_size + 1) if model.n_heads % n == 0 and (kv % n == 0 or n % kv == 0))
        raise ValueError(f"{key} must divide model.n_kv_heads={kv} or be a multiple of it (KV heads are "
                         f"replicated up to N): the largest allowed size up to {sp_size} is {allowed}")
    _need(seq_len % sp_size == 0, f"data.seq_len={seq_len} must be divisible by {key} (each rank holds "
          "seq_len / N tokens of every row)")
    _need(not model.aux_loss_coef, f"model.aux_loss_coef={model.aux_loss_coef} is not supported with {key} (the "
          "sequence-wise balance loss would see a shard, not the sequence): balance with model.bias_update_rate "
          "instead, or set deepspeed.sequence_parallel_size=1")


PHASE_LR_SCHEDULES = ("run", "constant", "linear", "cosine")


@dataclass
class PhaseConfig:
    """One phase of train.phases: from its first step on, what the run trains on and how the rate moves. A key
    left at its default keeps the previous phase's value (the first phase's: data.sources' weights,
    data.seq_len); the phases' steps add up to train.steps."""

    name: str = ""  # a label for logs and plots (default: phase1, phase2, ...)
    steps: int = 0  # optimizer steps of this phase
    # the whole mixture of this phase, source name -> weight; a source not named has weight 0 (it leaves the
    # mixture); empty: the previous phase's mixture
    weights: dict[str, float] = field(default_factory=dict)
    seq_len: int = 0  # tokens per sequence; 0: the previous phase's
    # run: the run-wide optim.schedule over train.steps goes on through this phase (no phases: the whole run);
    # constant: lr; linear | cosine: from lr down to optim.lr * optim.min_lr_ratio at the phase's last step
    lr_schedule: str = "run"
    lr: float = 0.0  # the phase's starting (peak) rate; 0: the rate the previous phase ended at (first: optim.lr)
    warmup_steps: int = 0  # the phase's first steps ramp linearly up to lr (optim.warmup_steps: the run's start)


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    # none | full (keep each block's input, recompute the whole block in the backward) | selective (keep the
    # outputs of matmuls, attention, grouped expert GEMMs and all-to-alls; recompute only the elementwise ops
    # between them). true / false mean full / none
    activation_checkpointing: str | bool = "none"
    eval_every: int = 50
    eval_batches: int = 8
    eval_bpb_tokens: int = 8192  # held-out tokens per source scored for bits per byte at each evaluation; 0: off
    save_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto | never (earlier checkpoints are moved aside, not deleted) | a checkpoint folder
    # Start from another run's trained weights (its RUN_DIR, or a model folder) instead of a fresh initialisation,
    # with this run's own optimizer and schedule: supervised fine-tuning (train/init_from.py). None: fresh
    init_from: str | None = None
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 10
    # Signals that make every rank finish its step, save a checkpoint and exit with code 75 (a second one: at once)
    stop_signals: list[str] = field(default_factory=lambda: ["TERM", "USR1", "INT"])
    compile: bool = False  # torch.compile each block and the loss; the first step (compiling) is not timed
    # with activation_checkpointing full or selective: all (every block, MTP blocks too) | alternate
    # (blocks 0, 2, 4, ...: half the recompute for about half the saved activations)
    checkpointed_blocks: str = "all"
    # Loss without full logits: the LM head and cross-entropy run over loss_chunk_tokens tokens at a time.
    # auto: chunked on CUDA (a 153,600 vocabulary at 8 x 4096 tokens is 20 GB of fp32 logits), full on CPU
    loss: str = "auto"  # auto | chunked | full
    loss_chunk_tokens: int = 8192
    # Intra-op threads of each CPU rank; 0 = auto: OMP_NUM_THREADS when set (ondol launch sets it per rank), else
    # the cores no other process keeps busy at start (at least 1): on a machine shared with another job, one
    # thread per free core, as threads beyond them wait on the other job at every op (benchmarks/cpu_threads.py).
    # The count orders fp32 sums, so it is logged and kept in checkpoints, and a resume uses it again; set it to
    # repeat a run's losses bit for bit on another day.
    cpu_threads: int = 0
    # Phases of the run, in order (empty: one phase, the whole run on data.sources at data.seq_len): a mixture,
    # sequence length and learning-rate segment each, switching at their first step (README "Training in phases")
    phases: list[PhaseConfig] = field(default_factory=list)
    # a resume may continue at another data.seq_len (and a larger model.max_seq_len) than the checkpoint's run
    # (context extension): the steps already trained keep the length they had
    allow_seq_len_change: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        _need(self.activation_checkpointing in ("none", "full", "selective"),
              "train.activation_checkpointing must be none, full or selective (true/false: full/none), "
              f"not '{self.activation_checkpointing}'")
        _need(self.checkpointed_blocks in ("all", "alternate"), "train.checkpointed_blocks must be all or alternate, "
              f"not '{self.checkpointed_blocks}'")
        _need(self.loss in ("auto", "chunked", "full"), f"train.loss must be auto, chunked or full, "
              f"not '{self.loss}'")
        for key in ("steps", "micro_batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                    "keep_last", "max_nonfinite", "log_every", "loss_chunk_tokens"):
            _need(getattr(self, key) >= 1, f"train.{key} must be >= 1")
        allowed = ("TERM", "USR1", "USR2", "INT", "HUP", "QUIT")
        bad = [s for s in self.stop_signals if s.removeprefix("SIG") not in allowed]
        _need(not bad, f"train.stop_signals: {bad} not among {', '.join(allowed)} (names without SIG)")
        _need(self.eval_bpb_tokens >= 0, "train.eval_bpb_tokens must be >= 0 (0 turns bits per byte off)")
        _need(self.cpu_threads >= 0, "train.cpu_threads must be >= 0 (0: auto)")
        for i, phase in enumerate(self.phases):
            key = f"train.phases[{i}]"
            _need(phase.steps >= 1, f"{key}.steps must be >= 1, not {phase.steps}")
            _need(phase.seq_len >= 0, f"{key}.seq_len must be >= 1 (0: the previous phase's), not {phase.seq_len}")
            _need(phase.lr_schedule in PHASE_LR_SCHEDULES, f"{key}.lr_schedule must be "
                  f"{', '.join(PHASE_LR_SCHEDULES)}, not '{phase.lr_schedule}'")
            _need(phase.lr >= 0, f"{key}.lr must be >= 0 (0: the rate the previous phase ended at)")
            _need(0 <= phase.warmup_steps < phase.steps, f"{key}.warmup_steps must lie in [0, {key}.steps)")
            _need(phase.lr_schedule != "run" or (phase.lr == 0 and phase.warmup_steps == 0),
                  f"{key}: lr and warmup_steps need lr_schedule constant, linear or cosine (run follows optim.*)")
            bad = {name: w for name, w in phase.weights.items() if not w >= 0}
            _need(not bad, f"{key}.weights: {bad} must be >= 0")
            _need(not phase.weights or sum(phase.weights.values()) > 0,
                  f"{key}.weights sum to 0: give at least one source a positive weight")
        if self.phases:
            total = sum(p.steps for p in self.phases)
            _need(total == self.steps, f"train.phases: the phases' steps add up to {total}, train.steps is "
                  f"{self.steps}: make them equal")
            names = [p.name for p in self.phases if p.name]
            _need(len(set(names)) == len(names), f"train.phases: names {names} repeat: give each phase its own")


@dataclass
class LoggingConfig:
    wandb_mode: str = "disabled"  # offline | online | disabled
    wandb_project: str = "ondol"
    wandb_run_name: str | None = None
    progress: bool = True  # a live bar on a terminal; off one there is never a bar
    peak_tflops: float = 0.0  # per rank, for MFU; 0: the GPU datasheet, else a matmul measured at start

    def __post_init__(self) -> None:
        _need(self.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode must be offline, online or "
              f"disabled, not '{self.wandb_mode}'")
        _need(self.peak_tflops >= 0, "logging.peak_tflops must be >= 0 (0: detect)")
