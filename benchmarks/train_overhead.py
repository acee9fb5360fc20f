"""Trainer overhead: steps/s and tokens/s of the tiny MoE under the DeepSpeed trainer (ZeRO 0 and 2) against a
bare PyTorch loop on the same model, the same initial weights and the same batches, in one process.

The bare loop does what a training step must do and nothing else: forward, (loss + aux).backward(), clip,
AdamW step, zero grads, router-bias update. The trainer steps are `Trainer.train_step` plus the metric
reduction every log_every steps (evaluation and checkpoints are excluded from both). Each mode is timed
`--repeats` times, interleaved, and the best time kept (the cores may be shared).

  .venv/bin/python benchmarks/train_overhead.py                 # tiny-ko shapes: 8 x 256 tokens a step
  .venv/bin/python benchmarks/train_overhead.py --steps 10 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def bare_loop(cfg, batches: list[dict], warmup: int) -> float:
    """Seconds for the timed steps of a plain PyTorch loop."""
    from ondol.model.transformer import Transformer
    from ondol.train.optim import param_groups

    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).train()
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            foreach=True)
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
    return time.perf_counter() - start


def trainer_loop(cfg, steps: int, warmup: int) -> float:
    from ondol.train.trainer import Trainer

    trainer = Trainer(cfg)
    start = 0.0
    for i in range(steps):
        if i == warmup:
            start = time.perf_counter()
        trainer.train_step()
        if trainer.step % cfg.train.log_every == 0:
            trainer._interval_metrics()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work-dir", help="reuse a folder for the tokenizer and data (default: a temp dir)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the golden run's tiny assets
    from golden import build_assets, link_data, tiny_config

    from ondol.data.loader import TokenLoader

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        assets = build_assets(work / "assets")
        run = work / "run"
        link_data(run, assets)
        total = args.steps + args.warmup
        shapes = [f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
                  f"train.steps={total}", "train.log_every=10", "model.moe_dispatch=auto"]
        configs = {f"trainer ZeRO {z}": tiny_config(run, assets, *shapes, f"deepspeed.zero_stage={z}")
                   for z in (0, 2)}
        base = configs["trainer ZeRO 0"]
        loader = TokenLoader(assets / "data", "train", args.seq_len, args.micro_batch, seed=base.seed)
        batches = [next(loader) for _ in range(total)]

        best: dict[str, float] = {}
        for _ in range(args.repeats):
            best["bare PyTorch"] = min(best.get("bare PyTorch", float("inf")),
                                       bare_loop(_with_vocab(base, assets), batches, args.warmup))
            for name, cfg in configs.items():
                best[name] = min(best.get(name, float("inf")), trainer_loop(cfg, total, args.warmup))

    tokens = args.steps * args.micro_batch * args.seq_len
    table = Table(title=f"tiny MoE, {args.micro_batch} x {args.seq_len} tokens/step, {args.steps} steps, "
                        f"{torch.get_num_threads()} threads (best of {args.repeats})")
    for col in ("loop", "steps/s", "tokens/s", "overhead vs bare"):
        table.add_column(col, justify="right")
    for name, seconds in best.items():
        overhead = seconds / best["bare PyTorch"] - 1
        table.add_row(name, f"{args.steps / seconds:.2f}", f"{tokens / seconds:,.0f}",
                      "-" if name == "bare PyTorch" else f"{overhead:+.1%}")
    Console().print(table)


def _with_vocab(cfg, assets: Path):
    """The trainer takes vocab_size from the tokenizer; the bare loop must build the same model."""
    import dataclasses

    from ondol.tokenizer.tokenizer import Tokenizer

    vocab = Tokenizer.load(assets / "tokenizer").vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


if __name__ == "__main__":
    main()
