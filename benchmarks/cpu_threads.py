"""ms per training step of configs/tiny-ko.yaml at 1 and 2 intra-op threads and at auto (`train.cpu_threads`
0: one thread per core that no other process keeps busy at start), on an idle machine and beside one other
CPU-bound process (a single-threaded matmul loop, as another user's job would be).

  .venv/bin/python benchmarks/cpu_threads.py                  # tokenizer + data built once into --work
  .venv/bin/python benchmarks/cpu_threads.py --steps 60 --rounds 3

Each cell is the median of the logged ms/step (train.log_every=10, the first interval left out as warm-up) over
`--rounds` runs, the rounds interleaving the settings so that a drift of the machine's speed hits all alike. Run
it alone: anything else on the machine is a competitor of its own (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-ko.yaml"
COMPETITOR = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\n"
              "while True:\n    a = torch.tanh(a @ a)\n")


def ondol(*args: str) -> None:
    """An ondol command with OMP_NUM_THREADS unset: train.cpu_threads alone decides."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, "-m", "ondol.launch.cli", *args], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)


def prepare(work: Path) -> None:
    """tiny-ko's tokenizer and data, once (both commands reuse finished work)."""
    ondol("tokenizer", "train", str(CONFIG), f"run_dir={work / 'base'}")
    ondol("data", "prepare", str(CONFIG), f"run_dir={work / 'base'}")


def step_ms(work: Path, name: str, threads: int, steps: int) -> float:
    """Median logged ms/step of one `ondol train` run, past the first logged interval."""
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "data"):
        if not (run / part).exists():
            (run / part).symlink_to(work / "base" / part, target_is_directory=True)
    ondol("train", str(CONFIG), f"run_dir={run}", f"train.steps={steps}", "train.log_every=10",
          f"train.eval_every={steps}", "train.eval_batches=1", f"train.save_every={steps}", "train.resume=never",
          f"train.cpu_threads={threads}", "logging.progress=false", "train.eval_bpb_tokens=0")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["ms_per_step"] for r in records if "ms_per_step" in r][1:]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="keep the tokenizer, data and runs here (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        prepare(work)
        console.print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        cells: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for busy in (False, True):
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if busy else None
                try:
                    for threads in (1, 2, 0):
                        key = ("beside one CPU-bound process" if busy else "idle", threads)
                        cells.setdefault(key, []).append(step_ms(work, f"t{threads}", threads, args.steps))
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
    table = Table(title=f"tiny-ko ms/step (median over {args.rounds} runs of {args.steps} steps)")
    for col in ("machine", "1 thread", "2 threads", "auto", "2 / 1"):
        table.add_column(col, justify="left" if col == "machine" else "right")
    for machine in ("idle", "beside one CPU-bound process"):
        one, two, auto = (statistics.median(cells[(machine, t)]) for t in (1, 2, 0))
        table.add_row(machine, f"{one:,.0f}", f"{two:,.0f}", f"{auto:,.0f}", f"{two / one:.2f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
