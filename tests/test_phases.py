"""Training in phases (train.phases) on real text: the rate of each phase against the run-wide schedules it
reproduces, the plan's bad input, an exact resume mid-phase and across a switch of mixture and sequence length,
a deliberate change of the phases ahead (and of the context length) kept apart from a refused change of the past,
and checkpoint averaging against a hand average. The loader's switch itself is tested in test_data_loader.py;
SIGKILL across a switch in test_train_procs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from golden import STABLE_OPTIM, build_assets, run_losses, tiny_config

from ondol.configs import load_config
from ondol.errors import ConfigError
from ondol.train import checkpoint, phases
from ondol.train.config import OptimConfig
from ondol.train.metrics import read_metrics
from ondol.train.schedule import lr_at, phase_lr_at

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("train.eval_every=100", "train.eval_batches=1", "train.eval_bpb_tokens=0", "train.save_every=2",
         "train.keep_last=3", "optim.schedule=constant", "optim.warmup_steps=0", *STABLE_OPTIM)
# 3 steps on the 60:40 mixture at 64 tokens, then an anneal of 3 on ko_docs alone at 128, the rate decaying
PLAN = "train.phases=[{name: pre, steps: 3}, {name: anneal, steps: 3, weights: {ko_docs: 1}, seq_len: 128, " \
       "lr_schedule: linear}]"


# ---- the rate of each phase --------------------------------------------------------------------------------
def _plan(*phases_):
    """Phases from (steps, schedule, lr, warmup) tuples."""
    out, start = [], 0
    for steps, schedule, lr, warmup in phases_:
        out.append(phases.Phase(f"p{start}", start, steps, {"a": 1.0}, 64, schedule, lr, warmup))
        start += steps
    return out


def test_constant_then_linear_phases_are_wsd_and_one_cosine_phase_is_cosine():
    optim = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    wsd = _plan((80, "constant", 0.0, 0), (20, "linear", 0.0, 0))
    assert [phase_lr_at(s, wsd, optim, 100) for s in range(100)] == [lr_at(s, optim, 100) for s in range(100)]
    cosine = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    one = _plan((100, "cosine", 0.0, 0))
    assert [phase_lr_at(s, one, cosine, 100) for s in range(100)] == [lr_at(s, cosine, 100) for s in range(100)]
    run = _plan((60, "run", 0.0, 0), (40, "run", 0.0, 0))
    assert [phase_lr_at(s, run, cosine, 100) for s in range(100)] == [lr_at(s, cosine, 100) for s in range(100)]


def test_a_phase_rewarms_to_its_own_rate_and_a_phase_without_one_starts_where_the_last_ended():
    optim = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=0)
    plan = _plan((10, "linear", 0.0, 0), (10, "constant", 0.0, 0), (10, "cosine", 4e-4, 4))
    lrs = [phase_lr_at(s, plan, optim, 30) for s in range(30)]
    assert lrs[9] == pytest.approx(1e-4) and lrs[10:20] == [lrs[9]] * 10  # the floor, held
    assert lrs[20:24] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])  # warmup to the phase's own lr
    assert lrs[24] == pytest.approx(4e-4) and lrs[29] == pytest.approx(1e-4)  # cosine from 4e-4 to the floor


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.phases[1].weights={ko_new: 1}", r"train.phases\[1\].weights names unknown sources \['ko_new'\]"),
    ("train.phases[1].weights={ko_docs: 0, ko_mixed: 0, ko_reviews: 0}", r"train.phases\[1\].weights sum to 0"),
    ("train.phases[0].weights={ko_docs: -1, ko_mixed: 2}", r"train.phases\[0\].weights: \{'ko_docs': -1.0\} must"),
    ("train.steps=600", r"train.phases: the phases' steps add up to 500, train.steps is 600"),
    ("train.phases[1].steps=0", r"train.phases\[1\].steps must be >= 1"),
    ("train.phases[1].seq_len=2048", r"train.phases\[1\].seq_len \(2048\) is above model.max_seq_len \(1024\)"),
    ("train.phases[1].lr_schedule=wsd", r"train.phases\[1\].lr_schedule must be run, constant, linear, cosine"),
    ("train.phases[0].lr_schedule=run|train.phases[0].lr=0.001",
     r"train.phases\[0\]: lr and warmup_steps need lr_schedule constant"),
    ("train.phases[1].warmup_steps=100", r"train.phases\[1\].warmup_steps must lie in \[0, train.phases\[1\]"),
    ("train.phases[1].name=pretrain", r"train.phases: names \['pretrain', 'pretrain'\] repeat"),
])
def test_a_bad_phase_plan_is_one_line_naming_the_key(override, message, capsys):
    from ondol.launch.cli import main

    config = ROOT / "configs" / "tiny-ko-phases.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(config, override.split("|"))
    assert main(["train", str(config), *override.split("|")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ondol: config error: ") and "Traceback" not in err


def test_the_past_of_a_plan_is_fixed_and_its_future_free():
    old = _plan((10, "constant", 0.0, 0), (10, "linear", 0.0, 0))
    moved = [old[0], phases.Phase("p10", 10, 15, {"a": 1.0, "b": 1.0}, 128, "cosine", 0.0, 0)]
    assert phases.past_changes(old, moved, 10, True) == ([], [])  # phase 2 had not begun: free
    assert phases.future_change(old, moved, 10).startswith("from step 10: p10: steps 10-25, seq_len 128")
    assert phases.past_changes(old, moved, 12, True) == (
        ["train.phases[1].seq_len: 64 -> 128"],
        ["train.phases[1].weights.b: 0 -> 1.0", "train.phases[1].lr_schedule: 'linear' -> 'cosine'"])
    longer = [phases.Phase("p0", 0, 14, {"a": 1.0}, 64, "constant"), phases.Phase("p14", 14, 10, {"a": 1.0}, 64,
                                                                                   "linear")]
    assert phases.past_changes(old, longer, 10, True)[1] == []  # the phase ending at the resume may grow
    assert phases.past_changes(old, longer, 12, True)[1] == ["train.phases[0].steps: 10 -> 14",
                                                            "train.phases[1] first step: 10 -> 14"]
    assert phases.future_change(old, old, 12) is None


# ---- training runs -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "train_assets")


@pytest.fixture(scope="module")
def phased(assets, tmp_path_factory) -> dict:
    """The reference: 6 steps in two phases, checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("phased")
    losses = run_losses(run, assets, *QUICK, "train.steps=6", PLAN)
    return {"run": run, "losses": losses}


