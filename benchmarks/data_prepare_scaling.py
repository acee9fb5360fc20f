"""Data preparation at scale: documents/s of `prepare` on DataTrove (data.executor=local) with 1, 2 and 4 tasks
against today's single-machine prepare (data.executor=single, num_proc workers), on ../shared/corpora.

Every run prepares the same sources from the compressed files to finished shards; the DataTrove runs also
check that their shards are byte-identical to the single-machine ones. Optional rows add MinHash near-dedup
and PII masking to the 4-task run. Each task is a process, so on a machine with fewer free cores than tasks the
scaling table shows the overhead of the stages, not their speed-up: the load average is printed beside it.
Wall time only: DataTrove's task processes are children of its fork server, which this process does not reap.

  .venv/bin/python benchmarks/data_prepare_scaling.py                  # all of ../shared/corpora
  .venv/bin/python benchmarks/data_prepare_scaling.py --fraction 0.1 --near-dedup --pii
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import CORPORA, DOCS, timed  # a sibling benchmark's helpers


def small_tokenizer(out: Path, seed: int):
    """An 8k tokenizer on 100,000 sentences (the tokenizer's size changes the encode cost, not the scaling)."""
    from ondol.data.config import SourceConfig
    from ondol.tokenizer.config import TokenizerConfig
    from ondol.tokenizer.train import train_tokenizer

    sources = [SourceConfig(name=n, path=str(CORPORA / f"{n}.jsonl.gz")) for n in DOCS]
    return train_tokenizer(TokenizerConfig(vocab_size=8000, max_sentences=100_000), sources, out / "tokenizer", seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=1.0, help="share of every source to prepare")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--num-proc", type=int, default=2, help="single-machine workers, and DataTrove tasks at a time")
    p.add_argument("--near-dedup", action="store_true", help="add a row: 4 tasks with MinHash near-dedup")
    p.add_argument("--pii", action="store_true", help="add a row: 4 tasks with PII masking")
    p.add_argument("--out", type=Path, default=Path("runs/bench-data-scaling"))
    args = p.parse_args()

    from ondol.data.config import DataConfig, NearDedupConfig, SourceConfig
    from ondol.data.preparation import prepare

    args.out.mkdir(parents=True, exist_ok=True)
    tok = small_tokenizer(args.out, seed=0)
    sources = [SourceConfig(name=n, path=str(CORPORA / f"{n}.jsonl.gz"), max_docs=max(1, int(d * args.fraction)))
               for n, d in DOCS.items()]
    runs = [("single", DataConfig(sources=sources, num_proc=args.num_proc))]
    runs += [(f"local, {n} task{'s' * (n > 1)}", DataConfig(sources=sources, executor="local", tasks=n,
                                                            num_proc=args.num_proc)) for n in args.tasks]
    if args.near_dedup:
        runs.append(("local, 4 tasks + near-dedup", DataConfig(sources=sources, executor="local", tasks=4,
                                                               num_proc=args.num_proc,
                                                               near_dedup=NearDedupConfig(enabled=True))))
    if args.pii:
        runs.append(("local, 4 tasks + PII mask", DataConfig(sources=sources, executor="local", tasks=4,
                                                             num_proc=args.num_proc, pii="mask")))
    rows, reference = [], None
    for label, cfg in runs:
        out = args.out / label.replace(", ", "-").replace(" ", "_").replace("+", "plus")
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        manifest, wall, _ = timed(lambda cfg=cfg, out=out: prepare(cfg, tok, out, seed=0, progress=False))
        docs = sum(s["read"] for s in manifest["sources"])
        shards = {p.relative_to(out): p.read_bytes() for p in sorted(out.glob("*/*/*.bin"))}
        reference = reference if reference is not None else shards
        changes_text = cfg.pii != "off" or cfg.near_dedup.enabled  # other shards on purpose
        same = "-" if label == "single" or changes_text else ("yes" if shards == reference else "NO")
        rows.append((label, docs, wall, docs / wall, manifest["totals"]["dropped"], same, load))
        print(f"{label}: {wall:.1f} s", flush=True)

    base = rows[0][3]
    print(f"\n{'run':<30} {'docs':>9} {'wall s':>8} {'docs/s':>9} {'vs single':>9} {'dropped':>8} "
          f"{'same shards':>11} {'load':>5}")
    for label, docs, wall, rate, dropped, same, load in rows:
        print(f"{label:<30} {docs:>9,} {wall:>8.1f} {rate:>9,.0f} {rate / base:>8.2f}x {dropped:>8,} "
              f"{same:>11} {load:>5.1f}")
    print(f"\n{os.cpu_count()} CPUs here; load average (1 min) at each run's start in the last column")


if __name__ == "__main__":
    main()
