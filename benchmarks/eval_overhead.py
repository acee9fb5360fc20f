"""In-loop evaluation overhead: the time of one evaluation (validation loss, and bits per byte per source of
held-out text) against the training steps between two evaluations, for a run config's schedule. Target: the
bits per byte under 5% of training time with default settings.

It reads the tokenizer and prepared data of an existing run (`ondol run configs/tiny-ko.yaml` first, or
`ondol tokenizer train` + `ondol data prepare`) and trains in a temporary run directory beside nothing else.
Each measurement is repeated and the best kept (the cores may be shared).

  .venv/bin/python benchmarks/eval_overhead.py                        # configs/tiny-ko.yaml, runs/tiny-ko
  .venv/bin/python benchmarks/eval_overhead.py --steps 5 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    from ondol.configs import load_config
    from ondol.train.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-ko.yaml")
    parser.add_argument("--run-dir", default="runs/tiny-ko", help="a run whose tokenizer and data are prepared")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.eval_bpb_tokens=16384")
    args = parser.parse_args(argv)
    source = Path(args.run_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").symlink_to(source / "data", target_is_directory=True)
        cfg = load_config(args.config, [f"run_dir={tmp}", f"tokenizer.path={source / 'tokenizer'}",
                                        "logging.progress=false", *args.overrides])
        trainer = Trainer(cfg)
        for _ in range(2):
            trainer.train_step()
        step_s = best_of(args.repeats, lambda: [trainer.train_step() for _ in range(args.steps)]) / args.steps
        val_s = best_of(args.repeats, trainer.evaluate)
        bpb_s = best_of(args.repeats, lambda: trainer.bits_per_byte(trainer.engine.module)) \
            if trainer.bits_per_byte else 0.0
        docs = trainer.bits_per_byte.documents if trainer.bits_per_byte else {}
    tr = cfg.train
    evals = tr.steps // tr.eval_every + 1 + (tr.steps % tr.eval_every != 0)  # step 0, every eval_every, the last
    train_s = tr.steps * step_s
    table = Table(title=f"in-loop evaluation, {args.config}: {tr.steps} steps, {evals} evaluations "
                        f"(train.eval_every={tr.eval_every}, train.eval_bpb_tokens={tr.eval_bpb_tokens})")
    for col in ("what", "seconds each", "seconds per run", "% of training"):
        table.add_column(col, justify="left" if col == "what" else "right")
    table.add_row("training step", f"{step_s:.3f}", f"{train_s:.1f}", "100.0")
    table.add_row(f"validation loss ({tr.eval_batches} batches)", f"{val_s:.3f}", f"{evals * val_s:.1f}",
                  f"{100 * evals * val_s / train_s:.1f}")
    table.add_row(f"bits per byte ({sum(map(len, docs.values()))} documents of {len(docs)} sources)", f"{bpb_s:.3f}",
                  f"{evals * bpb_s:.1f}", f"{100 * evals * bpb_s / train_s:.1f}")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
