"""Where training metrics go (rank 0 only): RUN_DIR/metrics.jsonl, the console with a progress bar, wandb,
and a loss-curve PNG at the end. The trainer reduces values across ranks before handing them over."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from ondol.files import write_atomic

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets), used when logging.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "B200": 2250.0, "GH200": 989.0}


def detect_peak_tflops(device: torch.device, configured: float) -> float:
    """Per-device peak for MFU: the configured value, else the GPU's datasheet figure, else 0 (not reported)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key]
    return 0.0


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
        self.wandb = None
        if wandb_cfg.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.wandb_project, name=wandb_cfg.wandb_run_name,
                                    mode=wandb_cfg.wandb_mode, dir=str(run_dir), config=config,
                                    resume="allow", id=_wandb_id(run_dir))
        self.progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        line = _console_line(record)
        if self.progress is not None:
            self.progress.console.print(line)
            if "loss" in record:
                self.progress.update(self.task, status=f"loss {record['loss']:.4f}")
        else:
            print(line, file=sys.stdout, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def _console_line(r: dict) -> str:
    keys = [("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("bpb/all", "bits/byte {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"), ("moe/load_cv_max", "load cv {:.2f}"),
            ("nonfinite_steps", "nonfinite {}")]
    parts = [fmt.format(r[k]) for k, fmt in keys if k in r]
    return f"step {r['step']:>6} | " + " | ".join(parts)


def plot_losses(metrics_path: Path, out_png: Path) -> Path:
    """Training and validation loss per step and, beside them when logged, held-out bits per byte with one line
    per source, as a PNG (matplotlib's Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    sources = sorted({k for r in records for k in r if k.startswith("bpb/")})
    fig, axes = plt.subplots(1, 2 if sources else 1, figsize=(12 if sources else 7, 4), dpi=110, squeeze=False)
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
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
