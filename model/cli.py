"""`ondol export hf RUN_DIR OUT`: a trained run as a transformers model folder."""

from __future__ import annotations

import argparse


def _export_hf(args: argparse.Namespace) -> int:
    from ondol.model.export import export_hf
    from ondol.train.checkpoint import damage

    out = export_hf(args.run_dir, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                    verify=not args.no_verify, overwrite=args.overwrite, checkpoint_damage=damage)
    print(f"exported {args.run_dir} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="convert a trained run to another framework's format",
                            description="Convert a trained run (RUN_DIR/model + RUN_DIR/tokenizer) or one of its "
                                        "checkpoints (RUN_DIR/checkpoints/step_N).")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf", help="transformers folder: ExaoneMoeForCausalLM (or Exaone4ForCausalLM for a post-norm dense model)",
        description="Write config.json, safetensors weights (model.safetensors, or shards with "
                    "model.safetensors.index.json) and the tokenizer files to OUT, one tensor at a time from the "
                    "run's per-rank shards. Options transformers cannot express (attention sinks, softmax router, "
                    "...) are refused.")
    hf.add_argument("run_dir", metavar="RUN_DIR",
                    help="run directory holding model/ and tokenizer/, or a checkpoint RUN_DIR/checkpoints/step_N")
    hf.add_argument("out", metavar="OUT", help="output folder (created; a non-empty one needs --overwrite)")
    hf.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in OUT")
    hf.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype written (default fp32)")
    hf.add_argument("--max-shard-gb", type=float, default=5.0, dest="max_shard_gb",
                    help="largest safetensors file in GiB before splitting into shards (default 5)")
    hf.add_argument("--no-verify", action="store_true", help="skip checking the source's bytes against the "
                    "digests its checkpoint (meta.json) or folder (SHA256SUMS) recorded")
    hf.set_defaults(func=_export_hf)
