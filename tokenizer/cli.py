"""`ondol tokenizer train|eval`: train the run's tokenizer, and measure it beside other tokenizers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from ondol.configs import add_config_command, load_config, tokenizer_dir
from ondol.errors import TokenizerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train or evaluate the Korean-first tokenizer",
        description="Train the run's SentencePiece tokenizer, or measure it beside others.",
    )
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    t = add_config_command(
        tsub, "train", _train,
        help="train the tokenizer into RUN_DIR/tokenizer (reused when already trained)",
        description="Sample sentences from tokenizer.sources (or data.sources), train "
        "SentencePiece losslessly, write tokenizer.model, meta.json, tokenizer.json.",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a tokenizer trained with another config, sources or seed; the old one is moved to "
        "TOKENIZER_DIR.replaced-DATE, not deleted (data prepared with it no longer matches: prepare again)",
    )

    e = add_config_command(
        tsub, "eval", _eval,
        help="chars/token, bytes/token, tokens/eojeol, byte fallback, round trip",
        description="Measure the run's tokenizer per source beside comparison tokenizers; the "
        "last one listed (o200k by default) is the baseline of the ratio column.",
    )
    e.add_argument(
        "--compare",
        action="append",
        default=None,
        metavar="TOKENIZER",
        help="a comparison tokenizer: o200k, an Ondol tokenizer folder, or a tokenizer.json; "
        "repeatable (default: o200k)",
    )
    e.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="write the report as JSON here (default: RUN_DIR/tokenizer/eval.json)",
    )
    e.add_argument(
        "--max-docs",
        type=int,
        default=2000,
        help="documents per source to measure, never ones the tokenizer trained on: its hold-out when "
        "tokenizer.holdout_fraction > 0, else those after the source's max_docs",
    )


def _train(args) -> int:
    from ondol.tokenizer.train import train_tokenizer

    cfg = load_config(args.config, args.overrides)
    tok = train_tokenizer(cfg.tokenizer, cfg.data.sources, tokenizer_dir(cfg), cfg.seed, args.overwrite)
    print(f"{tokenizer_dir(cfg)}: {tok}")
    return 0


def _eval(args) -> int:
    from ondol.tokenizer.evaluate import evaluate, evaluation_texts, load_encoder, table

    cfg = load_config(args.config, args.overrides)
    encoders = [load_encoder(str(tokenizer_dir(cfg)))] + [load_encoder(s) for s in args.compare or ["o200k"]]
    held_out = cfg.tokenizer.holdout_fraction > 0
    texts = evaluation_texts(cfg.tokenizer.sources or cfg.data.sources, cfg.tokenizer.holdout_fraction,
                             args.max_docs)
    for name in [name for name, docs in texts.items() if not docs]:
        why = ("has no held-out documents" if held_out else
               "trained the tokenizer with every document it has (no max_docs, tokenizer.holdout_fraction=0)")
        print(f"ondol tokenizer eval: source {name} {why}: not measured; set tokenizer.holdout_fraction=0.01 "
              "and retrain the tokenizer (tokenizer train CONFIG --overwrite) to keep documents out", file=sys.stderr)
        del texts[name]
    if not texts:
        raise TokenizerError("no source has documents the tokenizer did not train on: set "
                             "tokenizer.holdout_fraction=0.01 and retrain the tokenizer (tokenizer train CONFIG "
                             "--overwrite), or give sources a max_docs")
    report = evaluate(encoders, texts)
    kind = "held-out documents" if held_out else "documents after each source's max_docs (unseen in training)"
    Console(width=150).print(table(report, f"tokenizer efficiency ({kind}, up to {args.max_docs} per source)"))
    out = args.json or tokenizer_dir(cfg) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out}")
    return 0
