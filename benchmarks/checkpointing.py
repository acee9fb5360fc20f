"""Forward + backward time and activation memory of train.activation_checkpointing none / full / selective.

One model per mode, built from the same seed and checkpointed as the trainer does (train/fast_paths.py), takes
turns with the others step by step on the same batch of real Korean text (UTF-8 bytes of ko_reviews as token
ids), after a warm-up round; the table gives each mode's loss (which must agree), best and median ms per
forward + backward, the peak of activations and temporaries (everything but parameters and gradients), and
`ondol plan`'s activations + logits for the same shape (train/memory.py). The peak on CPU is torch's
MemTracker (one extra step, as it slows every op); on CUDA the allocator's peak minus parameters and
gradients.

    .venv/bin/python benchmarks/checkpointing.py                                  # tiny preset, CPU, fp32
    python benchmarks/checkpointing.py --preset moe-1b --device cuda --dtype bf16 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ondol.benchmarks.model_fwd_bwd import korean_batch
from ondol.model.config import ModelConfig, load_preset
from ondol.model.transformer import Transformer
from ondol.train.config import TrainConfig
from ondol.train.fast_paths import apply_compile_and_checkpointing
from ondol.train.memory import CHECKPOINTING, GIB, RunShape, activation_bytes, logits_bytes


def build(cfg: ModelConfig, mode: str, args) -> torch.nn.Module:
    model = Transformer(cfg, seed=0).to(device=args.device, dtype=getattr(torch, args.dtype))
    apply_compile_and_checkpointing(model, TrainConfig(activation_checkpointing=mode, compile=args.compile,
                                                       checkpointed_blocks=args.blocks))
    return model


def step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    (out.loss + out.aux_loss + out.mtp_loss).backward()
    return float(out.loss.detach())


def peak_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak bytes of one step's activations and temporaries."""
    model.zero_grad(set_to_none=True)
    if ids.is_cuda:
        held = sum(p.nbytes for p in model.parameters()) * 2  # parameters and their gradients
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, ids, labels)
        return torch.cuda.max_memory_allocated() - held
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step(model, ids, labels)
    peak = tracker.get_tracker_snapshot("peak")[ids.device]
    return peak.get(_MemRefType.ACT, 0) + peak.get(_MemRefType.TEMP, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", nargs="*", default=["vocab_size=4096", "moe_dispatch=grouped_mm"],
                        metavar="KEY=VALUE", help="model overrides, values read as YAML")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--blocks", default="all", choices=["all", "alternate"])
    args = parser.parse_args()
    cfg = load_preset(args.preset, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    models = {mode: build(cfg, mode, args) for mode in CHECKPOINTING}
    ids, labels = (t.to(args.device) for t in korean_batch(args.batch, args.seq, cfg.vocab_size))
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    losses, times = {}, {mode: [] for mode in models}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles)
        for mode, model in models.items():
            sync()
            t0 = time.perf_counter()
            losses[mode] = step(model, ids, labels)
            sync()
            if round_:
                times[mode].append(time.perf_counter() - t0)
    compiled = ", compiled" if args.compile else ""
    table = Table(title=f"{args.preset} ({', '.join(args.set)}), {args.dtype} on {args.device}, batch "
                        f"{args.batch} x {args.seq}, blocks {args.blocks}{compiled}")
    for column in ("checkpointing", "loss", "best ms", "median ms", "peak act GiB", "plan GiB"):
        table.add_column(column, justify="left" if column == "checkpointing" else "right")
    s = 2 if args.dtype == "bfloat16" else 4
    for mode, model in models.items():
        shape = RunShape("bf16" if s == 2 else "fp32", 0, 1, 1, args.batch, args.seq, mode, args.blocks)
        plan = activation_bytes(cfg, shape) + logits_bytes(cfg, shape)
        peak = peak_bytes(model, ids, labels)
        best, median = 1e3 * min(times[mode]), 1e3 * statistics.median(times[mode])
        table.add_row(mode, f"{losses[mode]:.5f}", f"{best:,.0f}", f"{median:,.0f}", f"{peak / GIB:.3f}",
                      f"{plan / GIB:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
