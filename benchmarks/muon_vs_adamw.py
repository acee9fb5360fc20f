"""Muon against AdamW on real Korean text: held-out bits per byte at equal tokens, the tokens Muon needs to reach
AdamW's best final bits per byte, wall time per step and the Newton-Schulz share of a step; and the
Newton-Schulz FLOPs of K-EXAONE-236B's shapes as a share of a training step's FLOPs.

Each optimizer trains configs/tiny-ko.yaml's model and data (its tokenizer and prepared data are built once into
--work) for the same steps, tokens and WSD schedule, at each learning rate of --lrs and each seed of --seeds; the
same lr grid serves both, as Muon's update is scaled to AdamW's RMS (train/optim.py). Bits per byte are the
trainer's own held-out evaluation (train.eval_bpb_tokens per source) every --eval-every steps, averaged over
seeds. "tokens to AdamW's best" interpolates Muon's curve (best lr) where it first reaches AdamW's best final
bits per byte; under WSD most of the last drop comes in the decay, so the full-length curve crosses late: the
direct check is Muon trained for --short of the steps with its own WSD decay, against AdamW's best at full
length. Wall times are medians of the logged ms/step; the machine's load average is printed beside them.

  .venv/bin/python benchmarks/muon_vs_adamw.py --work /tmp/muon-bench              # tiny-ko, 2 lrs x 2 seeds
  .venv/bin/python benchmarks/muon_vs_adamw.py --work /tmp/muon-bench --preset moe-80m --steps 2000 \\
      --lrs 1e-3,2e-3,4e-3 --seeds 1,2,3                                           # the 83M-parameter MoE
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-ko.yaml"
K_EXAONE = ROOT / "configs" / "k-exaone-236b.yaml"
# model overrides of configs/tiny-ko.yaml; moe-13m: 6 layers, d_model 256, 8 experts top-2 + 1 shared (12.7M);
# moe-80m: 8 layers, d_model 512, 16 experts top-2 + 1 shared (83.1M)
PRESETS = {
    "tiny-ko": [],
    "moe-13m": ["model.d_model=256", "model.n_layers=6", "model.attn_pattern=LLG", "model.n_heads=4",
                "model.n_kv_heads=2", "model.head_dim=64", "model.ffn_hidden=768", "model.n_experts=8",
                "model.expert_hidden=256", "model.window=128"],
    "moe-80m": ["model.d_model=512", "model.n_layers=8", "model.attn_pattern=LLLG", "model.n_heads=8",
                "model.n_kv_heads=4", "model.head_dim=64", "model.ffn_hidden=1536", "model.n_experts=16",
                "model.expert_hidden=384", "model.window=128"],
}


def prepare(work: Path) -> Path:
    """tiny-ko's tokenizer and data, once (both commands reuse finished work)."""
    base = work / "base"
    for command in (("tokenizer", "train"), ("data", "prepare")):
        subprocess.run([sys.executable, "-m", "ondol.launch.cli", *command, str(CONFIG), f"run_dir={base}"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return base


def train(base: Path, run: Path, overrides: list[str]) -> list[dict]:
    """One run in this process, on the prepared data; its metrics records."""
    from ondol.configs import load_config
    from ondol.train.metrics import read_metrics
    from ondol.train.trainer import Trainer

    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to(base / "data", target_is_directory=True)
    cfg = load_config(CONFIG, [f"run_dir={run}", f"tokenizer.path={base / 'tokenizer'}", "train.resume=never",
                               "logging.progress=false", *overrides])
    Trainer(cfg).fit()
    return read_metrics(run / "metrics.jsonl")


def curve(records: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """(step, {source: bits per byte}) of each evaluation."""
    return [(r["step"], {k[4:]: v for k, v in r.items() if k.startswith("bpb/")}) for r in records if "bpb/all" in r]


def mean_curve(curves: list[list[tuple[int, dict]]]) -> list[tuple[int, dict[str, float]]]:
    return [(steps[0][0], {k: statistics.mean(c[1][k] for c in steps) for k in steps[0][1]})
            for steps in zip(*curves)]


def first_crossing(points: list[tuple[int, dict]], target: float) -> float | None:
    """The step (linearly interpolated) where bits per byte (all) first reach `target`; None if never."""
    for (s0, a), (s1, b) in itertools.pairwise(points):
        if b["all"] <= target:
            return s0 + (s1 - s0) * (a["all"] - target) / (a["all"] - b["all"]) if a["all"] > target else s0
    return None


def newton_schulz_share(overrides: list[str], step_ms: float, repeats: int = 5) -> float:
    """One step's orthogonalisations (every Muon matrix of the model, batched as train/optim.py does) as a share
    of `step_ms`."""
    import torch

    from ondol.configs import load_config
    from ondol.model.transformer import Transformer
    from ondol.train.optim import muon_matrices, muon_updates

    cfg = load_config(CONFIG, overrides)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # the AdamW-side tables; Muon's matrices do not depend on it
    with torch.device("meta"):
        model = Transformer(cfg.model)
    momenta = [torch.randn(p.shape) for p in muon_matrices(model)]
    muon_updates(momenta, cfg.optim.muon_ns_steps)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        muon_updates(momenta, cfg.optim.muon_ns_steps)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / step_ms


def newton_schulz_flops(cfg) -> tuple[float, float]:
    """(Newton-Schulz FLOPs of one optimizer step over every Muon matrix, once each; a training step's model
    FLOPs) for a run config. An [A, B] matrix (A <= B) costs per iteration 2 A^2 B (X X^T) + 2 A^3 (its square)
    + 2 A^2 B (times X)."""
    import torch

    from ondol.model.flops import train_flops_per_token
    from ondol.model.transformer import Transformer
    from ondol.train.optim import muon_matrices

    with torch.device("meta"):
        model = Transformer(cfg.model)
    ns = 0.0
    for p in muon_matrices(model):
        a, b = sorted(p.shape[-2:])
        ns += p.numel() // (a * b) * cfg.optim.muon_ns_steps * (4 * a * a * b + 2 * a ** 3)
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * world * cfg.data.seq_len
    return ns, train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="keep the tokenizer, data and runs here (default: a temp dir)")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny-ko")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--lrs", default="3e-3,6e-3", help="comma-separated peak learning rates, for both")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--short", type=float, default=0.75,
                        help="Muon's shorter run, as a share of --steps (0: none)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.eval_bpb_tokens=4096")
    args = parser.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    console = Console(width=None if sys.stdout.isatty() else 140)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        base = prepare(work)
        load_before = os.getloadavg()[0]

        def run(name: str, steps: int, *overrides: str) -> list[dict]:
            return train(base, work / args.preset / name, [
                *PRESETS[args.preset], f"train.steps={steps}", f"train.eval_every={args.eval_every}",
                f"train.save_every={steps}", "train.log_every=10", "train.eval_batches=1", "optim.schedule=wsd",
                f"optim.warmup_steps={max(1, steps // 10)}", *args.overrides, *overrides])

        results: dict[tuple[str, float], dict] = {}
        for name in ("adamw", "muon"):
            for lr in lrs:
                runs = [run(f"{name}-{lr:g}-s{seed}", args.steps, f"optim.name={name}", f"optim.lr={lr}",
                            f"seed={seed}") for seed in seeds]
                ms = statistics.median(r["ms_per_step"] for recs in runs for r in recs[1:] if "ms_per_step" in r)
                results[name, lr] = {"curve": mean_curve([curve(r) for r in runs]), "ms": ms}
        best = {name: min((lr for n, lr in results if n == name), key=lambda lr: results[name, lr]["curve"][-1][1]["all"])
                for name in ("adamw", "muon")}
        target = results["adamw", best["adamw"]]["curve"][-1][1]["all"]
        short_steps = round(args.short * args.steps)
        short = mean_curve([curve(run(f"muon-short-{best['muon']:g}-s{seed}", short_steps, "optim.name=muon",
                                      f"optim.lr={best['muon']}", f"seed={seed}")) for seed in seeds]) \
            if short_steps else None
        load_after = os.getloadavg()[0]
        muon_ms = results["muon", best["muon"]]["ms"]
        ns_share = newton_schulz_share(PRESETS[args.preset], muon_ms)

    from ondol.configs import load_config

    tokens_per_step = 8 * 256  # tiny-ko: micro-batch 8 x 256 tokens, one rank
    sources = list(results["adamw", lrs[0]]["curve"][-1][1])
    table = Table(title=f"{args.preset}: {args.steps} steps ({args.steps * tokens_per_step / 1e6:.2f}M tokens), "
                        f"WSD, seeds {args.seeds}; held-out bits per byte (mean over seeds) at the end")
    for col in ("optimizer", "lr", *sources, "ms/step"):
        table.add_column(col, justify="right")
    for (name, lr), r in results.items():
        mark = " *" if best[name] == lr else ""
        table.add_row(name + mark, f"{lr:g}", *(f"{r['curve'][-1][1][s]:.4f}" for s in sources), f"{r['ms']:.0f}")
    if short:
        table.add_row(f"muon, {short_steps} steps", f"{best['muon']:g}", *(f"{short[-1][1][s]:.4f}" for s in sources),
                      "")
    console.print(table)
    muon_curve = results["muon", best["muon"]]["curve"]
    crossing = first_crossing(muon_curve, target)
    equal = Table(title="bits per byte (all) at equal tokens, best lr of each (*)")
    for col in ("step", "tokens", "adamw", "muon"):
        equal.add_column(col, justify="right")
    for (step, a), (_, m) in zip(results["adamw", best["adamw"]]["curve"], muon_curve):
        equal.add_row(str(step), f"{step * tokens_per_step / 1e6:.2f}M", f"{a['all']:.4f}", f"{m['all']:.4f}")
    console.print(equal)
    reach = "never within the run" if crossing is None else \
        f"step {crossing:.0f} ({crossing / args.steps:.0%} of AdamW's tokens)"
    console.print(f"AdamW's best final bits per byte {target:.4f}; Muon's full-length curve reaches it at {reach}" +
                  (f"; Muon trained for {args.short:.0%} of the tokens ends at {short[-1][1]['all']:.4f} "
                   f"({'reaches' if short[-1][1]['all'] <= target else 'misses'} it)" if short else ""))
    console.print(f"Newton-Schulz: {ns_share:.1%} of a Muon step ({muon_ms:.0f} ms/step, CPU fp32); "
                  f"load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores")
    k = load_config(K_EXAONE)
    ns, step = newton_schulz_flops(k)
    console.print(f"K-EXAONE-236B ({K_EXAONE.name}): Newton-Schulz {ns / 1e15:.1f} PFLOP per optimizer step (each "
                  f"matrix once, {k.optim.muon_ns_steps} iterations) vs {step / 1e15:.1f} PFLOP of model FLOPs per "
                  f"step: {ns / step:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
