"""Data pipeline benchmark: `prepare` on the shared corpora vs the tokenizer's raw batch encode, and the loader.

  1. raw encode: Tokenizer.encode_batch on the documents already in memory (the ceiling for tokenizing);
  2. prepare: data.prepare from the compressed files to finished shards (read, clean, dedup, split,
     tokenize with num_proc workers, write), in MB/s of document text and tokens/s; target >= 70% of (1);
  3. loader: TokenLoader batches of 8 x 2048 from the prepared shards, tokens/s; target > 5 M/s.

It needs a 64k tokenizer: the tokenizer benchmark's (runs/bench-tokenizer/default-v64000) when present, else one
is trained here with Ondol's trainer. Timings on shared cores are indicative only.

  .venv/bin/python benchmarks/data_pipeline.py                    # all of ../shared/corpora
  .venv/bin/python benchmarks/data_pipeline.py --fraction 0.1     # a tenth of every source, to try it
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
DOCS = {"ko_reviews": 617_741, "ko_docs": 994, "en_docs": 499, "code_python": 759}


def tokenizer_64k(path: Path | None, out: Path, max_sentences: int, seed: int):
    from ondol.data.config import SourceConfig
    from ondol.tokenizer.config import TokenizerConfig
    from ondol.tokenizer.tokenizer import Tokenizer
    from ondol.tokenizer.train import train_tokenizer

    for candidate in (path, ROOT / "runs" / "bench-tokenizer" / "default-v64000"):
        if candidate is not None and (candidate / "meta.json").is_file():
            return Tokenizer.load(candidate)
    sources = [SourceConfig(name=n, path=str(CORPORA / f"{n}.jsonl.gz")) for n in DOCS]
    folder = out / f"tokenizer-64k-{max_sentences}"  # train_tokenizer reuses it when the recipe matches
    print(f"64k tokenizer on {max_sentences:,} sentences at {folder} ...", flush=True)
    return train_tokenizer(TokenizerConfig(vocab_size=64_000, max_sentences=max_sentences), sources, folder, seed)


def _cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished children (the tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, repeats: int = 1):
    """(result, best wall seconds, CPU seconds of that run): CPU time is the figure contention distorts least."""
    best = (None, float("inf"), 0.0)
    for _ in range(repeats):
        cpu, started = _cpu_seconds(), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - started
        if wall < best[1]:
            best = (result, wall, _cpu_seconds() - cpu)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=1.0, help="share of each source's documents to use")
    p.add_argument("--tokenizer", type=Path, default=None, help="a trained tokenizer folder (default: see above)")
    p.add_argument("--max-sentences", type=int, default=300_000, help="when training the 64k tokenizer here")
    p.add_argument("--num-proc", type=int, default=2, help="tokenizing worker processes")
    p.add_argument("--loader-batches", type=int, default=300)
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs of encode and prepare")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-data")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ondol.data.config import DataConfig, SourceConfig
    from ondol.data.loader import TokenLoader
    from ondol.data.preparation import prepare
    from ondol.data.sources import iter_documents

    args.out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_64k(args.tokenizer, args.out, args.max_sentences, args.seed)
    sources = [SourceConfig(name=n, path=str(CORPORA / f"{n}.jsonl.gz"),
                            max_docs=max(1, round(args.fraction * count))) for n, count in DOCS.items()]
    texts = [d.text for s in sources for d in iter_documents(s)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    raw_tokens, raw_s, raw_cpu = timed(lambda: sum(map(len, tok.encode_batch(texts))), args.repeats)

    data_dir = args.out / "data"
    cfg = DataConfig(sources=sources, val_fraction=0.01, num_proc=args.num_proc)

    def prepare_afresh() -> dict:
        shutil.rmtree(data_dir, ignore_errors=True)
        return prepare(cfg, tok, data_dir, args.seed)

    manifest, prep_s, prep_cpu = timed(prepare_afresh, args.repeats)
    totals = manifest["totals"]
    prep_tokens = totals["train_tokens"] + totals["val_tokens"]

    loader = TokenLoader(data_dir, "train", 2048, 8, seed=args.seed)
    next(loader)  # opens the shards and draws the first permutation
    _, load_s, _ = timed(lambda: [next(loader) for _ in range(args.loader_batches)])
    load_tps = args.loader_batches * 8 * 2048 / load_s

    results = {
        "text_mb": round(mb, 2), "documents": len(texts), "tokenizer": tok.fingerprint, "vocab": tok.vocab_size,
        "raw_encode": {"seconds": raw_s, "cpu_seconds": raw_cpu, "mb_s": mb / raw_s, "tokens_s": raw_tokens / raw_s},
        "prepare": {"seconds": prep_s, "cpu_seconds": prep_cpu, "mb_s": mb / prep_s, "tokens_s": prep_tokens / prep_s,
                    "num_proc": args.num_proc, "tokens": prep_tokens},
        "loader_8x2048": {"tokens_s": load_tps, "batches": args.loader_batches},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    table = Table(title=f"data pipeline on {mb:.1f} MB ({len(texts):,} documents), tokenizer vocab "
                        f"{tok.vocab_size:,} (indicative: shared cores)")
    for column in ("stage", "seconds", "CPU s", "MB/s", "tokens/s", "target", "status"):
        table.add_column(column, justify="left" if column in ("stage", "target") else "right")
    ratio = (mb / prep_s) / (mb / raw_s)
    table.add_row("raw Tokenizer.encode_batch", f"{raw_s:.2f}", f"{raw_cpu:.2f}", f"{mb / raw_s:.2f}",
                  f"{raw_tokens / raw_s / 1e6:.2f} M", "", "")
    table.add_row(f"data.prepare (num_proc={args.num_proc})", f"{prep_s:.2f}", f"{prep_cpu:.2f}", f"{mb / prep_s:.2f}",
                  f"{prep_tokens / prep_s / 1e6:.2f} M", ">= 70% of raw encode (MB/s)",
                  f"{ratio:.0%} " + ("ok" if ratio >= 0.7 else "below"))
    table.add_row("TokenLoader 8 x 2048", f"{load_s:.2f}", "", "", f"{load_tps / 1e6:.1f} M", "> 5 M tokens/s",
                  "ok" if load_tps > 5e6 else "below")
    Console(width=140).print(table)
    print(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
