"""Tokenizer benchmark: train at 64k on the four shared corpora; held-out efficiency vs o200k; speed.

Each variant trains in a child process (for its own peak memory) on the four files of ../shared/corpora with
10% of each source's documents held out by text hash; efficiency is measured on those held-out documents.
Throughput encodes the same held-out text with Ondol, SentencePiece's own batch encoder, the exported
tokenizer.json and tiktoken's o200k. Timings on shared cores are indicative only.

  .venv/bin/python benchmarks/tokenizer_bench.py                        # the default tokenizer, vocab 64,000
  .venv/bin/python benchmarks/tokenizer_bench.py --variants default morpheme no_hangul_coverage jamo_off
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
TARGETS = {"ko_reviews": 2.0, "ko_docs": 1.5, "en_docs": 0.9, "code_python": 0.9}  # x o200k chars/token

# Korean options measured against the defaults (each changes one thing).
VARIANTS = {
    "default": {},
    "morpheme": {"morpheme_aware": True},
    "jamo_split": {"jamo_split": True},
    "no_jamo_coverage": {"jamo_coverage": False},
    "no_hangul_coverage": {"hangul_coverage": False},
    "all_hangul": {"hangul_syllables": "all"},
    "split_by_whitespace": {"split_by_whitespace": True},
    "split_by_script": {"split_by_script": True},
    "unigram": {"model_type": "unigram"},
}


def sources(weights: dict[str, float]):
    from ondol.data.config import SourceConfig

    return [SourceConfig(name=n, path=str(CORPORA / f"{n}.jsonl.gz"), weight=w) for n, w in weights.items()]


def _train_child(cfg, weights, out_dir, seed, queue) -> None:
    from ondol.tokenizer.train import train_tokenizer

    started = time.perf_counter()
    train_tokenizer(cfg, sources(weights), out_dir, seed)
    queue.put(
        {
            "train_s": time.perf_counter() - started,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )


def train_variant(cfg, weights, out_dir: Path, seed: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_child, args=(cfg, weights, out_dir, seed, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        sys.exit(f"training {out_dir} failed (exit {child.exitcode})")
    return result


def throughput(tok, texts: list[str], repeats: int) -> dict[str, float]:
    """MB/s of UTF-8 input for each encoder on the same texts (best of `repeats`)."""
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    sp = tok.sentencepiece
    hf = HFTokenizer.from_file(str(tok.directory / "tokenizer.json"))
    o200k = tiktoken.get_encoding("o200k_base")
    runs = {
        "ondol Tokenizer.encode_batch": lambda: tok.encode_batch(texts),
        "sentencepiece encode (batch, 2 threads)": lambda: sp.encode(texts, num_threads=2),
        "tokenizers tokenizer.json encode_batch": lambda: hf.encode_batch(texts, add_special_tokens=False),
        "tiktoken o200k encode_ordinary_batch (2 threads)": lambda: o200k.encode_ordinary_batch(
            texts, num_threads=2
        ),
    }
    mb = sum(len(t.encode()) for t in texts) / 1e6
    out = {}
    for name, run in runs.items():
        best = min(_timed(run) for _ in range(repeats))
        out[name] = mb / best
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    p.add_argument(
        "--weights",
        default="ko_reviews=0.55,ko_docs=0.15,en_docs=0.15,code_python=0.15",
        help="per-source sampling weights (share of training characters)",
    )
    p.add_argument("--eval-docs", type=int, default=100_000, help="held-out documents per source, at most")
    p.add_argument("--throughput-mb", type=float, default=8.0, help="MB of held-out text for the speed test")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-tokenizer")
    p.add_argument(
        "--json", type=Path, default=None, help="write every figure here (default: OUT/results.json)"
    )
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    import os

    from rich.console import Console
    from rich.table import Table

    from ondol.tokenizer.config import TokenizerConfig
    from ondol.tokenizer.evaluate import evaluate, evaluation_texts, load_encoder, table
    from ondol.tokenizer.tokenizer import Tokenizer

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "baselines" / "tiktoken_cache"))
    console = Console(width=150)
    weights = {k: float(v) for k, v in (item.split("=") for item in args.weights.split(","))}
    held_out = evaluation_texts(sources(weights), args.holdout, args.eval_docs)
    console.print("held-out documents: " + ", ".join(f"{k} {len(v):,}" for k, v in held_out.items()))
    o200k = load_encoder("o200k")

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    for name in args.variants:
        cfg = dataclasses.replace(
            TokenizerConfig(
                vocab_size=args.vocab, max_sentences=args.max_sentences, holdout_fraction=args.holdout
            ),
            **VARIANTS[name],
        )
        out_dir = args.out / f"{name}-v{args.vocab}-s{args.max_sentences}"
        console.rule(f"variant {name}: {VARIANTS[name] or 'defaults'}")
        cost = (
            train_variant(cfg, weights, out_dir, args.seed) if not (out_dir / "meta.json").is_file() else {}
        )
        tok = Tokenizer.load(out_dir)
        cost.setdefault("train_s", tok.meta["train_seconds"])
        report = evaluate([load_encoder(str(out_dir)), o200k], held_out)
        console.print(table(report, f"{name}: held-out documents, vocab {tok.vocab_size:,}"))
        results["variants"][name] = {"cost": cost, "report": report}

    summary = Table(
        title="x o200k chars/token on held-out documents vs targets (timings on shared cores: indicative)"
    )
    summary.add_column("variant")
    for s, target in TARGETS.items():
        summary.add_column(f"{s} (>= {target})", justify="right")
    summary.add_column("rt fail", justify="right")
    summary.add_column("train s (< 180)", justify="right")
    summary.add_column("peak GiB", justify="right")
    for name, r in results["variants"].items():
        rows = [row for row in r["report"]["rows"] if not row["tokenizer"].startswith("o200k")]
        ratio = {row["source"]: row["ratio_vs_baseline"] for row in rows}
        summary.add_row(
            name,
            *[f"{ratio.get(s, float('nan')):.3f}" for s in TARGETS],
            str(sum(row["round_trip_failures"] for row in rows)),
            f"{r['cost']['train_s']:.1f}",
            f"{r['cost'].get('peak_rss_gib', float('nan')):.2f}",
        )
    console.print(summary)

    first = Tokenizer.load(args.out / f"{args.variants[0]}-v{args.vocab}-s{args.max_sentences}")
    texts, size = [], 0
    for source_texts in held_out.values():  # an equal share of bytes from every source
        share = 0
        for t in source_texts:
            if share >= args.throughput_mb * 1e6 / len(held_out):
                break
            texts.append(t)
            share += len(t.encode())
        size += share
    speed = throughput(first, texts, repeats=2)
    st = Table(title=f"encode throughput on {size / 1e6:.1f} MB of held-out text (shared cores: indicative)")
    st.add_column("encoder")
    st.add_column("MB/s", justify="right")
    for name, mbs in speed.items():
        st.add_row(name, f"{mbs:.2f}")
    console.print(st)
    results["throughput_mb_s"] = speed

    out = args.json or args.out / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
