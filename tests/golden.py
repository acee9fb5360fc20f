"""Golden losses: the first 50 steps of a tiny run on real text, checked in CI (tests/golden/) to rel. 1e-5.

The run is configs/tiny-ko.yaml shrunk to seconds: a 2,048-piece tokenizer and packed data from a few thousand
real documents (built here with the tokenizer and data APIs; the trainer tests share them), micro-batches of
4 x 64 tokens, fp32 on CPU, ZeRO 0. Experts run through the `loop` dispatch, pinned so that a change of
the fastest-kernel default (which rounds differently) does not move the golden losses.

  python tests/golden.py --regenerate     # on purpose: after a change that is meant to move the losses
  python tests/golden.py                  # compare a fresh run with the stored file
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from ondol.configs import RunConfig, load_config
from ondol.data.config import SourceConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_losses.json"
GOLDEN_STEPS = 50
REL_TOL = 1e-5
SOURCES = (("ko_reviews", 2500, 0.6), ("ko_docs", 500, 0.4))  # name, documents, mixture weight


def tiny_config(run_dir: Path, assets: Path, *overrides: str) -> RunConfig:
    """configs/tiny-ko.yaml at test size, reading the tokenizer and data built by `build_assets(assets)`."""
    cfg = load_config(ROOT / "configs" / "tiny-ko.yaml", [
        f"run_dir={run_dir}", f"tokenizer.path={assets / 'tokenizer'}", "tokenizer.vocab_size=2048", "tokenizer.character_coverage=0.995",
        "tokenizer.hangul_coverage=false", "tokenizer.max_sentences=20000", "data.seq_len=64",
        "data.num_proc=1", "model.moe_dispatch=loop", "train.steps=50", "train.micro_batch_size=4", "train.log_every=1",
        "train.eval_every=25", "train.eval_batches=2", "train.save_every=25", "optim.warmup_steps=10",
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


def compare(losses: list[float], golden: list[float]) -> list[str]:
    """Steps whose loss differs from the golden one by more than REL_TOL (empty: all match)."""
    bad = [f"step {i + 1}: {a!r} vs golden {b!r}" for i, (a, b) in enumerate(zip(losses, golden))
           if not math.isclose(a, b, rel_tol=REL_TOL)]
    if len(losses) != len(golden):
        bad.append(f"{len(losses)} losses vs {len(golden)} golden")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/golden.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help=f"overwrite {GOLDEN.relative_to(ROOT)}")
    parser.add_argument("--work-dir", help="where to build the tokenizer, data and run (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        assets = build_assets(work / "assets")
        losses = run_losses(work / "run", assets)
        identity = assets_identity(assets)
    if args.regenerate:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        record = {"steps": GOLDEN_STEPS, "rel_tol": REL_TOL, **identity, "losses": losses}
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {len(losses)} losses to {GOLDEN}")
        return 0
    bad = compare(losses, json.loads(GOLDEN.read_text(encoding="utf-8"))["losses"])
    print("\n".join(bad) if bad else f"all {len(losses)} losses match {GOLDEN} (rel. tol. {REL_TOL})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
