"""What the checkpoints' digests cost (issue 27): hashing throughput on this machine, and the time spent
hashing as a share of a real checkpoint save (`train/checkpoint.py` on a DeepSpeed engine: ZeRO 0, fp32 weights
and Adam state, every file fsynced) and the time spent verifying as a share of a load, for the tiny preset and a
larger one. Each row is the best of `--repeats` (the cores may be shared: compare rows of one run only).

  .venv/bin/python benchmarks/checkpoint_hashing.py
  .venv/bin/python benchmarks/checkpoint_hashing.py --larger moe-1b --larger-layers 4 --repeats 3

Right after a save or a load the files are in the page cache, so the shares are those of hashing from memory;
a resume on a cold cache reads each file once to verify it and the load then finds it cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def hash_throughput(folder: Path, mib: int, repeats: int) -> float:
    """GB/s of each digest over a `mib` MiB file in the page cache: the checkpoints' and an export's."""
    from ondol.files import file_digest
    from ondol.train.checkpoint import DIGEST

    path = folder / "blob"
    path.write_bytes(os.urandom(mib << 20))
    best = {a: min(_timed(file_digest, path, a) for _ in range(repeats)) for a in (DIGEST, "sha256")}
    path.unlink()
    return {a: (mib << 20) / t / 1e9 for a, t in best.items()}


def _timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def checkpoint_costs(run_dir: Path, preset: str, layers: int | None, vocab: int, repeats: int) -> dict:
    """Save, hash, load and verify seconds (best of `repeats`) of one checkpoint of `preset`."""
    from ondol.configs import load_config
    from ondol.model.config import load_preset
    from ondol.model.flops import param_counts
    from ondol.train import checkpoint
    from ondol.train.engine import build_engine, build_model, init_distributed

    cfg = load_config(ROOT / "configs" / "tiny-ko.yaml", [f"run_dir={run_dir}", "logging.wandb_mode=disabled"])
    overrides = {"vocab_size": vocab} | ({"n_layers": layers} if layers else {})
    cfg = dataclasses.replace(cfg, model=load_preset(preset, **overrides))
    env = init_distributed(cfg)
    engine, _ = build_engine(build_model(cfg, env), cfg, env)
    batch = torch.randint(0, vocab, (1, 64))
    out = engine(batch, labels=batch)
    engine.backward(out.loss + out.aux_loss)
    engine.step()  # Adam state exists, as in any checkpoint after step 1
    ckpt_dir = run_dir / "checkpoints"
    times = {"save": [], "hash": [], "load": [], "verify": []}
    for i in range(repeats):
        times["save"].append(_timed(checkpoint.save, engine, ckpt_dir, i + 1, {"step": i + 1}, {}, 0, 1))
        folder = checkpoint.latest_checkpoint(ckpt_dir)
        names = sorted(checkpoint.read_meta(folder)["files"])
        times["hash"].append(_timed(checkpoint._digests, folder, names, 0, 1))  # the part of save
        times["verify"].append(_timed(checkpoint.damage, folder) - _timed(checkpoint.damage, folder, False))
        times["load"].append(_timed(checkpoint.load, engine, folder, 0, cfg.seed))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    best = {k: min(v) for k, v in times.items()}
    return {"preset": preset + (f" ({layers} layers)" if layers else ""), "params": param_counts(cfg.model)["total"],
            "bytes": size, **best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--larger", default="moe-1b", help="the larger preset (default moe-1b)")
    parser.add_argument("--larger-layers", type=int, default=2, help="its layers, to fit a CPU's memory (default 2)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size of both models (default 32768)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    with tempfile.TemporaryDirectory() as tmp:
        rate = hash_throughput(Path(tmp), 256, args.repeats)
        console.print(f"over a 256 MiB file in the page cache, one core: "
                      f"{', '.join(f'{a} {r:.2f} GB/s' for a, r in rate.items())}; "
                      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        rows = [checkpoint_costs(Path(tmp) / "tiny", "tiny", None, args.vocab, args.repeats),
                checkpoint_costs(Path(tmp) / "larger", args.larger, args.larger_layers, args.vocab, args.repeats)]
    table = Table(title="checkpoint digests: xxh3_128 of every file at save, checked at load (best of "
                        f"{args.repeats})")
    for col in ("preset", "params", "checkpoint", "save s", "hash s", "hash/save", "load s", "verify s",
                "verify/load"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for r in rows:
        table.add_row(r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['bytes'] / 1e6:,.0f} MB", f"{r['save']:.2f}",
                      f"{r['hash']:.2f}", f"{r['hash'] / r['save']:.0%}", f"{r['load']:.2f}", f"{r['verify']:.2f}",
                      f"{r['verify'] / r['load']:.0%}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
