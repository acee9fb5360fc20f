"""Golden losses: the first 50 steps of a tiny run on real text, checked in CI (tests/golden/) on any x86-64 CPU.

The run is configs/tiny-ko.yaml shrunk to seconds: a 2,048-piece tokenizer and packed data from a few thousand
real documents (built here with the tokenizer and data APIs; the trainer tests share them), micro-batches of
4 x 64 tokens, fp32 on CPU, ZeRO 0. Experts run through the `loop` dispatch, pinned so that a change of
the fastest-kernel default (which rounds differently) does not move the golden losses.

Why a tolerance, and which. CPUs differ in the kernels torch picks (scalar, AVX2, AVX-512, AVX-512 FP16), and so
in the order of fp32 sums: the same run starts apart by a few fp32 ulps (about 6e-8 relative) and training
amplifies the gap step by step. How fast depends on the run: with tiny-ko's own Adam eps (1e-8) and no tight
clipping, starved experts' near-zero gradients are magnified to full-size updates and a gradient spike (grad norm
75 at step 23) turns a 5e-5 gap into 1e-3 within a step, so no tolerance both passes on every CPU and still
catches a real change. The golden run therefore trains with Adam's eps at 1e-4 and clipping at 0.5
(`STABLE_OPTIM`, also the trainer tests' reference runs): there the gap between the scalar and the AVX2 kernels
stays under 4e-6 over 50 steps. The tolerance is SAFETY x the largest relative spread measured at any step,
across the kernel variants this CPU has (ATEN_CPU_CAPABILITY default/avx2/avx512) x 1 and 2 threads and the
losses stored from other machines, and never below FLOOR (2^-20 ~ 1e-6, a few fp32 ulps of a mean loss). One
bound for every step, not a per-step envelope: the largest gaps come from discrete events (a token's expert
choice flips), which another CPU may meet at another step. SAFETY (8) leaves room for a CPU whose rounding
differences are 8x larger than those seen. A CPU that still drifts further: run `--measure-drift` there; it
widens the stored spread with what it measures, keeping the losses.

  python tests/golden.py --regenerate      # on purpose: after a change meant to move the losses (then drift)
  python tests/golden.py --measure-drift   # on a new CPU: measure its spread and widen the tolerance
  python tests/golden.py                   # compare a fresh run with the stored file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from ondol.configs import RunConfig, load_config
from ondol.data.config import SourceConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_losses.json"
GOLDEN_STEPS = 50
STABLE_OPTIM = ("optim.eps=1e-4", "optim.grad_clip=0.5")  # bounded amplification of rounding: module doc
SAFETY = 8
FLOOR = 2.0 ** -20
CAPABILITIES = ("default", "avx2", "avx512")  # ATEN_CPU_CAPABILITY values, in order; a CPU runs those up to its own
SOURCES = (("ko_reviews", 2500, 0.6), ("ko_docs", 500, 0.4))  # name, documents, mixture weight


def tiny_config(run_dir: Path, assets: Path, *overrides: str) -> RunConfig:
    """configs/tiny-ko.yaml at test size, reading the tokenizer and data built by `build_assets(assets)`."""
    cfg = load_config(ROOT / "configs" / "tiny-ko.yaml", [
        f"run_dir={run_dir}", f"tokenizer.path={assets / 'tokenizer'}", "tokenizer.vocab_size=2048", "tokenizer.character_coverage=0.995",
        "tokenizer.hangul_coverage=false", "tokenizer.max_sentences=20000",
        "tokenizer.holdout_fraction=0",  # the golden tokenizer trains on every document (its pinned fingerprint)
        "data.seq_len=64",
        "data.num_proc=1", "model.moe_dispatch=loop", "train.steps=50", "train.micro_batch_size=4", "train.log_every=1",
        "train.eval_every=25", "train.eval_batches=2", "train.save_every=25", "optim.warmup_steps=10",
        "train.cpu_threads=2",  # not auto, which follows the load: tests compare runs bit for bit
        "logging.progress=false", "logging.wandb_mode=disabled", *overrides])
    corpora = Path(cfg.corpora_dir)
    cfg.data.sources = [SourceConfig(name=n, path=str(corpora / f"{n}.jsonl.gz"), max_docs=k, weight=w)
                        for n, k, w in SOURCES]
    return cfg


def build_assets(assets: Path) -> Path:
    """Train the tokenizer and prepare the data once into `assets` (both reuse finished work)."""
    from ondol.data.preparation import prepare
    from ondol.tokenizer.train import train_tokenizer

    cfg = tiny_config(assets / "unused", assets)
    tok = train_tokenizer(cfg.tokenizer, cfg.data.sources, assets / "tokenizer", cfg.seed)
    prepare(cfg.data, tok, assets / "data", cfg.seed, progress=False)
    return assets


def link_data(run_dir: Path, assets: Path) -> None:
    """A run directory reading the shared prepared data (data_dir(cfg) is always RUN_DIR/data)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data").exists():
        (run_dir / "data").symlink_to(assets / "data", target_is_directory=True)


