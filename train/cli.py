"""`ondol train CONFIG [overrides]`: train on prepared data in this process (one rank, or one of many when
started by a launcher that sets RANK/WORLD_SIZE)."""

from __future__ import annotations

import argparse
import json


def train_command(args: argparse.Namespace) -> int:
    from configs import load_config
    from train import Trainer

    summary = Trainer(load_config(args.config, args.overrides)).fit()
    print(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from launch.cli import add_config_args

    p = sub.add_parser(
        "train",
        help="train the model on the run's prepared data with DeepSpeed",
        description="Train with DeepSpeed (ZeRO stage, precision and the rest from the config) on the tokenizer "
        "and data already in RUN_DIR (see `ondol tokenizer train`, `ondol data prepare`, or `ondol run` for all "
        "stages). Resumes from RUN_DIR/checkpoints unless train.resume=never; writes metrics.jsonl, loss.png "
        "and the final weights to RUN_DIR/model. For several processes use `ondol launch`.",
    )
    add_config_args(p)
    p.set_defaults(func=train_command)
