"""Training step time of the tiny MoE at expert-parallel sizes 1, 2, 4 on CPU (gloo), with the all-to-all share.

Each EP size runs in its own group of world = EP processes (pure expert parallelism: every rank owns
n_experts / EP experts and its own micro-batch), DeepSpeed ZeRO 0, fp32, on UTF-8 bytes of real Korean reviews.
The per-rank micro-batch is fixed, so the global batch grows with EP. Times are medians over the measured steps
after warm-up; the all-to-all share is the time inside all-to-alls (forward and backward, counts exchange
excluded) over the step time, mean over ranks.

    .venv/bin/python benchmarks/ep_step_time.py                        # EP 1, 2, 4; tiny preset
    .venv/bin/python benchmarks/ep_step_time.py --ep 1 2 --steps 5 --seq 64 --set n_layers=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml
from model_fwd_bwd import korean_batch  # the model benchmark's real-text batches (this script's folder)
from rich.console import Console
from rich.table import Table

from ondol.launch.launcher import free_port


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import deepspeed
    import torch.distributed as dist

    from ondol.model.config import load_preset
    from ondol.model.transformer import Transformer
    from ondol.train.engine import skip_shared_memory_op
    from ondol.train.expert_parallel import (
        apply_expert_parallel,
        expert_parallel_metrics,
        optimizer_param_groups,
    )

    skip_shared_memory_op()  # as ondol train does on CPU: no op build, no build lock
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = load_preset(args.preset, **{**overrides, "vocab_size": 256})
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_expert_parallel(model, world, 0)
    opt = torch.optim.AdamW(optimizer_param_groups([{"params": list(model.parameters()), "name": "all"}]), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30})
    total = args.warmup + args.steps
    ids, labels = (t.view(total, world, args.batch, args.seq)[:, rank]
                   for t in korean_batch(total * world * args.batch, args.seq, cfg.vocab_size))
    times, shares, sent = [], [], []
    for step in range(total):
        dist.barrier()
        t0 = time.perf_counter()
        result = engine(ids[step], labels=labels[step])
        engine.backward(result.loss + result.aux_loss)
        engine.step()
        elapsed = time.perf_counter() - t0
        m = expert_parallel_metrics(model, seconds=elapsed, steps=1)  # collective; outside the timed region
        if step >= args.warmup:
            times.append(elapsed)
            shares.append(m.get("ep/all_to_all_share", 0.0))
            sent.append(m.get("ep/tokens_sent_per_step", 0.0))
    step_s = torch.tensor([statistics.median(times)])
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    if rank == 0:
        tokens = world * args.batch * args.seq
        Path(out).write_text(json.dumps({"ep": world, "step_s": float(step_s), "share": statistics.median(shares),
                                         "sent": statistics.median(sent), "tokens": tokens,
                                         "experts_per_rank": cfg.n_experts // world}))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="EP sizes (= processes) to run")
    parser.add_argument("--preset", default="tiny", help="model preset (configs/model/NAME.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()

    table = Table(title=f"{args.preset} MoE train step on CPU, ZeRO 0 fp32, micro-batch {args.batch} x {args.seq} "
                        "per rank")
    for col in ("EP = ranks", "experts/rank", "step (s, median, slowest rank)", "tokens/s (all ranks)",
                "all-to-all share", "token copies sent/rank/step"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            out = Path(tmp) / f"ep{ep}.json"
            mp.start_processes(_rank, args=(ep, free_port(), args, str(out)), nprocs=ep, join=True,
                               start_method="spawn")
            r = json.loads(out.read_text())
            table.add_row(str(ep), str(r["experts_per_rank"]), f"{r['step_s']:.3f}",
                          f"{r['tokens'] / r['step_s']:,.0f}", f"{r['share']:.1%}", f"{r['sent']:,.0f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