def run_losses(run_dir: Path, assets: Path, *overrides: str) -> list[float]:
    """Train the golden config and return the loss of each step, from metrics.jsonl."""
    from ondol.train.metrics import read_metrics
    from ondol.train.trainer import Trainer

    link_data(run_dir, assets)
    Trainer(tiny_config(run_dir, assets, f"train.steps={GOLDEN_STEPS}", *overrides)).fit()
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def assets_identity(assets: Path) -> dict:
    """What the losses depend on besides the trainer and model: the tokenizer and the prepared data."""
    from ondol.data.shards import read_manifest

    meta = json.loads((assets / "tokenizer" / "meta.json").read_text(encoding="utf-8"))
    return {"tokenizer_fingerprint": meta["fingerprint"], "data_hash": read_manifest(assets / "data")["hash"]}


def golden_losses(run_dir: Path, assets: Path, *overrides: str) -> list[float]:
    """The golden run's losses on this machine."""
    return run_losses(run_dir, assets, *STABLE_OPTIM, *overrides)


def compare(losses: list[float], golden: list[float], rel_tol: float) -> list[str]:
    """Steps whose loss differs from the golden one by more than the tolerance (empty: all match)."""
    bad = [f"step {i + 1}: {a!r} vs golden {b!r} (rel. diff {abs(a - b) / abs(b):.1e} > {rel_tol:.1e})"
           for i, (a, b) in enumerate(zip(losses, golden)) if not math.isclose(a, b, rel_tol=rel_tol)]
    if len(losses) != len(golden):
        bad.append(f"{len(losses)} losses vs {len(golden)} golden")
    return bad


def cpu_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run: every level up to the one torch picks by default."""
    import torch

    own = torch.backends.cpu.get_cpu_capability().lower()
    levels = list(CAPABILITIES)
    return levels[:levels.index(own) + 1] if own in levels else levels[:1] + [own]


def spread(runs: list[list[float]]) -> list[float]:
    """Per step, the largest relative difference between any two runs."""
    return [(max(step) - min(step)) / abs(min(step)) for step in zip(*runs)]




def measure_drift(work: Path) -> tuple[list[list[float]], list[str]]:
    """The golden run once per kernel variant and thread count, each in its own process (the capability is
    read when torch loads); the runs' losses and their names."""
    runs, names = [], []
    for capability in cpu_capabilities():
        for threads in (1, 2):
            name = f"{capability}-{threads}t"
            out = work / f"{name}.json"
            env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
            subprocess.run([sys.executable, __file__, "--work-dir", str(work), "--losses-to", str(out),
                            "--threads", str(threads)], env=env, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text(encoding="utf-8")))
            names.append(name)
            print(f"{name}: {len(runs[-1])} losses", file=sys.stderr)
    return runs, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/golden.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true",
                        help=f"overwrite {GOLDEN.relative_to(ROOT)} with this machine's losses and drift")
    parser.add_argument("--measure-drift", action="store_true",
                        help="keep the stored losses; widen their tolerance by this machine's spread")
    parser.add_argument("--work-dir", help="where to build the tokenizer, data and runs (default: a temp dir)")
    parser.add_argument("--losses-to", help=argparse.SUPPRESS)  # one run's losses as JSON (measure_drift's runs)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)  # that run's train.cpu_threads
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        assets = build_assets(work / "assets")
        identity = assets_identity(assets)
        if args.losses_to:
            run = work / f"run-{Path(args.losses_to).stem}"
            losses = golden_losses(run, assets, f"train.cpu_threads={args.threads}")
            Path(args.losses_to).write_text(json.dumps(losses), encoding="utf-8")
            return 0
        if args.regenerate or args.measure_drift:
            return record(work, identity, regenerate=args.regenerate)
        losses = golden_losses(work / "run", assets)
    stored = json.loads(GOLDEN.read_text(encoding="utf-8"))
    bad = compare(losses, stored["losses"], stored["rel_tol"])
    print("\n".join(bad) if bad else f"all {len(losses)} losses match {GOLDEN} within their tolerance")
    return 1 if bad else 0


def record(work: Path, identity: dict, regenerate: bool) -> int:
    """Measure this machine's spread and write the golden file: new losses (regenerate) or the stored ones with
    the envelope widened by what this machine measures."""
    runs, names = measure_drift(work)
    machine = f"{platform.processor() or platform.machine()} {_cpu_model()}".strip()
    if regenerate:
        golden = {"steps": GOLDEN_STEPS, **identity, "losses": runs[names.index(f"{cpu_capabilities()[-1]}-2t")],
                  "max_spread": spread(runs), "measured_on": [machine]}
    else:
        golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
        if {k: golden[k] for k in identity} != identity:
            print("the tokenizer or data now differ from the golden file's: use --regenerate", file=sys.stderr)
            return 1
        here = spread([*runs, golden["losses"]])
        golden["max_spread"] = [max(a, b) for a, b in zip(golden["max_spread"], here)]
        golden["measured_on"] = sorted({*golden["measured_on"], machine})
    golden["rel_tol"] = max(FLOOR, SAFETY * max(golden["max_spread"]))
    golden["tolerance"] = (f"rel_tol = max({FLOOR:.3g}, {SAFETY} x max(max_spread)); max_spread: the largest "
                           f"relative gap at each step between runs under ATEN_CPU_CAPABILITY x 1/2 threads and "
                           f"the stored losses, on the machines in measured_on (tests/golden.py)")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: largest spread {max(golden['max_spread']):.1e} over {', '.join(names)}; "
          f"tolerance {golden['rel_tol']:.1e}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
