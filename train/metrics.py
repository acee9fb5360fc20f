"""Where training metrics go (rank 0 only): RUN_DIR/metrics.jsonl, the console, wandb, and a loss-curve PNG at
the end. The trainer reduces values across ranks before handing them over.

Console: on a terminal, a live progress bar with the step lines above it; anywhere else (a log file, Slurm, CI)
no bar, and every line is printed whole (never wrapped) and starts with a local timestamp,
`2026-11-24 13:40:01 step     10 | loss 7.1234 | ...`, so logs of several runs and ranks line up. The same
timestamped lines are appended to RUN_DIR/logs/train.log, so a run's console survives in its folder (a resume
appends; its header line says from which step).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import torch

from ondol.files import write_atomic

TRAIN_LOG = "logs/train.log"  # rank 0's console lines, under RUN_DIR
# Dense bf16 peak TFLOP/s per GPU (vendor datasheets), used when logging.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "B200": 2250.0, "GH200": 989.0}


def detect_peak_tflops(device: torch.device, configured: float, precision: str) -> tuple[float, str]:
    """Per-rank peak TFLOP/s for MFU and where it comes from: the configured logging.peak_tflops, else the GPU's
    datasheet figure, else (CPU, or a GPU not in the table) a matmul measured here. CPUs differ too much (cores,
    AVX-512, AMX) for a table, so on CPU MFU is the fraction of what this machine's BLAS reaches on a large
    matmul in the training precision: an achievable peak, not the vendor's theoretical one."""
    if configured > 0:
        return configured, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key], f"{key} datasheet, dense bf16"
    return measured_matmul_tflops(device, precision), f"measured {precision} matmul on {device.type}"