def _from(run: Path, source: Path, step: int) -> Path:
    """A copy of run `source` as it was when it had just saved checkpoint `step`."""
    shutil.copytree(source, run, symlinks=True)
    for folder in checkpoint.complete_checkpoints(run / "checkpoints"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (run / "checkpoints" / checkpoint.LATEST).write_text(checkpoint.tag_for(step))
    shutil.rmtree(run / "model")
    return run


def test_a_phased_run_switches_mixture_length_and_rate_at_its_step_and_logs_the_shares(phased):
    records = {r["step"]: r for r in read_metrics(phased["run"] / "metrics.jsonl") if "loss" in r}
    assert [records[s]["phase"] for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    assert [records[s]["tokens_seen"] for s in (3, 4, 6)] == [3 * 256, 3 * 256 + 512, 3 * 256 + 3 * 512]
    assert records[3]["share/ko_reviews"] == pytest.approx(7 / 12) and records[4]["share/ko_docs"] == 1.0
    assert "share/ko_reviews" not in records[4]
    assert [records[s]["lr"] for s in (3, 4, 6)] == pytest.approx([3e-3, 3e-3 - 2.7e-3 / 3, 3e-4])
    log = (phased["run"] / "logs" / "train.log").read_text()
    assert "phase 2/2 anneal: steps 3 -> 6, seq_len 128, lr linear; ko_docs 100.0% (" in log
    assert checkpoint.read_meta(phased["run"] / "checkpoints" / "step_00000006")["phases"][1]["seq_len"] == 128


def test_a_resume_in_the_phase_after_a_switch_of_length_is_bit_exact(assets, phased, tmp_path):
    """From step 4, one step into the 128-token anneal (a resume from step 2, across the switch: the next test)."""
    from safetensors.torch import load_file

    run = _from(tmp_path / "run", phased["run"], 4)
    assert run_losses(run, assets, *QUICK, "train.steps=6", PLAN) == phased["losses"]
    ref, got = (load_file(r / "model" / "model.safetensors") for r in (phased["run"], run))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_short_context_checkpoint_goes_on_in_a_longer_phase_with_its_optimizer_state(assets, phased, tmp_path):
    """A run of 2 steps without phases, resumed with the reference's plan (its phase 2, at 128 tokens, still ahead):
    accepted, recorded, and the losses are the reference's, so weights, Adam moments and data order all went on."""
    run = tmp_path / "short"
    run_losses(run, assets, *QUICK, "train.steps=2")
    losses = run_losses(run, assets, *QUICK, "train.steps=6", PLAN)
    assert losses == phased["losses"]
    meta = checkpoint.read_meta(run / "checkpoints" / "step_00000006")
    assert meta["plan_changes"] == [{"step": 2, "change": "phases from step 2: pre: steps 2-3, seq_len 64, lr run, "
                                     "mix ko_reviews 60.0%, ko_docs 40.0%; anneal: steps 3-6, seq_len 128, lr "
                                     "linear, mix ko_docs 100.0%"}]
    assert "resumed at step 2 with a deliberate change" in (run / "logs" / "train.log").read_text()


def test_a_longer_data_seq_len_needs_allow_seq_len_change_and_keeps_the_optimizer_state(assets, phased, tmp_path):
    from ondol.model.io import read_tensor, tensor_index
    from ondol.train.state_shards import OPTIM_INDEX, OPTIM_SINGLE
    from ondol.train.trainer import Trainer

    run = _from(tmp_path / "run", phased["run"], 2)
    longer = ("train.steps=4", "data.seq_len=128", "model.max_seq_len=2048")
    with pytest.raises(checkpoint.IncompatibleCheckpoint,
                       match=r"02: model.max_seq_len: 1024 -> 2048; data.seq_len: 64 -> 128\. Restore the original "
                             r"setting \(or set train.allow_seq_len_change=true to go on at the new length\)"):
        Trainer(tiny_config(run, assets, *QUICK, *longer)).fit()
    trainer = Trainer(tiny_config(run, assets, *QUICK, *longer, "train.allow_seq_len_change=true"))
    trainer._resume(finished_ok=False)
    assert trainer.accepted == ["model.max_seq_len: 1024 -> 2048", "data.seq_len: 64 -> 128",
                                ("phases from step 2: run: steps 2-4, seq_len 128, lr run, mix ko_reviews 60.0%, "
                                 "ko_docs 40.0%")]
    assert trainer.loader.seq_len == 128 and trainer.loader.segments[0].phase.seq_len == 64  # the past as it ran
    folder = run / "checkpoints" / "step_00000002"
    index = tensor_index(folder, OPTIM_INDEX, OPTIM_SINGLE)
    for name, p in trainer.engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            saved = read_tensor(folder, index[f"{name}.{key}"], f"{name}.{key}")
            assert torch.equal(trainer.optimizer.state[p][key], saved), (name, key)


def test_a_change_of_a_phase_already_begun_is_refused_naming_the_key(phased):
    folder = phased["run"] / "checkpoints" / "step_00000004"
    meta = checkpoint.read_meta(folder)
    changed = json.loads(json.dumps(meta["phases"]))
    changed[0]["weights"]["ko_docs"] = 0.9
    with pytest.raises(checkpoint.IncompatibleCheckpoint,
                       match=r"step_00000004: train.phases\[0\].weights.ko_docs: 0.4 -> 0.9\. Restore"):
        checkpoint.check_compatible(folder, {**meta, "phases": changed}, phases_declared=True)
    changed = json.loads(json.dumps(meta["phases"]))
    changed[1]["seq_len"] = 256
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"train.phases\[1\].seq_len: 128 -> 256\. "):
        checkpoint.check_compatible(folder, {**meta, "phases": changed}, phases_declared=True)
    changed[1].update(seq_len=128, steps=5)  # the running phase may end later
    assert checkpoint.check_compatible(folder, {**meta, "phases": changed}, phases_declared=True) == [
        "phases from step 4: anneal: steps 4-8, seq_len 128, lr linear, mix ko_docs 100.0%"]


# ---- checkpoint averaging ----------------------------------------------------------------------------------
def test_the_average_of_the_last_checkpoints_is_their_hand_average_and_loads_everywhere(phased, tmp_path, capsys):
    from ondol.launch.cli import main
    from ondol.model.io import load_pretrained
    from ondol.train.evaluation import load_model

    run = phased["run"]
    assert main(["average", str(run), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    hand = [checkpoint.model_state(run / "checkpoints" / f"step_0000000{s}") for s in (4, 6)]
    model = load_pretrained(tmp_path / "avg")
    state = model.state_dict()
    for name, a in hand[0].items():
        assert torch.equal(state[name], ((a.double() + hand[1][name].double()) / 2).float()), name
    evaluated = load_model(run, str(tmp_path / "avg")).state_dict()  # ondol eval / generate --checkpoint
    assert all(torch.equal(evaluated[k], v) for k, v in state.items())
    assert json.loads((tmp_path / "avg" / "average.json").read_text())["steps"] == [4, 6]
    capsys.readouterr()
    assert main(["average", str(run), "--last", "4"]) == 2
    assert capsys.readouterr().err == (f"ondol: config error: --last 4: {run}/checkpoints holds 3 complete "
                                       "checkpoint(s) (step_00000002, step_00000004, step_00000006); give --last at "
                                       "most that, or keep more with train.keep_last when training\n")
