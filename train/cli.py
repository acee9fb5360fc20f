"""`ondol train CONFIG [overrides]`: train on prepared data in this process (one rank, or one of many when
started by a launcher that sets RANK/WORLD_SIZE)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ondol.configs import add_config_command, load_config
from ondol.errors import ConfigError
from ondol.files import write_atomic


def train_command(args: argparse.Namespace) -> int:
    """Train; a stop on request (signal or stop file) exits with PREEMPTED_EXIT after saving (errors: a TrainError
    such as a refused resume or a non-finite streak, reported by the caller as one line)."""
    from ondol.train.preemption import PREEMPTED_EXIT, Preempted
    from ondol.train.trainer import Trainer

    try:
        summary = Trainer(load_config(args.config, args.overrides)).fit()
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


def eval_command(args: argparse.Namespace) -> int:
    """Bits per byte per source as a table (and JSON). Bad input is one line on stderr (`ondol.errors.reported`):
    a run folder, --checkpoint or --task-data that names nothing exits 2, unreadable text 3, weights 5."""
    from ondol.train.evaluation import evaluate_run, print_table

    task_data = dict(_task_file(item) for item in args.task_data or ())
    result = evaluate_run(args.run_dir, args.checkpoint, args.data or (), max_docs=args.max_docs,
                          max_bytes=args.max_bytes, progress=True, verify=not args.no_verify)
    print_table(result)
    if args.tasks:
        try:
            from ondol.train.harness import print_tasks, run_tasks
        except ImportError:
            raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'ondol[eval]'") from None
        result["tasks"] = run_tasks(args.run_dir, args.tasks.split(","), task_data, args.checkpoint,
                                    verify=not args.no_verify)
        print_tasks(result["tasks"])
    if args.json:
        write_atomic(Path(args.json), json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


def average_command(args: argparse.Namespace) -> int:
    """The mean weights of a run's last K checkpoints as a model folder (train/averaging.py)."""
    from ondol.train.averaging import average

    out = average(args.run_dir, args.last, args.out, verify=not args.no_verify)
    print(f"averaged the last {args.last} checkpoints of {args.run_dir} -> {out} (ondol eval {args.run_dir} "
          f"--checkpoint {out}; ondol generate {args.run_dir} --checkpoint {out}; ondol export hf {out} OUT)")
    return 0


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not '{value}'")
    return int(value)


def _task_file(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--task-data {item}: write TASK=FILE, e.g. kobest_copa=copa.jsonl")
    return name, path


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(
        sub, "train", train_command,
        help="train the model on the run's prepared data with DeepSpeed",
        description="Train with DeepSpeed (ZeRO stage, precision and the rest from the config) on the tokenizer "
        "and data already in RUN_DIR (see `ondol tokenizer train`, `ondol data prepare`, or `ondol run` for all "
        "stages). Resumes from RUN_DIR/checkpoints unless train.resume=never; writes metrics.jsonl, loss.png "
        "and the final weights to RUN_DIR/model. For several processes use `ondol launch`.",
    )

    e = sub.add_parser(
        "eval", help="bits per byte and per character of a run's model on held-out text, per source",
        description="Bits per byte (UTF-8) and per character of RUN_DIR's model on the held-out documents of "
        "every source of the run (or on --data files), each document scored whole from its start with the "
        "run's context length (sliding windows beyond it): numbers that compare across tokenizers.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `ondol run` or `ondol train` "
                   "(every file is read from it), or the run's config YAML")
    e.add_argument("--checkpoint", help="step_N or a checkpoint folder: a checkpoint of the run instead of its "
                   "final weights; or a model folder such as one `ondol average` wrote")
    e.add_argument("--data", action="append", metavar="FILE", help="a .jsonl, .csv, .tsv or text file (also .gz, "
                   ".zst) to score instead of the validation split (repeat for several; each is a source named "
                   "after the file); streamed, with a progress bar on a terminal")
    e.add_argument("--max-docs", type=_positive, metavar="N", help="score at most N documents of each --data file "
                   "(they are read as they are scored: memory stays bounded however large the file)")
    e.add_argument("--max-bytes", type=_positive, metavar="B", help="stop each --data file after the document "
                   "that reaches B bytes of UTF-8 text")
    e.add_argument("--tasks", metavar="T1,T2", help="also run these lm-evaluation-harness tasks zero-shot, e.g. "
                   "kobest_copa,kobest_hellaswag,haerae,kmmlu,click (needs pip install 'ondol[eval]')")
    e.add_argument("--task-data", action="append", metavar="TASK=FILE", help="evaluate TASK on a local JSON "
                   "Lines file (lm-eval's definition of the task, its dataset read from FILE); repeat per task")
    e.add_argument("--no-verify", action="store_true", help="read a checkpoint (or weights with SHA256SUMS) "
                   "without checking its bytes against the digests recorded when it was written")
    e.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    e.set_defaults(func=eval_command)

    a = sub.add_parser(
        "average", help="average the weights of a run's last K checkpoints into a model folder",
        description="The mean of the fp32 weights of RUN_DIR's last K complete checkpoints (each checked against "
        "its recorded digests), written as a model folder: config.json, model.safetensors, SHA256SUMS and "
        "average.json (which checkpoints). Evaluate it with `ondol eval RUN_DIR --checkpoint OUT`, continue "
        "prompts with `ondol generate RUN_DIR --checkpoint OUT`, export it with `ondol export hf OUT HF_DIR` (OUT "
        "inside RUN_DIR, as by default, finds the run's tokenizer).")
    a.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with checkpoints (RUN_DIR/checkpoints)")
    a.add_argument("--last", type=_positive, required=True, metavar="K", help="how many of the newest checkpoints "
                   "(the run keeps train.keep_last of them)")
    a.add_argument("--out", metavar="DIR", help="where to write the model folder (default RUN_DIR/model-average; "
                   "an earlier average there is replaced)")
    a.add_argument("--no-verify", action="store_true", help="read the checkpoints without checking their bytes "
                   "against the digests in their meta.json")
    a.set_defaults(func=average_command)
