"""Sequence parallelism (deepspeed.sequence_parallel_size, train/sequence_parallel.py) on CPU workers over gloo:
per-rank peak memory of one long row against `ondol plan`'s prediction, and tokens/s against data parallelism.

Memory: the largest per-rank peak RSS growth over a few optimizer steps (measured as benchmarks/
plan_vs_measured.py does: VmHWM after the engine is built, glibc handing large blocks back) of one row of
`--seq-len` tokens on one rank (SP 1) and split over two (SP 2), next to train/memory.py's total for the same
layout. The transient part (activations, logits, all-to-all buffers: what SP divides) is shown predicted and
measured: the measured one is the growth of the peak from a row of T / 16 tokens to one of T, times 16 / 15
(the transients grow with the tokens; the static part, weights and optimizer state, does not).

Speed: 2 workers training rows of `--seq-len` tokens as data-parallel 2 (SP 1, a row per rank) and as one
sequence-parallel group (SP 2, a row per step split over both): tokens/s, and the share of step time spent in
DeepSpeed-Ulysses all-to-alls (DeepSpeed's `single_all_to_all`, timed in place; forward and backward).

Model: configs/tiny-ko.yaml's MoE (grouped_mm experts: no padding, as the plan counts them) with global
attention only and one document per row (a causal row with no mask: an explicit CPU mask would be T x T),
fp32, real Korean text as UTF-8 bytes (benchmarks/model_fwd_bwd.py).

    .venv/bin/python benchmarks/sequence_parallel.py                  # 8,192-token rows
    .venv/bin/python benchmarks/sequence_parallel.py --seq-len 16384
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ondol.launch.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-ko.yaml"
MODEL = ["model.vocab_size=4096", "model.attn_pattern=G", "model.document_masking=false", "model.n_heads=8",
         "model.n_kv_heads=2", "model.moe_dispatch=grouped_mm", "deepspeed.precision=fp32",
         "train.micro_batch_size=1"]
STEPS = 3


def overrides(world: int, sp: int, seq_len: int) -> list[str]:
    return [*MODEL, f"data.seq_len={seq_len}", f"deepspeed.sequence_parallel_size={sp}",
            f"launch.gpus_per_node={world}", f"model.max_seq_len={seq_len}"]


def _rank(rank: int, world: int, port: int, sp_size: int, seq_len: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed.sequence.layer as ulysses
    from model_fwd_bwd import korean_batch  # real-text batches (this script's folder)
    from plan_vs_measured import rss_kib

    from ondol.configs import load_config
    from ondol.train.engine import build_engine, build_model, init_distributed
    from ondol.train.sequence_parallel import apply_sequence_parallel, data_parallel

    exchange, timer = ulysses.single_all_to_all, [0.0]

    def timed_exchange(*args, **kwargs):
        t0 = time.perf_counter()
        result = exchange(*args, **kwargs)
        timer[0] += time.perf_counter() - t0
        return result

    ulysses.single_all_to_all = timed_exchange
    cfg = load_config(CONFIG, overrides(world, sp_size, seq_len))
    env = init_distributed(cfg)
    dp_rank, dp_size = data_parallel(rank, world, sp_size)
    ids, labels = korean_batch(STEPS * dp_size, seq_len, cfg.model.vocab_size)
    ids, labels = (t.view(STEPS, dp_size, 1, -1)[:, dp_rank] for t in (ids, labels))
    torch.distributed.barrier()
    base = rss_kib("VmRSS")
    model = build_model(cfg, env)
    sp = apply_sequence_parallel(model, sp_size)
    engine, _ = build_engine(model, cfg, env)
    Path("/proc/self/clear_refs").write_text("5")  # peak from here: training, not construction
    seconds = []
    for step in range(STEPS):
        batch = {"input_ids": ids[step], "labels": labels[step], "doc_ids": torch.zeros_like(ids[step])}
        timer[0] = 0.0
        t0 = time.perf_counter()
        if sp is None:
            result = engine(batch["input_ids"], labels=batch["labels"])
            loss = result.loss
        else:
            shard = sp.shard(batch)
            with sp.sharded():
                result = engine(shard["input_ids"], labels=shard["labels"], positions=shard["positions"])
            loss, _ = sp.losses(result, shard)
        engine.backward(loss + result.aux_loss)
        engine.step()
        seconds.append((time.perf_counter() - t0, timer[0]))
        del result, loss
    growth = torch.tensor([float(rss_kib("VmHWM") - base)], dtype=torch.float64)
    torch.distributed.all_reduce(growth, op=torch.distributed.ReduceOp.MAX)
    step_s, exchange_s = (sum(x[i] for x in seconds[1:]) / (STEPS - 1) for i in (0, 1))  # first step warms up
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_kib": float(growth), "step_s": step_s, "exchange_s": exchange_s,
                                         "tokens": dp_size * seq_len}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(world: int, sp: int, seq_len: int) -> dict:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(_rank, args=(world, free_port(), sp, seq_len, str(out)), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(out.read_text())


def predict(world: int, sp: int, seq_len: int):
    from ondol.configs import load_config
    from ondol.launch.plan import plan_for_config
    from ondol.train.memory import BACKWARD

    plan = plan_for_config(load_config(CONFIG, overrides(world, sp, seq_len)), nodes=1, gpus_per_node=world)
    return plan.total, sum(plan.terms.get(k, 0) for k in BACKWARD)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args()
    T, MiB = args.seq_len, 2**20
    print(f"model: {CONFIG.name} with {' '.join(MODEL)}; rows of {T:,} tokens; {STEPS} steps "
          f"(os.cpu_count() {os.cpu_count()})")
    print(f"\nper-rank peak memory of one row ({T:,} tokens)")
    print(f"{'layout':<16} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7} {'transient pred.':>16} "
          f"{'transient meas.':>16}   load (1/5/15 min)")
    for world, sp in ((1, 1), (2, 2)):
        total, transient = predict(world, sp, T)
        peak = measure(world, sp, T)["peak_kib"] * 1024
        transient_measured = (peak - measure(world, sp, T // 16)["peak_kib"] * 1024) * 16 / 15
        print(f"{f'{world} rank(s) SP {sp}':<16} {total / MiB:>14.0f} {peak / MiB:>13.0f} "
              f"{(total - peak) / peak:>+7.1%} {transient / MiB:>16.0f} {transient_measured / MiB:>16.0f}   {load()}",
              flush=True)
    print(f"\ntraining speed on 2 workers, rows of {T:,} tokens")
    print(f"{'layout':<26} {'tokens/s':>9} {'ms/step':>8} {'all-to-all share':>17}   load (1/5/15 min)")
    for sp, name in ((1, "data-parallel 2 (SP 1)"), (2, "sequence-parallel 2")):
        got = measure(2, sp, T)
        print(f"{name:<26} {got['tokens'] / got['step_s']:>9,.0f} {1000 * got['step_s']:>8.0f} "
              f"{got['exchange_s'] / got['step_s']:>17.1%}   {load()}", flush=True)


if __name__ == "__main__":
    main()
