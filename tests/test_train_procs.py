"""Trainer tests across processes (CPU, gloo, real text): SIGKILL and exact resume, 2 ranks vs 1 rank, resume
on another number of ranks. Runs go through the launcher entry `python -m ondol.train CONFIG` (under torchrun for 2
ranks); a small driver first installs the kill (at a step, or in the middle of writing a checkpoint)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import without_rank_variables
from golden import build_assets, link_data, run_losses, tiny_config
from safetensors.torch import load_file

from ondol.configs import to_yaml
from ondol.train import checkpoint
from ondol.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DRIVER = '''
import os, signal, sys
kill = sys.argv[1]
if kill.startswith("save:"):  # die inside DeepSpeed's save of that step, right after its first file is written
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    tag, original = "step_%08d" % int(kill[5:]), TorchCheckpointEngine.save
    def save(self, state_dict, path):
        original(self, state_dict, path)
        if tag in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    TorchCheckpointEngine.save = save
elif kill.startswith("term:"):  # rank 0 gets SIGTERM right after that optimizer step (a preemption notice)
    from ondol.train.trainer import Trainer
    n, original = int(kill[5:]), Trainer.train_step
    def train_step(self):
        original(self)
        if self.step == n and self.env.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    Trainer.train_step = train_step
elif kill.startswith("step:"):  # die right after that optimizer step, before anything is logged or saved
    from ondol.train.trainer import Trainer
    n, original = int(kill[5:]), Trainer.train_step
    def train_step(self):
        original(self)
        if self.step == n:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer.train_step = train_step
from ondol.train.__main__ import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "train_assets")


def _launch(tmp: Path, run: Path, assets: Path, kill: str, *overrides: str, ranks: int = 1,
            expect_error: str = "") -> int:
    """Run the driver (one process, or `ranks` under torchrun) on the tiny config; returns the exit code."""
    link_data(run, assets)
    config, driver = tmp / "run.yaml", tmp / "driver.py"
    config.write_text(to_yaml(tiny_config(run, assets)), encoding="utf-8")
    driver.write_text(DRIVER, encoding="utf-8")
    env = without_rank_variables(os.environ)  # set by this process's own in-process runs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))  # this checkout's ondol
    args = [str(driver), kill, str(config), *overrides]
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    else:
        cmd = [sys.executable, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    if expect_error:
        assert done.returncode != 0 and expect_error in done.stderr, done.stderr[-3000:]
    elif done.returncode not in (0, -9) and ranks == 1:
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_sigkill_mid_save_and_mid_run_then_resume_is_bit_exact(assets, tmp_path):
    """SIGKILL while step 10 is being saved (the incomplete checkpoint is never taken), then at a random step
    after it: the resumed run ends with the losses, validation losses and weights of the uninterrupted one. It
    trains with Muon at ZeRO 2 and QK-clip, the optimizer state with the most to restore: Muon's momentum back
    into DeepSpeed's flat partitions from its own files, AdamW's moments for the rest."""
    steps = ("train.steps=16", "train.save_every=5", "train.eval_every=8", "optim.name=muon",
             "deepspeed.zero_stage=2", "optim.qk_clip=3")
    reference = run_losses(tmp_path / "ref", assets, *steps)
    run = tmp_path / "run"

    assert _launch(tmp_path, run, assets, "save:10", *steps) == -9
    ckpts = run / "checkpoints"
    assert checkpoint.latest_checkpoint(ckpts).name == "step_00000005"
    assert (ckpts / checkpoint.LATEST).read_text() == "step_00000005"
    assert (ckpts / "step_00000010").is_dir() and not checkpoint.is_complete(ckpts / "step_00000010")

    kill_step = random.Random().randint(11, 14)  # any step between two checkpoints
    assert _launch(tmp_path, run, assets, f"step:{kill_step}", *steps) == -9, kill_step
    assert checkpoint.latest_checkpoint(ckpts).name == "step_00000010"

    assert _launch(tmp_path, run, assets, "none", *steps) == 0
    assert _losses(run) == reference, f"killed at step {kill_step}"
    val = [[r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r] for d in (run, tmp_path / "ref")]
    assert val[0] == val[1]
    ref_weights = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    weights = load_file(run / "model" / "model.safetensors")
    assert ref_weights.keys() == weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), f"killed at step {kill_step}"
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == ["step_00000015", "step_00000016"]


@pytest.mark.slow  # in-process resumes across a phase switch: tests/test_phases.py
def test_sigkill_mid_phase_and_after_a_phase_switch_then_resume_is_bit_exact(assets, tmp_path):
    """A run in two phases (the second on ko_docs alone at twice the length, the rate decaying) killed with
    SIGKILL mid-phase after its step-4 checkpoint, then one step after the switch at 6 past its step-8 checkpoint:
    the resumed runs end with the losses and weights of the uninterrupted one."""
    steps = ("train.steps=10", "train.save_every=4", "train.eval_every=5",
             ("train.phases=[{name: pre, steps: 6}, {name: anneal, steps: 4, weights: {ko_docs: 1}, seq_len: 128, "
              "lr_schedule: linear}]"))
    reference = run_losses(tmp_path / "ref", assets, *steps)
    run = tmp_path / "run"
    assert _launch(tmp_path, run, assets, "step:5", *steps) == -9
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000004"
    assert _launch(tmp_path, run, assets, "step:9", *steps) == -9
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000008"
    assert _launch(tmp_path, run, assets, "none", *steps) == 0
    assert _losses(run) == reference
    ref_weights = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


RESHARD_STEPS = ("train.steps=10", "train.save_every=4", "train.eval_every=5", "train.eval_bpb_tokens=0")


@pytest.fixture(scope="module")
def one_rank_losses(assets, tmp_path_factory) -> list[float]:
    return run_losses(tmp_path_factory.mktemp("one_rank"), assets, *RESHARD_STEPS)


@pytest.mark.parametrize("expert_parallel,zero,resume_zero,stop", [(2, 2, 3, "term"), (1, 3, 1, "step")])
def test_two_ranks_match_one_rank_and_resume_on_one_rank(assets, one_rank_losses, tmp_path, expert_parallel, zero,
                                                         resume_zero, stop):
    """Global batch 4 as 2 ranks x 2 or 1 rank x 4: the same losses (with expert_parallel=2 each rank holds half
    of the experts; at ZeRO 3 each holds half of every parameter from the build on). The 2-rank run stops and
    resumes on 1 rank (EP 1; ZeRO 2 into 3 and 3 into 1), resharded from the per-rank weight and Adam shards, and
    ends with the 1-rank run's losses. It stops either by SIGKILL after step 6 (resumed from its step-4
    checkpoint) or by SIGTERM to rank 0 alone at a random step: the ranks agree (one all-reduce per step), both
    save that step and exit with 75. Bit-exact resume after a signal is test_train's (1 rank) and
    benchmarks/preemption.py's (2 ranks, repeated); tests/test_launch_run.py resumes 2 ranks after SIGTERM."""
    reference = one_rank_losses
    run = tmp_path / "run"
    at = random.Random().randint(5, 9) if stop == "term" else 6
    code = _launch(tmp_path, run, assets, f"{stop}:{at}", *RESHARD_STEPS, "train.micro_batch_size=2",
                   f"deepspeed.expert_parallel_size={expert_parallel}", f"deepspeed.zero_stage={zero}", ranks=2)
    assert code != 0
    two_ranks = _losses(run)
    assert len(two_ranks) >= at - 1  # a SIGKILL after step 6 comes before step 6 is logged
    assert two_ranks == pytest.approx(reference[:len(two_ranks)], rel=1e-5)
    folder = checkpoint.latest_checkpoint(run / "checkpoints")
    assert folder.name == checkpoint.tag_for(at if stop == "term" else 4), f"stopped at step {at}"
    assert sorted(p.name for p in folder.glob("rng_rank*")) == ["rng_rank0.pt", "rng_rank1.pt"]
    saved = checkpoint.read_meta(folder)
    assert (saved["world_size"], saved["expert_parallel_size"], saved["zero_stage"]) == (2, expert_parallel, zero)

    assert _launch(tmp_path, run, assets, "none", *RESHARD_STEPS, f"deepspeed.zero_stage={resume_zero}") == 0
    assert _losses(run) == pytest.approx(reference, rel=1e-5), f"stopped at step {at}"
