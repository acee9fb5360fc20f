"""`ondol data prepare CONFIG` and `ondol data inspect CONFIG`."""

from __future__ import annotations

import argparse
import sys
from functools import wraps

import numpy as np
from rich.console import Console
from rich.table import Table

from ondol.configs import add_config_command, data_dir, load_config, tokenizer_dir
from ondol.errors import DataError, OndolError

# long lines (paths, samples) stay whole; logs (not a terminal) get room for the whole table
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)


def _reported(handler):
    """Data errors (bad input, missing files, refused mixing) as DataError: one line, exit code 3."""
    @wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OndolError:
            raise
        except (ValueError, OSError) as e:
            raise DataError(str(e)) from e
    return run


def _load(args: argparse.Namespace):
    from ondol.tokenizer.tokenizer import Tokenizer

    cfg = load_config(args.config, args.overrides)
    return cfg, Tokenizer.load(tokenizer_dir(cfg)), data_dir(cfg)


def _source_table(manifest: dict, cfg) -> Table:
    """Per source: what was read, kept and tokenized, and what training will make of it: the mixture weights
    (the config's: they apply when training), each source's expected share of the training sequences and the
    epochs over its own sequences that train.steps draws."""
    from ondol.data.loader import planned_mix

    tr, launch = cfg.train, cfg.launch
    ranks = launch.nodes * launch.gpus_per_node
    drawn = tr.steps * tr.micro_batch_size * tr.grad_accum * ranks
    weights = manifest["weights"] | {s.name: s.weight for s in cfg.data.sources}
    mix = planned_mix(manifest, weights, cfg.data.seq_len, drawn)
    table = Table(title=f"prepared data (tokenizer {manifest['tokenizer']['fingerprint']}, {manifest['dtype']})",
                  caption=f"expected share: weight / sum of weights, as training mixes sequences; epochs: passes "
                  f"over a source's train tokens in train.steps={tr.steps:,} steps of {tr.micro_batch_size} x "
                  f"{tr.grad_accum} x {ranks} sequences (micro batch x grad_accum x ranks) of {cfg.data.seq_len} "
                  "tokens" + ("; train.phases gives each phase its own mixture: the phase plan below is what "
                              "training draws" if tr.phases else ""))
    for column in ("source", "read", "bad input", "dropped", "train docs", "val docs", "train tokens",
                   "val tokens", "weight", "expected share", "epochs"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for s in manifest["sources"]:
        share, epochs = mix[s["name"]]
        table.add_row(s["name"], f"{s['read']:,}",
                      ", ".join(f"{n} {r}" for r, n in s["bad_input"].items()) or "0",
                      ", ".join(f"{n} {r}" for r, n in s["dropped"].items()) or "0",
                      f"{s['kept']['train']:,}", f"{s['kept']['val']:,}",
                      f"{s['tokens']['train']:,}", f"{s['tokens']['val']:,}",
                      f"{weights[s['name']]:g}", f"{share:.1%}", f"{epochs:.2f}")
    return table


def _phase_table(manifest: dict, cfg) -> Table:
    """train.phases as training will run them: per phase and source its weight, expected share of the phase's
    sequences and the epochs over the source's train sequences the phase draws."""
    from ondol.data.loader import planned_mix
    from ondol.train.phases import resolve

    tr, launch = cfg.train, cfg.launch
    per_step = tr.micro_batch_size * tr.grad_accum * launch.nodes * launch.gpus_per_node
    table = Table(title="phase plan (train.phases)", caption="share: of the phase's sequences; epochs: passes "
                  "over the source's train tokens within the phase")
    for column in ("phase", "steps", "seq_len", "lr", "source", "weight", "expected share", "epochs"):
        table.add_column(column, justify="left" if column in ("phase", "lr", "source") else "right")
    for i, p in enumerate(resolve(cfg, manifest["weights"] | {s.name: s.weight for s in cfg.data.sources})):
        mix = planned_mix(manifest, p.weights, p.seq_len, p.steps * per_step)
        first = [f"{i + 1} {p.name}", f"{p.start:,}-{p.end:,}", str(p.seq_len), p.lr_text]
        for j, name in enumerate(n for n in mix if n in p.weights):
            share, epochs = mix[name]
            table.add_row(*(first if j == 0 else [""] * 4), name, f"{p.weights[name]:g}", f"{share:.1%}",
                          f"{epochs:.2f}")
    return table


@_reported
def _prepare(args: argparse.Namespace) -> int:
    from ondol.data.preparation import prepare

    cfg, tokenizer, out_dir = _load(args)
    manifest = prepare(cfg.data, tokenizer, out_dir, cfg.seed, progress=not args.no_progress)
    console.print(_source_table(manifest, cfg))
    if cfg.train.phases:
        console.print(_phase_table(manifest, cfg))
    for s in manifest["sources"]:
        if "personal_data" in s:  # data.pii on: what was masked or dropped
            found = ", ".join(f"{n:,} {kind}" for kind, n in sorted(s["personal_data"].items())) or "none"
            console.print(f"  {s['name']}: personal data ({manifest['config']['pii']}): {found}", highlight=False)
        if "chat" in s:  # a chat source: what the loss is taken on, and what training at data.seq_len drops
            for split, c in s["chat"].items():
                console.print(f"  {s['name']} ({split}): {c['conversations']:,} conversations, "
                              f"{c['assistant_tokens']:,} assistant tokens (the loss), {c['masked_tokens']:,} "
                              f"masked tokens, {c['too_long']:,} longer than data.seq_len + 1 = {c['seq_len'] + 1} "
                              "tokens (dropped when training)", highlight=False)
        for examples in s["bad_input_examples"].values():
            for line in examples:
                console.print(f"  skipped {line}", highlight=False, markup=False)
    console.print(f"data: {out_dir} ({manifest['totals']['train_tokens']:,} train / "
                  f"{manifest['totals']['val_tokens']:,} validation tokens)")
    return 0


def _histogram(lengths: np.ndarray, width: int = 40) -> Table:
    """Documents per power-of-two length bucket (tokens, eos included)."""
    table = Table(title="document length (tokens)")
    for column in ("tokens", "docs", ""):
        table.add_column(column, justify="right" if column else "left")
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    for b, n in enumerate(counts):
        if n:
            table.add_row(f"{2**b:,}-{2**(b + 1) - 1:,}", f"{n:,}", "#" * max(1, int(width * n / counts.max())))
    return table


@_reported
def _inspect(args: argparse.Namespace) -> int:
    from ondol.data.shards import read_manifest, split_shards

    cfg, tokenizer, out_dir = _load(args)
    manifest = read_manifest(out_dir)
    console.print(_source_table(manifest, cfg))
    if cfg.train.phases:
        console.print(_phase_table(manifest, cfg))
    shards = split_shards(out_dir, args.split, manifest)
    for name, source_shards in shards.items():
        if not source_shards:
            continue
        lengths = np.concatenate([np.diff(s.starts) for s in source_shards])
        console.print(f"\n[bold]{name}[/] ({args.split}): {len(lengths):,} documents, mean {lengths.mean():.1f} "
                      f"tokens, median {np.median(lengths):.0f}, max {lengths.max():,}")
        console.print(_histogram(lengths))
        rng = np.random.default_rng(cfg.seed)
        for _ in range(args.samples):
            shard = source_shards[int(rng.integers(len(source_shards)))]
            text = tokenizer.decode(shard.document(int(rng.integers(shard.docs))).tolist())
            console.print(f"  sample: {text[:args.chars]!r}", highlight=False, markup=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare and inspect packed training data",
                          description="Clean, deduplicate, split and tokenize the configured sources into packed "
                          "token shards (RUN_DIR/data), and inspect the result.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = add_config_command(commands, "prepare", _prepare,
                           help="tokenize data.sources into RUN_DIR/data (resumes when re-run)",
                           description="Read data.sources, clean (NFC, control characters, length, Hangul ratio, "
                           "exact dedup), split train/val by document hash, tokenize in parallel with the run's "
                           "tokenizer and write packed shards plus manifest.json. Finished shards are kept when "
                           "re-run; a changed tokenizer or config is refused. data.executor=local|slurm runs the "
                           "same as data.tasks DataTrove tasks, here or as Slurm job arrays, with optional "
                           "near-dedup (data.near_dedup.enabled) and PII masking (data.pii=mask|drop).")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = add_config_command(commands, "inspect", _inspect,
                           help="token counts per source, document lengths, decoded samples",
                           description="Summarise RUN_DIR/data: counts per source from the manifest, a histogram "
                           "of document lengths and a few decoded documents.")
    i.add_argument("--split", default="train", choices=("train", "val"), help="which split to look at")
    i.add_argument("--samples", type=int, default=3, help="decoded documents to show per source")
    i.add_argument("--chars", type=int, default=200, help="characters shown per sample")
