"""`ondol export hf RUN_DIR OUT`: a trained run as a transformers model folder."""

from __future__ import annotations

import argparse


def _export_hf(args: argparse.Namespace) -> int:
    from ondol.model.export import export_hf

    out = export_hf(args.run_dir, args.out)
    print(f"exported {args.run_dir} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="convert a trained run to another framework's format",
                            description="Convert a trained run (RUN_DIR/model + RUN_DIR/tokenizer).")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf", help="transformers folder: ExaoneMoeForCausalLM (or Exaone4ForCausalLM for a post-norm dense model)",
        description="Write config.json, model.safetensors (fp32) and the tokenizer files to OUT. Options "
                    "transformers cannot express (attention sinks, softmax router, ...) are refused.")
    hf.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding model/ and tokenizer/")
    hf.add_argument("out", metavar="OUT", help="output folder (created)")
    hf.set_defaults(func=_export_hf)
