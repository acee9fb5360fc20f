"""Preemption and clean exits, repeated: how often a stop on request resumes to bit-identical final weights, and
how often a finished multi-rank launch exits 0. Prints a table (no targets are asserted).

- signal: for 1 and 2 CPU ranks, an uninterrupted reference run, then `--repeats` runs that get SIGTERM (rank 0
  only) after a random step, must exit with 75 and leave the checkpoint of that step, and are resumed with the
  same command; the final weights are compared bit for bit with the reference's.
- clean: `--launches` 2-rank `ondol launch` runs of the tiny config through DeepSpeed's launcher and the
  supervisor; each must exit 0 (a gloo teardown at interpreter exit used to abort rank 0 now and then).

  .venv/bin/python benchmarks/preemption.py                      # 10 signals per rank count, 20 launches
  .venv/bin/python benchmarks/preemption.py --repeats 2 --launches 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from golden import build_assets, link_data, tiny_config
from test_train_procs import DRIVER

from ondol.configs import to_yaml
from ondol.train import checkpoint

STEPS = ("train.steps=12", "train.save_every=100", "train.eval_every=6", "train.micro_batch_size=2")


def _run(tmp: Path, run: Path, assets: Path, kill: str, ranks: int) -> int:
    link_data(run, assets)
    config, driver = tmp / "run.yaml", tmp / "driver.py"
    config.write_text(to_yaml(tiny_config(run, assets)), encoding="utf-8")
    driver.write_text(DRIVER, encoding="utf-8")
    args = [str(driver), kill, str(config), *STEPS]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    rank_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in rank_vars}, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, check=False).returncode


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def signal_runs(tmp: Path, assets: Path, ranks: int, repeats: int) -> tuple[int, int, list[int]]:
    """(runs that saved at the signalled step, runs whose resumed weights equal the reference's, steps)."""
    reference = tmp / f"ref{ranks}"
    assert _run(tmp, reference, assets, "none", ranks) == 0
    ref = _weights(reference)
    saved = exact = 0
    steps = []
    for i in range(repeats):
        run = tmp / f"run{ranks}_{i}"
        step = random.Random().randint(1, 11)
        steps.append(step)
        code = _run(tmp, run, assets, f"term:{step}", ranks)
        latest = checkpoint.latest_checkpoint(run / "checkpoints")
        # one rank exits 75 itself; torchrun reports its workers' 75s as a failure (1)
        saved += latest is not None and latest.name == checkpoint.tag_for(step) and (code == 75 or ranks > 1)
        same = False
        if _run(tmp, run, assets, "none", ranks) == 0:
            got = _weights(run)
            same = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        exact += same
        print(f"{ranks} rank(s), run {i + 1}: SIGTERM after step {step}, exit {code}, saved "
              f"{latest.name if latest else None}, resumed bit-identical: {same}", flush=True)
        shutil.rmtree(run)
    return saved, exact, steps


def clean_launches(tmp: Path, assets: Path, launches: int) -> tuple[int, list[int]]:
    codes = []
    for i in range(launches):
        run = tmp / f"launch{i}"
        link_data(run, assets)
        config = tmp / f"launch{i}.yaml"
        config.write_text(to_yaml(tiny_config(run, assets, *STEPS, "launch.gpus_per_node=2",
                                              "launch.master_port=0")), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "ondol.launch.cli", "launch", str(config)], cwd=ROOT,
                              capture_output=True, text=True, check=False)
        codes.append(done.returncode)
        print(f"launch {i + 1}: exit {done.returncode}", flush=True)
        if done.returncode:  # what the supervisor said about the failure
            print(done.stderr[-2000:], flush=True)
        shutil.rmtree(run)
    return sum(c == 0 for c in codes), codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="signalled runs per rank count")
    parser.add_argument("--launches", type=int, default=20, help="clean 2-rank launches")
    args = parser.parse_args()
    console = Console(width=150)  # readable in a log file too
    table = Table(title="stop on request and clean exits (tiny config, CPU, gloo)")
    for column in ("case", "runs", "result", "seconds", "detail"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        assets = build_assets(tmp / "assets")
        for ranks in (1, 2) if args.repeats else ():
            started = time.perf_counter()
            saved, exact, steps = signal_runs(tmp, assets, ranks, args.repeats)
            table.add_row(f"SIGTERM, {ranks} rank(s)", str(args.repeats),
                          f"{saved} saved at that step, {exact} bit-identical after resume",
                          f"{time.perf_counter() - started:.0f}", f"steps {steps}")
        started = time.perf_counter()
        ok, codes = clean_launches(tmp, assets, args.launches)
        table.add_row("ondol launch, 2 ranks", str(args.launches), f"{ok} exited 0",
                      f"{time.perf_counter() - started:.0f}", f"exit codes {sorted(set(codes))}")
    console.print(table)


if __name__ == "__main__":
    main()
