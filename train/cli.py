"""`ondol train CONFIG [overrides]`: train on prepared data in this process (one rank, or one of many when
started by a launcher that sets RANK/WORLD_SIZE)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ondol.configs import add_config_command, load_config


def train_command(args: argparse.Namespace) -> int:
    """Train; a refused resume or a non-finite streak is one line on stderr and exit code 1, a stop on request
    (signal or stop file) exits with PREEMPTED_EXIT after saving."""
    from ondol.train.checkpoint import IncompatibleCheckpoint
    from ondol.train.preemption import PREEMPTED_EXIT, Preempted
    from ondol.train.trainer import NonFiniteError, Trainer

    try:
        summary = Trainer(load_config(args.config, args.overrides)).fit()
    except (IncompatibleCheckpoint, NonFiniteError) as e:
        print(f"ondol train: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"ondol train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    finally:
        _close_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _close_process_group() -> None:
    """Shut the process group down before the interpreter exits: torch's gloo/nccl worker threads torn down at
    exit can abort the process (SIGABRT) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(
        sub, "train", train_command,
        help="train the model on the run's prepared data with DeepSpeed",
        description="Train with DeepSpeed (ZeRO stage, precision and the rest from the config) on the tokenizer "
        "and data already in RUN_DIR (see `ondol tokenizer train`, `ondol data prepare`, or `ondol run` for all "
        "stages). Resumes from RUN_DIR/checkpoints unless train.resume=never; writes metrics.jsonl, loss.png "
        "and the final weights to RUN_DIR/model. For several processes use `ondol launch`.",
    )