@functools.cache
def measured_matmul_tflops(device: torch.device, precision: str, n: int = 1024, repeats: int = 3) -> float:
    """The best of `repeats` n x n matmuls (after one warm-up), in TFLOP/s; about 0.1-0.3 s on a laptop CPU."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
    a, b = (torch.randn(n, n, generator=gen, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a killed writer is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return records


class MetricsSink:
    """Rank 0's outputs. metrics.jsonl is only appended to; on resume, records past the resumed step (written
    after that checkpoint by the interrupted run) are first dropped by an atomic rewrite, and a run starting
    from step 0 starts the file afresh, so metrics.jsonl reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, wandb_cfg, progress: bool,
                 config: dict) -> None:
        self.path = run_dir / "metrics.jsonl"
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= start_step] if start_step else []
        if kept != records:
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the sink's lifetime)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_file = open(run_dir / TRAIN_LOG, "a", encoding="utf-8")  # noqa: SIM115
        self.wandb = None
        if wandb_cfg.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.wandb_project, name=wandb_cfg.wandb_run_name,
                                    mode=wandb_cfg.wandb_mode, dir=str(run_dir), config=config,
                                    resume="allow", id=_wandb_id(run_dir))
        self.tty = sys.stdout.isatty()
        self.progress = None
        if progress and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def write(self, record: dict) -> None:
        """One metrics.jsonl row (with its UTC wall-clock `time`), the wandb point and the console line."""
        stamped = {**record, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")}
        self.file.write(json.dumps(stamped) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.log(_console_line(record))
        if self.progress is not None and "loss" in record:
            self.progress.update(self.task, status=f"loss {record['loss']:.4f}")

    def header(self, cfg, world_size: int, flops_per_token: float, peak_flops: float, peak_source: str,
               start_step: int) -> None:
        for line in run_header(cfg, world_size, flops_per_token, peak_flops, peak_source, start_step):
            self.log(line)

    def log(self, line: str) -> None:
        """A console line: above the live bar on a terminal, else whole and timestamped; in train.log always
        timestamped."""
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        self.log_file.write(stamped + "\n")
        self.log_file.flush()
        if self.progress is not None:
            self.progress.console.print(line, soft_wrap=True, highlight=False, markup=False)
        elif self.tty:
            print(line, flush=True)
        else:
            print(stamped, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        self.log_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def _console_line(r: dict) -> str:
    keys = [("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("bpb/all", "bits/byte {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:,.0f} tok/s"), ("ms_per_step", "{:,.0f} ms/step"), ("mfu", "mfu {:.1%}"),
            ("moe/load_cv_max", "load cv {:.2f}"), ("nonfinite_steps", "nonfinite {}")]
    parts = [fmt.format(r[k]) for k, fmt in keys if k in r and r[k] is not None]
    if "tokens_seen" in r:
        parts.append(f"{_si(r['tokens_seen'])} tokens")
    if "elapsed_s" in r:
        parts.append(f"elapsed {_clock(r['elapsed_s'])} eta {_clock(r['eta_s'])}")
    return f"step {r['step']:>6} | " + " | ".join(parts)


def _si(n: float) -> str:
    """12,345,678 -> '12.3M' (three significant figures)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_header(cfg, world_size: int, flops_per_token: float, peak_flops: float, peak_source: str,
               start_step: int) -> list[str]:
    """The lines that open a run's console output: sizes, cost per token, the parallel layout and the batch,
    what MFU divides, and a warning when warmup outlasts the run."""
    from ondol.model.flops import param_counts

    m, tr, ds, optim = cfg.model, cfg.train, cfg.deepspeed, cfg.optim
    counts = param_counts(m)
    experts = (f", {m.n_experts} experts top-{m.top_k} + {m.n_shared_experts} shared"
               if m.n_experts and any(m.is_moe_layer(i) for i in range(m.n_layers)) else "")
    sp = ds.sequence_parallel_size
    dp = world_size // sp
    tokens = tr.micro_batch_size * tr.grad_accum * dp * cfg.data.seq_len
    ep = ds.expert_parallel_size
    groups = f"expert-parallel groups of {ep}" + (f", sequence-parallel groups of {sp}" if sp > 1 else "")
    lines = [
        f"run {cfg.run_dir}: steps {start_step} -> {tr.steps}, seed {cfg.seed}",
        (f"model: {_si(counts['total'])} parameters, {_si(counts['active'])} active per token ({m.n_layers} "
         f"layers, d_model {m.d_model}{experts}), {_si(flops_per_token)} FLOPs per token (forward + backward)"),
        (f"layout: world {world_size} = data-parallel {dp}{f' x sequence-parallel {sp}' if sp > 1 else ''} "
         f"({groups}), ZeRO stage {ds.zero_stage}, {ds.precision}; batch {tr.micro_batch_size} x {tr.grad_accum} "
         f"x {dp} x {cfg.data.seq_len} = {tokens:,} tokens per step (micro-batch x grad-accum x data-parallel x "
         "seq)"),
        (f"MFU: model FLOPs (the per-token figure above; activation checkpointing's recompute not counted) "
         f"over a peak of {peak_flops / 1e12:.3g} TFLOP/s x {world_size} rank(s) ({peak_source})"),
    ]
    if optim.warmup_steps >= tr.steps:
        lines.append(f"warning: optim.warmup_steps {optim.warmup_steps} >= train.steps {tr.steps}: the learning "
                     f"rate ramps for the whole run and never decays; lower optim.warmup_steps")
    return lines


def plot_losses(metrics_path: Path, out_png: Path, title: str) -> Path:
    """Training and validation loss per step and, beside them when logged, held-out bits per byte with one line
    per source and, in a run of phases (train.phases), each source's token share of its phase so far with the
    phase boundaries, as a PNG (matplotlib's Agg backend, no display) titled `title` (also the PNG's Title text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    sources = sorted({k for r in records for k in r if k.startswith("bpb/")})
    shares = sorted({k for r in records for k in r if k.startswith("share/")})
    panels = 1 + bool(sources) + bool(shares)
    fig, axes = plt.subplots(1, panels, figsize=(7 + 5 * (panels - 1), 4), dpi=110, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if sources:
        ax = axes[0, 1]
        for key in sources:
            ax.plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), "o-", lw=1.2,
                    label=key.removeprefix("bpb/").replace("all", "all sources"))
        ax.set_xlabel("step")
        ax.set_ylabel("held-out bits per byte (UTF-8)")
        ax.grid(alpha=0.3)
        ax.legend()
    if shares:
        ax = axes[0, -1]
        logged = [r for r in records if "phase" in r]
        for key in shares:  # a source out of a phase's mixture has share 0 there
            ax.step([r["step"] for r in logged], [r.get(key, 0.0) for r in logged], where="pre", lw=1.2,
                    label=key.removeprefix("share/"))  # the value at s covers (s-1, s]
        for before, after in itertools.pairwise(logged):
            if after["phase"] != before["phase"]:
                ax.axvline(before["step"], color="grey", ls="--", lw=0.8)
                ax.annotate(f" phase {after['phase']}", (before["step"], 1.02), fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("token share of the phase so far")
        ax.set_ylim(0, 1.08)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, metadata={"Title": title})
    plt.close(fig)
    return out_png
