"""Tokenizer benchmark: the real-scale config (configs/ko-64k.yaml) and variants of it; held-out efficiency
vs o200k per source; training time and peak memory; encode speed.

Each variant trains in a child process (for its own peak memory) on the config's sources with its
holdout_fraction (10%) of each source's documents held out by text hash; efficiency is measured on those
held-out documents. A source given weight 0 is left out of training entirely and measured on the same
held-out documents (Korean of an unseen source: generalisation, not memorisation). Throughput encodes
the same held-out text one text a call and as one batch with Ondol, SentencePiece's own encoder, the
exported tokenizer.json and tiktoken's o200k. Timings on shared cores are indicative only.

  .venv/bin/python benchmarks/tokenizer_bench.py                                 # configs/ko-64k.yaml
  .venv/bin/python benchmarks/tokenizer_bench.py --weights ko_law=0             # ko_law left out of training
  .venv/bin/python benchmarks/tokenizer_bench.py --variants default split_by_whitespace
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
TARGET_REVIEWS, TARGET_KOREAN, TARGET_UNSEEN_KOREAN, TARGET_OTHER = 2.0, 1.5, 1.4, 0.9  # x o200k chars/token

# Options measured against the config (each changes one thing).
VARIANTS = {
    "default": {},
    "morpheme": {"morpheme_aware": True},
    "jamo_split": {"jamo_split": True},
    "no_jamo_coverage": {"jamo_coverage": False},
    "no_hangul_coverage": {"hangul_coverage": False},
    "all_hangul": {"hangul_syllables": "all"},
    "split_by_whitespace": {"split_by_whitespace": True, "superword_share": 0.0},  # plain subwords
    "one_phase": {"superword_share": 0.0},  # SentencePiece alone, pieces may cross spaces from the start
    "superword_0.1": {"superword_share": 0.1},
    "superword_0.2": {"superword_share": 0.2},
    "superword_0.3": {"superword_share": 0.3},
    "split_by_script": {"split_by_script": True},
    "unigram": {"model_type": "unigram"},
    "coverage_0.9999": {"character_coverage": 0.9999},
    "no_split_digits": {"split_digits": False},
    "split_digits": {"split_digits": True},
    "no_symbol_coverage": {"symbol_coverage": False},
    "max_piece_8": {"max_piece_chars": 8},
    "max_piece_24": {"max_piece_chars": 24},
    "chars_20M": {"max_chars": 20_000_000},
    "chars_60M": {"max_chars": 60_000_000},
}


def target(source: str, weight: float) -> float:
    if not source.startswith("ko_"):
        return TARGET_OTHER
    if weight == 0:
        return TARGET_UNSEEN_KOREAN
    return TARGET_REVIEWS if source == "ko_reviews" else TARGET_KOREAN


def _train_child(cfg, sources, out_dir, seed, queue) -> None:
    from ondol.tokenizer.train import train_tokenizer

    started = time.perf_counter()
    train_tokenizer(cfg, sources, out_dir, seed)
    # SentencePiece trains in a forked child of this process, which shares the sample: the larger of the two
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    queue.put({"train_s": time.perf_counter() - started, "peak_rss_gib": peak / 2**20})


def train_variant(cfg, sources, out_dir: Path, seed: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_child, args=(cfg, sources, out_dir, seed, queue))
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
        "ondol Tokenizer.encode (one text a call)": lambda: [tok.encode(t) for t in texts],
        "sentencepiece encode (one text a call)": lambda: [sp.encode(t) for t in texts],
        "tiktoken o200k encode_ordinary (one text a call)": lambda: [o200k.encode_ordinary(t) for t in texts],
        "ondol Tokenizer.encode_batch": lambda: tok.encode_batch(texts),
        "sentencepiece encode (batch, 2 threads)": lambda: sp.encode(texts, num_threads=2),
        "tokenizers tokenizer.json encode_batch": lambda: hf.encode_batch(texts, add_special_tokens=False),
        "tiktoken o200k encode_ordinary_batch (2 threads)": lambda: o200k.encode_ordinary_batch(
            texts, num_threads=2
        ),
    }
    mb = sum(len(t.encode()) for t in texts) / 1e6
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):  # interleaved, so a busy moment on shared cores hits every encoder alike
        for name, run in runs.items():
            best[name] = min(best[name], _timed(run))
    return {name: mb / t for name, t in best.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "ko-64k.yaml")
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    p.add_argument(
        "--weights",
        default="",
        help="per-source weight overrides, e.g. ko_law=0,ko_reviews=0.5 (0: left out of training, measured)",
    )
    p.add_argument("--eval-docs", type=int, default=100_000, help="held-out documents per source, at most")
    p.add_argument("--throughput-mb", type=float, default=4.0, help="MB of held-out text for the speed test")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-tokenizer")
    p.add_argument(
        "--json", type=Path, default=None, help="write every figure here (default: OUT/results.json)"
    )
    args = p.parse_args()

    import os

    from rich.console import Console
    from rich.table import Table

    from ondol.configs import load_config
    from ondol.tokenizer.evaluate import evaluate, evaluation_texts, load_encoder, table
    from ondol.tokenizer.tokenizer import Tokenizer

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "baselines" / "tiktoken_cache"))
    console = Console(width=150)
    run = load_config(args.config)
    overrides = {k: float(v) for k, v in (item.split("=") for item in args.weights.split(",") if item)}
    unknown = set(overrides) - {s.name for s in run.data.sources}
    if unknown:
        sys.exit(f"--weights names sources {sorted(unknown)} that {args.config} does not have")
    sources = [dataclasses.replace(s, weight=overrides.get(s.name, s.weight)) for s in run.data.sources]
    weights = {s.name: s.weight for s in sources}
    holdout = run.tokenizer.holdout_fraction
    held_out = evaluation_texts(sources, holdout, args.eval_docs)
    console.print("held-out documents: " + ", ".join(f"{k} {len(v):,}" for k, v in held_out.items()))
    console.print("weights: " + ", ".join(f"{k} {w:g}" for k, w in weights.items()))
    o200k = load_encoder("o200k")
    tag = "-".join(f"{k}{v:g}" for k, v in sorted(overrides.items())) or "config"

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "weights": weights, "variants": {}}
    for name in args.variants:
        cfg = dataclasses.replace(run.tokenizer, **VARIANTS[name])
        out_dir = args.out / f"{args.config.stem}-{tag}-{name}"
        console.rule(f"variant {name}: {VARIANTS[name] or 'the config'}")
        cost = train_variant(cfg, sources, out_dir, run.seed) if not (out_dir / "meta.json").is_file() else {}
        tok = Tokenizer.load(out_dir)
        cost.setdefault("train_s", tok.meta["train_seconds"])
        report = evaluate([load_encoder(str(out_dir)), o200k], held_out)
        console.print(table(report, f"{name}: held-out documents, vocab {tok.vocab_size:,}"))
        results["variants"][name] = {"cost": cost, "report": report}

    summary = Table(
        title="x o200k chars/token on held-out documents vs targets (weight 0: source left out of training; "
        "timings on shared cores: indicative)"
    )
    summary.add_column("variant")
    for s, w in weights.items():
        summary.add_column(f"{s}{' (unseen)' if w == 0 else ''} (>= {target(s, w)})", justify="right")
    summary.add_column("rt fail", justify="right")
    summary.add_column("train s (< 180)", justify="right")
    summary.add_column("peak GiB (< 4)", justify="right")
    for name, r in results["variants"].items():
        rows = [row for row in r["report"]["rows"] if not row["tokenizer"].startswith("o200k")]
        ratio = {row["source"]: row["ratio_vs_baseline"] for row in rows}
        summary.add_row(
            name,
            *[f"{ratio.get(s, float('nan')):.3f}" for s in weights],
            str(sum(row["round_trip_failures"] for row in rows)),
            f"{r['cost']['train_s']:.1f}",
            f"{r['cost'].get('peak_rss_gib', float('nan')):.2f}",
        )
    console.print(summary)

    first = Tokenizer.load(args.out / f"{args.config.stem}-{tag}-{args.variants[0]}")
    texts, size = [], 0
    for source_texts in held_out.values():  # an equal share of bytes from every source
        share = 0
        for t in source_texts:
            if share >= args.throughput_mb * 1e6 / len(held_out):
                break
            texts.append(t)
            share += len(t.encode())
        size += share
    speed = throughput(first, texts, repeats=3)
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
