"""`ondol plan`'s memory prediction against the peak memory per rank of real CPU (gloo) training runs.

Each layout runs `world` processes through the trainer's own engine path (train/engine.py: init_distributed,
expert parallelism, DeepSpeed with GuardedAdamW) on a 47M-parameter MoE (configs/tiny-ko.yaml with the
model widened below; fp32, as CPU runs are), for a few optimizer steps on real Korean text (UTF-8 bytes), and
reports the largest per-rank peak next to train/memory.py's total for the same layout.

What "peak memory" is on CPU: the growth of the process's resident set (VmHWM in /proc/self/status) over its
resident set just before the model is built (after torch, DeepSpeed and the process group are up). The high-water
mark is reset (`echo 5 > /proc/self/clear_refs`) once the engine is built, so the peak is that of training:
DeepSpeed's flattening copies at start-up are not counted (the plan is about steady training). The build itself
(the trainer's build_model: meta device, this rank's experts, ZeRO 3 under zero.Init) is reported on its own, as
the peak growth up to the built model next to the whole fp32 model's size: at ZeRO 3 about 1/world of it.
Counted: weights, gradients, optimizer state, DeepSpeed's buffers, activations, logits, allocator slack that
stays resident. Not counted: pages reserved but never touched (RSS counts touched pages only: a bucket that is
allocated but only partly filled counts for what is filled), memory freed back to the system before the peak.
glibc is told to hand large blocks straight back (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS
as they leave a GPU allocator's live bytes.

    .venv/bin/python benchmarks/plan_vs_measured.py                     # the layouts below, 4 ranks
    .venv/bin/python benchmarks/plan_vs_measured.py --layouts 1:0:1 4:2:4   # world:zero:ep
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ondol.launch.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-ko.yaml"
MODEL = ["model.vocab_size=4096", "model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=2",
         "model.head_dim=64", "model.ffn_hidden=1536", "model.n_experts=16", "model.top_k=2",
         "model.expert_hidden=512", "model.moe_dispatch=grouped_mm", "deepspeed.precision=fp32",
         "train.micro_batch_size=4", "data.seq_len=256"]
LAYOUTS = ["4:0:1", "4:1:1", "4:2:1", "4:3:1", "4:0:2", "4:1:2", "4:2:2", "4:0:4", "4:1:4", "4:2:4"]
STEPS = 3


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def overrides(world: int, zero: int, ep: int) -> list[str]:
    return [*MODEL, f"deepspeed.zero_stage={zero}", f"deepspeed.expert_parallel_size={ep}",
            f"launch.gpus_per_node={world}"]


def _rank(rank: int, world: int, port: int, layout: tuple[int, int, int], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from model_fwd_bwd import korean_batch  # real-text batches (this script's folder)

    from ondol.configs import load_config
    from ondol.train.engine import build_engine, build_model, init_distributed

    cfg = load_config(CONFIG, overrides(*layout))
    env = init_distributed(cfg)
    tr = cfg.train
    ids, labels = korean_batch(STEPS * world * tr.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    ids, labels = (t.view(STEPS, world, tr.micro_batch_size, -1)[:, rank] for t in (ids, labels))
    torch.distributed.barrier()
    base = rss_kib("VmRSS")
    model = build_model(cfg, env)
    built = torch.tensor([float(rss_kib("VmHWM") - base)], dtype=torch.float64)
    engine, _ = build_engine(model, cfg, env)
    Path("/proc/self/clear_refs").write_text("5")  # peak from here: training, not construction
    for step in range(STEPS):
        result = engine(ids[step], labels=labels[step])
        engine.backward(result.loss + result.aux_loss)
        engine.step()
        del result
    peak = rss_kib("VmHWM")
    growth = torch.tensor([float(peak - base)], dtype=torch.float64)
    for t in (growth, built):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_kib": float(growth), "build_kib": float(built),
                                         "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(world: int, zero: int, ep: int) -> tuple[float, float]:
    """Largest per-rank peak RSS growth (bytes) of a run of this layout: while training, and while building."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        mp.start_processes(_rank, args=(world, free_port(), (world, zero, ep), str(out)), nprocs=world, join=True,
                           start_method="spawn")
        got = json.loads(out.read_text())
        return got["peak_kib"] * 1024, got["build_kib"] * 1024


def predict(world: int, zero: int, ep: int):
    from ondol.configs import load_config
    from ondol.launch.plan import plan_for_config

    return plan_for_config(load_config(CONFIG, overrides(world, zero, ep)), nodes=1, gpus_per_node=world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS, help="WORLD:ZERO:EP entries")
    args = parser.parse_args()
    print(f"model: {CONFIG.name} with {' '.join(MODEL)}; {STEPS} steps")
    print(f"{'layout':<22} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7} {'build MiB':>10} "
          f"{'fp32 model MiB':>15}   largest term")
    for item in args.layouts:
        world, zero, ep = (int(x) for x in item.split(":"))
        plan = predict(world, zero, ep)
        measured, built = measure(world, zero, ep)
        name, _ = plan.largest
        print(f"{f'{world} ranks ZeRO {zero} EP {ep}':<22} {plan.total / 2**20:>14.0f} {measured / 2**20:>13.0f} "
              f"{(plan.total - measured) / measured:>+7.1%} {built / 2**20:>10.0f} "
              f"{plan.params.total * 4 / 2**20:>15.0f}   {name}", flush=True)


if __name__ == "__main__":
    main()
