"""Trainer tests in this process (CPU, gloo, one rank) on a real tokenizer and real prepared Korean text.

The tokenizer (2,048 pieces) and packed data (3,000 real documents) are built once per session with the
tokenizer and data APIs (golden.build_assets). Multi-process and kill-and-resume tests live in
test_train_dist.py and test_train_resume.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from golden import (
    GOLDEN,
    STABLE_OPTIM,
    assets_identity,
    compare,
    golden_losses,
    link_data,
    run_losses,
    tiny_config,
)
from safetensors.torch import load_file

from ondol.errors import DataError
from ondol.train import checkpoint
from ondol.train.config import OptimConfig
from ondol.train.metrics import read_metrics
from ondol.train.schedule import lr_at

ZERO_RUN = ("train.steps=8", *STABLE_OPTIM)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    from golden import build_assets

    return build_assets(tmp_path_factory.mktemp("train_assets"))


@pytest.fixture(scope="module")
def zero0(assets, tmp_path_factory) -> dict:
    """The reference run: ZeRO 0, 8 steps, checkpoints every 4, the golden run's STABLE_OPTIM: updates depend on
    the clipped gradient's scale (with eps=1e-8 Adam is scale-free, so a stage that clipped differently would go
    unseen, and starved experts' near-zero gradients would magnify rounding)."""
    run = tmp_path_factory.mktemp("zero0")
    losses = run_losses(run, assets, *ZERO_RUN, "train.save_every=4", "train.eval_every=4")
    return {"run": run, "losses": losses}


# ---- schedules ---------------------------------------------------------------------------------------------
def _optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 10, **kw})


def test_warmup_is_linear_to_the_peak():
    for schedule in ("cosine", "wsd", "constant"):
        o = _optim(schedule=schedule)
        assert [lr_at(s, o, 100) for s in range(10)] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])


def test_cosine_matches_the_formula_and_ends_at_the_floor():
    o = _optim(schedule="cosine")
    for s in (10, 25, 54, 77, 99):
        t = (s - 10) / (100 - 10 - 1)
        assert lr_at(s, o, 100) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lr_at(10, o, 100) == pytest.approx(1e-3)
    assert lr_at(99, o, 100) == pytest.approx(1e-4)


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor():
    o = _optim(schedule="wsd", decay_fraction=0.2)  # 100 steps: decay over the last 20
    assert all(lr_at(s, o, 100) == 1e-3 for s in range(10, 80))
    for s in range(80, 100):
        assert lr_at(s, o, 100) == pytest.approx(1e-3 + (1e-4 - 1e-3) * (s - 79) / 20)
    assert lr_at(99, o, 100) == pytest.approx(1e-4)


def test_constant_stays_at_the_peak():
    o = _optim(schedule="constant")
    assert {lr_at(s, o, 100) for s in range(10, 100)} == {1e-3}


# ---- optimizer groups and DeepSpeed config --------------------------------------------------------------
def test_weight_decay_skips_norms_embeddings_and_vectors():
    from ondol.model.config import load_preset
    from ondol.model.transformer import Transformer
    from ondol.train.optim import param_groups

    model = Transformer(load_preset("tiny", vocab_size=256))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in kept and "lm_head.weight" in decayed
    assert all("norm" in n for n in kept - {"embed_tokens.weight"})
    assert {"layers.1.mlp.experts.gate_up_proj", "layers.0.self_attn.q_proj.weight", "layers.1.mlp.gate.weight"} \
        <= decayed
    assert decayed | kept == set(names.values()) and not decayed & kept


def test_deepspeed_config_follows_the_run_config(assets, tmp_path):
    from ondol.train.engine import deepspeed_config

    cfg = tiny_config(tmp_path, assets, "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "train.grad_accum=3",
                      "optim.grad_clip=0.5", "deepspeed.extra={zero_optimization: {overlap_comm: true}}")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    fp32 = deepspeed_config(tiny_config(tmp_path, assets), world_size=1)
    assert fp32["gradient_clipping"] == 0.0 and "bf16" not in fp32  # GuardedAdamW clips (it reports the norm)


def test_bad_values_name_the_key(assets, tmp_path):
    from ondol.configs import ConfigError

    for override, key in (("deepspeed.zero_stage=4", "deepspeed.zero_stage"), ("optim.schedule=linear",
                          "optim.schedule"), ("logging.wandb_mode=on", "logging.wandb_mode"),
                          ("train.log_every=0", "train.log_every"), ("deepspeed.zero_checks=host",
                          "deepspeed.zero_checks")):
        with pytest.raises((ConfigError, ValueError), match=key):
            tiny_config(tmp_path, assets, override)


# ---- training runs -----------------------------------------------------------------------------------------
def test_run_writes_metrics_plot_and_weights_that_reload(zero0):
    from ondol.model.io import load_pretrained

    run = zero0["run"]
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8]
    first = steps[0]
    for key in ("aux_loss", "lr", "grad_norm", "tokens_per_s", "moe/layer1/load_cv", "moe/layer3/load_max",
                "mem/rss_peak_gib", "attn/max_logit"):
        assert key in first, key
    assert "moe/layer0/load_cv" not in first  # layer 0 is dense
    assert "qk_clip/clipped_heads" not in first  # optim.qk_clip is off
    assert not (run / "wandb").exists()  # logging.wandb_mode=disabled (the default) writes nothing
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == "step_00000008"
    model = load_pretrained(run / "model")
    batch = torch.randint(0, model.cfg.vocab_size, (2, 64))
    assert torch.isfinite(model(batch).logits).all()
    assert model.cfg.vocab_size == 2048  # taken from the tokenizer (model.vocab_size: 0)


def test_a_resume_with_another_batch_counts_tokens_exactly_appends_the_log_and_titles_the_plot(assets, zero0,
                                                                                                tmp_path):
    """tokens_seen is summed per step and kept in the checkpoint: 8 steps of 4 x 64 tokens, then 2 of 2 x 64 (not
    step x the current batch). train.log holds the console lines of both attempts; loss.png names the run."""
    from PIL import Image

    run = tmp_path / "resumed"
    shutil.copytree(zero0["run"], run, symlinks=True)
    first_log = (run / "logs" / "train.log").read_text()
    run_losses(run, assets, *ZERO_RUN, "train.steps=10", "train.micro_batch_size=2")
    seen = {r["step"]: r["tokens_seen"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert [seen[s] for s in (8, 9, 10)] == [8 * 256, 8 * 256 + 128, 8 * 256 + 256]
    log = (run / "logs" / "train.log").read_text()
    assert log.startswith(first_log) and f"run {run}: steps 8 -> 10, seed 1234\n" in log[len(first_log):]
    assert [line[20:].split(" |")[0] for line in log.splitlines() if " | loss " in line] == [
        f"step {s:>6}" for s in range(1, 11)]
    assert Image.open(run / "loss.png").text["Title"] == "resumed: 10 steps"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_losses_and_weights(assets, zero0, tmp_path, stage):
    losses = run_losses(tmp_path, assets, *ZERO_RUN, "train.save_every=8", "train.eval_every=8",
                        f"deepspeed.zero_stage={stage}")
    assert losses == pytest.approx(zero0["losses"], rel=1e-5)
    ref = load_file(zero0["run"] / "model" / "model.safetensors")
    got = load_file(tmp_path / "model" / "model.safetensors")  # ZeRO-3: gathered from the partitions
    assert ref.keys() == got.keys()
    for k in ref:
        assert float((got[k] - ref[k]).norm() / ref[k].norm()) < 1e-5, k


def test_golden_losses(assets, tmp_path):
    """The first 50 steps of the tiny run match tests/golden within each step's tolerance, measured across CPU
    kernels (how: tests/golden.py; regenerate: python tests/golden.py --regenerate)."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    identity = assets_identity(assets)
    assert identity == {k: golden[k] for k in identity}, (
        "the tokenizer or data preparation now produces different output than when the golden losses were "
        "recorded; if that change is intended, run `python tests/golden.py --regenerate`")
    losses = golden_losses(tmp_path, assets)
    assert compare(losses, golden["losses"], golden["rel_tol"]) == []


# ---- multi-token prediction -------------------------------------------------------------------------------
MTP = ("model.mtp_layers=1", "model.mtp_loss_weight=0.3")


@pytest.fixture(scope="module")
def mtp_run(assets, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("mtp")
    losses = run_losses(run, assets, *ZERO_RUN, *MTP, "train.save_every=4", "train.eval_every=4")
    return {"run": run, "losses": losses, "records": [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]}


def test_mtp_run_logs_its_loss_and_accuracy_and_saves_its_weights(mtp_run, zero0):
    records = mtp_run["records"]
    assert all(0 < r["mtp/loss"] < 10 and 0 <= r["mtp/acc"] <= 1 for r in records)
    assert records[-1]["mtp/loss"] < records[0]["mtp/loss"] and records[-1]["loss"] < records[0]["loss"]  # warmup
    assert mtp_run["losses"] != zero0["losses"]
    weights = load_file(mtp_run["run"] / "model" / "model.safetensors")
    assert "mtp.0.eh_proj.weight" in weights and "mtp.0.block.self_attn.q_proj.weight" in weights


def test_mtp_resume_is_bit_exact(assets, mtp_run, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    link_data(run, assets)
    step4 = "step_00000004"
    shutil.copytree(mtp_run["run"] / "checkpoints" / step4, run / "checkpoints" / step4)
    losses = run_losses(run, assets, *ZERO_RUN, *MTP, "train.save_every=4", "train.eval_every=4")
    assert losses == mtp_run["losses"][4:]
    resumed = [r["mtp/loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert resumed == [r["mtp/loss"] for r in mtp_run["records"][4:]]


@pytest.mark.parametrize("stage", [2, 3])
def test_mtp_zero_stages_give_the_same_losses(assets, mtp_run, tmp_path, stage):
    losses = run_losses(tmp_path, assets, *ZERO_RUN, *MTP, "train.save_every=8", "train.eval_every=8",
                        f"deepspeed.zero_stage={stage}")
    assert losses == pytest.approx(mtp_run["losses"], rel=1e-5)
    mtp = [r["mtp/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert mtp == pytest.approx([r["mtp/loss"] for r in mtp_run["records"]], rel=1e-5)


# ---- non-finite guard -----------------------------------------------------------------------------------
def _poison(trainer, steps: set[int]) -> None:
    """Make the logits non-finite on the given (1-based) steps, as a blown-up activation would."""
    def hook(module, args, output):
        return output * float("nan") if trainer.step + 1 in steps and module.training else output

    trainer.engine.module.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("overrides", [
    ("deepspeed.zero_stage=0",), ("deepspeed.zero_stage=2",),
    # the CUDA path: the fused kernel skips the update on the device (train/zero_step.py)
    ("deepspeed.zero_stage=2", "deepspeed.precision=bf16", "optim.adamw=fused", "logging.peak_tflops=1",
     "train.eval_bpb_tokens=0", "train.eval_batches=1"),
], ids=["zero0", "zero2", "zero2-bf16-fused"])
def test_nonfinite_steps_are_skipped_and_counted(assets, tmp_path, overrides):
    from ondol.train.trainer import Trainer

    link_data(tmp_path, assets)
    trainer = Trainer(tiny_config(tmp_path, assets, "train.steps=6", "train.save_every=6", *overrides))
    _poison(trainer, {3, 4})
    seen = {}
    step = trainer.train_step

    def spy():
        before = {n: p.detach().clone() for n, p in trainer.consolidated_state_dict().items()}
        step()
        seen[trainer.step] = all(torch.equal(before[n], p) for n, p in trainer.consolidated_state_dict().items())

    trainer.train_step = spy
    summary = trainer.fit()
    assert summary["nonfinite_steps"] == 2
    assert seen == {1: False, 2: False, 3: True, 4: True, 5: False, 6: False}  # weights frozen on skipped steps
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [math.isfinite(v) for v in losses] == [True, True, False, False, True, True]
    assert all(math.isfinite(v) for v in load_file(tmp_path / "model" / "model.safetensors")["lm_head.weight"]
               .flatten().tolist())


def test_nonfinite_run_stops_after_k_in_a_row_keeping_the_last_checkpoint(assets, tmp_path):
    from ondol.train.trainer import NonFiniteError, Trainer

    link_data(tmp_path, assets)
    trainer = Trainer(tiny_config(tmp_path, assets, "train.steps=12", "train.save_every=3",
                                  "train.max_nonfinite=3"))
    _poison(trainer, set(range(5, 13)))
    with pytest.raises(NonFiniteError, match=r"stopping at step 7: 3 optimizer steps in a row.*max_nonfinite=3"):
        trainer.fit()
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006"


# ---- resume compatibility -----------------------------------------------------------------------------------
def test_resume_refuses_a_changed_model_or_tokenizer(zero0, tmp_path):
    folder = checkpoint.latest_checkpoint(zero0["run"] / "checkpoints")
    meta = checkpoint.read_meta(folder)
    checkpoint.check_compatible(folder, meta)  # unchanged: accepted
    wider = {**meta, "model": {**meta["model"], "d_model": 256}}
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"model.d_model: 128 -> 256.*train.resume=never"):
        checkpoint.check_compatible(folder, wider)
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="tokenizer"):
        checkpoint.check_compatible(folder, {**meta, "tokenizer_fingerprint": "0123456789abcdef"})
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"deepspeed.precision: 'fp32' -> 'bf16'\."):
        checkpoint.check_compatible(folder, {**meta, "precision": "bf16"})  # DeepSpeed: KeyError dynamic_loss_scale
    legacy = tmp_path / "step_00000008"  # written before the seed and precision were recorded
    legacy.mkdir()
    (legacy / checkpoint.META).write_text(json.dumps({k: v for k, v in meta.items() if k not in ("seed", "precision")}))
    checkpoint.check_compatible(legacy, {**meta, "seed": 7})  # nothing recorded to compare with


def test_trainer_refuses_to_resume_a_different_shape(assets, zero0, tmp_path):
    from ondol.train.trainer import Trainer

    run = tmp_path / "run"
    link_data(run, assets)
    (run / "checkpoints").symlink_to(zero0["run"] / "checkpoints", target_is_directory=True)
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="model.n_layers: 4 -> 2"):
        Trainer(tiny_config(run, assets, "model.n_layers=2")).fit()


def test_resume_refuses_any_change_of_the_models_function_and_lists_each(zero0):
    folder = checkpoint.latest_checkpoint(zero0["run"] / "checkpoints")
    meta = checkpoint.read_meta(folder)
    model = {**meta["model"], "window": 32, "rope_theta": 500000.0, "max_seq_len": 512, "attn_pattern": "LG"}
    with pytest.raises(checkpoint.IncompatibleCheckpoint) as info:
        checkpoint.check_compatible(folder, {**meta, "model": model, "phases": [{**meta["phases"][0], "seq_len": 32}]})
    assert str(info.value).startswith(
        f"cannot resume from {folder}: model.attn_pattern: 'LLLG' -> 'LG'; model.window: 64 -> 32; "
        "model.rope_theta: 10000.0 -> 500000.0; model.max_seq_len: 1024 -> 512; data.seq_len: 64 -> 32. ")
    kernels_and_losses = {"attn_backend": "sdpa", "moe_dispatch": "bmm_padded", "aux_loss_coef": 0.01,
                          "z_loss_coef": 0.001, "bias_update_rate": 0.0, "mtp_loss_weight": 0.1, "init_std": 0.01}
    checkpoint.check_compatible(folder, {**meta, "model": {**meta["model"], **kernels_and_losses}})


def test_resume_from_before_a_model_key_or_the_weights_were_recorded_takes_their_defaults(zero0, tmp_path):
    from ondol.model.config import ModelConfig

    folder = tmp_path / checkpoint.latest_checkpoint(zero0["run"] / "checkpoints").name
    shutil.copytree(checkpoint.latest_checkpoint(zero0["run"] / "checkpoints"), folder)
    meta = checkpoint.read_meta(folder)
    older = {k: v for k, v in meta.items() if k != "phases"} | {"seq_len": 64}  # before phases and weights
    older["model"] = {k: v for k, v in meta["model"].items() if k != "mtp_layers"}
    (folder / checkpoint.META).write_text(json.dumps(older))
    checkpoint.check_compatible(folder, meta)  # mtp_layers: the default (0) it was trained with
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"model.mtp_layers: 0 -> 1\."):
        checkpoint.check_compatible(folder, {**meta, "model": {**meta["model"], "mtp_layers": 1}})
    assert ModelConfig.mtp_layers == 0


def test_mixture_weights_are_the_configs_and_a_change_is_refused_on_resume(assets, zero0, tmp_path):
    """The loader mixes by data.sources' weights, not the (older) ones in the data manifest; a resume with
    other weights is refused before anything is written, so config.yaml never records weights that did not run."""
    from ondol.train.trainer import Trainer

    run = tmp_path / "run"
    link_data(run, assets)
    (run / "checkpoints").symlink_to(zero0["run"] / "checkpoints", target_is_directory=True)
    cfg = tiny_config(run, assets, *ZERO_RUN)
    assert {s.name: s.weight for s in cfg.data.sources} == {"ko_reviews": 0.6, "ko_docs": 0.4}
    cfg.data.sources[1].weight = 0.9
    trainer = Trainer(cfg)
    assert trainer.loader.weights == trainer.val_loader.weights == {"ko_reviews": 0.6, "ko_docs": 0.9}
    assert json.loads((assets / "data" / "manifest.json").read_text())["weights"]["ko_docs"] == 0.4
    with pytest.raises(checkpoint.IncompatibleCheckpoint,
                       match=r": data.sources\[ko_docs\].weight: 0.4 -> 0.9\. Restore the original setting"):
        trainer.fit()
    assert not (run / "config.yaml").exists()
    cfg.data.sources[0].name = "ko_news"
    with pytest.raises(DataError, match=r"data.sources \['ko_news'\] are not in .*re-run `ondol data prepare"):
        Trainer(cfg)


def test_train_refuses_data_prepared_with_another_tokenizer(assets, tmp_path, capsys):
    """Exit 3 and one line naming both folders: the data's token ids belong to the other tokenizer."""
    from ondol.configs import to_yaml
    from ondol.launch.cli import main

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for part in (assets / "data").iterdir():
        (run / "data" / part.name).symlink_to(part)
    manifest = json.loads((assets / "data" / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"  # as `ondol data prepare` with another tokenizer
    (run / "data" / "manifest.json").unlink()
    (run / "data" / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny_config(run, assets)))
    assert main(["train", str(config)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"ondol: data error: {run / 'data'} was prepared with tokenizer 0123456789abcdef, but "
                          f"the run's tokenizer at {assets / 'tokenizer'} is "), err
    assert "`ondol data prepare CONFIG`" in err and len(err.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists()


def test_incomplete_checkpoint_is_ignored(zero0, tmp_path):
    ckpts = tmp_path / "checkpoints"
    for folder in checkpoint.complete_checkpoints(zero0["run"] / "checkpoints"):
        shutil.copytree(folder, ckpts / folder.name)
    (ckpts / "step_00000012").mkdir()  # a save cut short: shards but no meta.json
    (ckpts / checkpoint.LATEST).write_text("step_00000012")  # even if the pointer were ahead
    assert checkpoint.latest_checkpoint(ckpts).name == "step_00000008"


# ---- checkpoint safety ----------------------------------------------------------------------------------------
def _copy_run(zero0: dict, run: Path, assets: Path) -> Path:
    """A run directory holding a copy of the reference run's checkpoints and metrics."""
    link_data(run, assets)
    shutil.copytree(zero0["run"] / "checkpoints", run / "checkpoints")
    shutil.copy(zero0["run"] / "metrics.jsonl", run / "metrics.jsonl")
    return run / "checkpoints"


def _rows(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]


def test_latest_pointer_cannot_leave_the_checkpoint_directory(zero0, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint.latest_checkpoint(zero0["run"] / "checkpoints"), elsewhere / "step_00000099")
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(zero0["run"] / "checkpoints" / "step_00000004", ckpts / "step_00000004")
    (ckpts / checkpoint.LATEST).write_text("../../elsewhere/step_00000099")
    assert checkpoint.latest_checkpoint(ckpts).name == "step_00000004"


def test_damaged_newest_checkpoint_falls_back_with_one_line_and_resumes_exactly(assets, zero0, tmp_path, capsys):
    from ondol.train.trainer import Trainer

    run = tmp_path / "run"
    ckpts = _copy_run(zero0, run, assets)
    shard = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    Trainer(tiny_config(run, assets, *ZERO_RUN, "train.save_every=4", "train.eval_every=4")).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping")]
    expected = f"skipping damaged checkpoint step_00000008: {shard} has {size // 2:,} bytes, meta.json recorded {size:,}"
    assert lines == [expected]
    assert _rows(run) == _rows(zero0["run"])  # resumed at step 4; metrics.jsonl reads as one run
    ref, got = (load_file(d / "model" / "model.safetensors") for d in (zero0["run"], run))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def _flip(path: Path, offset: int, count: int = 1) -> None:
    """Invert `count` bytes of a file in place: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _skipped(ckpts: Path) -> tuple[str | None, list[str]]:
    lines = []
    found = checkpoint.latest_checkpoint(ckpts, lines.append)
    return (found.name if found else None), lines


def test_flipped_bytes_of_the_right_size_fall_back_to_the_previous_checkpoint(zero0, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(zero0["run"] / "checkpoints", ckpts)
    states = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    recorded = checkpoint.read_meta(states.parent)["xxh3_128"][states.name]
    assert recorded == xxhash.xxh3_128(states.read_bytes()).hexdigest()  # the digest is of the bytes written
    _flip(states, states.stat().st_size // 2)
    expected = (f"skipping damaged checkpoint step_00000008: {states} does not have the xxh3_128 digest meta.json "
                "recorded (its bytes changed)")
    assert _skipped(ckpts) == ("step_00000004", [expected])
    assert checkpoint.damage(states.parent, verify=False) is None  # sizes alone cannot see it


def test_a_symlinked_step_folder_is_skipped_and_never_removed_through(zero0, tmp_path):
    other = tmp_path / "other"  # another run's checkpoint, linked in under a newer step's name
    shutil.copytree(zero0["run"] / "checkpoints" / "step_00000004", other / "step_00000004")
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(zero0["run"] / "checkpoints" / "step_00000004", ckpts / "step_00000004")
    link = ckpts / "step_00000030"
    link.symlink_to(other / "step_00000004", target_is_directory=True)
    (ckpts / checkpoint.LATEST).write_text(link.name)
    expected = (f"skipping damaged checkpoint step_00000030: {link} is a symbolic link (checkpoints are read only "
                f"from inside {ckpts})")
    assert _skipped(ckpts) == ("step_00000004", [expected])
    before = sorted(p.name for p in (other / "step_00000004").iterdir())
    checkpoint._prune(ckpts, keep_last=1, keep=ckpts / "step_00000004")  # the link is not one of the run's
    checkpoint._remove(link)  # a save of step 30 replaces the link itself
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"]
    assert sorted(p.name for p in (other / "step_00000004").iterdir()) == before


def test_meta_that_disagrees_with_its_folder_or_does_not_parse_is_skipped(zero0, tmp_path):
    ckpts = tmp_path / "checkpoints"
    for folder in checkpoint.complete_checkpoints(zero0["run"] / "checkpoints"):
        shutil.copytree(folder, ckpts / folder.name)
    (ckpts / "step_00000008").rename(ckpts / "step_00000012")  # meta.json still says step 8
    meta = ckpts / "step_00000012" / checkpoint.META
    expected = f"skipping damaged checkpoint step_00000012: {meta} records step 8, its folder's name step 12"
    assert _skipped(ckpts) == ("step_00000004", [expected])
    meta.write_text(meta.read_text()[:100])  # cut short
    name, lines = _skipped(ckpts)
    assert name == "step_00000004" and len(lines) == 1
    assert lines[0].startswith(f"skipping damaged checkpoint step_00000012: {meta} is unreadable (")


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_unpickles_nothing_with_weights_only_false(assets, tmp_path, monkeypatch, stage):
    from ondol.train.trainer import Trainer

    run_losses(tmp_path, assets, "train.steps=2", f"deepspeed.zero_stage={stage}")
    calls, load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append((str(args[0]), kwargs.get("weights_only")))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    trainer = Trainer(tiny_config(tmp_path, assets, "train.steps=3", f"deepspeed.zero_stage={stage}"))
    trainer.fit()
    assert trainer.step == 3
    names = {Path(path).name for path, _ in calls}
    assert {"rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names
    assert [c for c in calls if c[1] is not True] == []


def test_resume_never_moves_earlier_checkpoints_aside(assets, zero0, tmp_path):
    run = tmp_path / "run"
    _copy_run(zero0, run, assets)
    run_losses(run, assets, "train.steps=2", "train.resume=never")
    (aside,) = run.glob("checkpoints.replaced-*")
    assert sorted(p.name for p in checkpoint.complete_checkpoints(aside)) == ["step_00000004", "step_00000008"]
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert [r[0] for r in _rows(run)] == [0, 1, 2, 2]  # a fresh start: the old rows and step-0 row replaced


def test_stop_signal_saves_at_that_step_and_resume_is_bit_exact(assets, zero0, tmp_path):
    from ondol.train.preemption import Preempted
    from ondol.train.trainer import Trainer

    stop_at = random.Random().randint(1, 7)
    run = tmp_path / "run"
    link_data(run, assets)
    cfg = tiny_config(run, assets, *ZERO_RUN, "train.save_every=4", "train.eval_every=4")
    trainer = Trainer(cfg)
    step = trainer.train_step

    def signalled_step():
        step()
        if trainer.step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = signalled_step
    with pytest.raises(Preempted, match=f"SIGUSR1.*after step {stop_at}"):
        trainer.fit()
    assert checkpoint.latest_checkpoint(run / "checkpoints").name == checkpoint.tag_for(stop_at)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    Trainer(cfg).fit()
    assert _rows(run) == _rows(zero0["run"]), f"stopped at step {stop_at}"
    ref, got = (load_file(d / "model" / "model.safetensors") for d in (zero0["run"], run))
    assert all(torch.equal(ref[k], got[k]) for k in ref), f"stopped at step {stop_at}"


def test_logged_loss_averages_only_the_applied_steps(assets, tmp_path):
    """Per-step losses (log_every=1) are the reference for a 3-step interval holding one skipped step."""
    from ondol.train.trainer import Trainer

    logged = {}
    for every in (1, 3):
        run = tmp_path / f"every{every}"
        link_data(run, assets)
        trainer = Trainer(tiny_config(run, assets, "train.steps=3", f"train.log_every={every}"))
        _poison(trainer, {2})
        trainer.fit()
        logged[every] = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    per_step = [r["loss"] for r in logged[1]]
    assert math.isnan(per_step[1]) and logged[3][0]["nonfinite_steps"] == 1
    assert logged[3][0]["loss"] == pytest.approx((per_step[0] + per_step[2]) / 2, rel=1e-12)


# ---- wandb ----------------------------------------------------------------------------------------------
def test_wandb_offline_writes_a_local_run(assets, tmp_path):
    """(disabled, the default, writes nothing: test_run_writes_metrics_plot_and_weights_that_reload)"""
    offline = tmp_path / "offline"
    run_losses(offline, assets, "train.steps=2", "logging.wandb_mode=offline", "train.eval_every=2")
    runs = list((offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert len([r for r in read_metrics(offline / "metrics.jsonl") if "loss" in r]) == 2


SECOND_SIGNAL = """
import os, signal, sys, time
from pathlib import Path
from ondol.train import preemption
preemption.REPEAT_WINDOW_S = 0.5
with preemption.StopRequest(["TERM", "USR1"], Path(sys.argv[1]), None, 1) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # the same signal relayed at once by a launcher: one request
    print("asked:", stop.local(), stop.reason, flush=True)
    time.sleep(0.6)
    os.kill(os.getpid(), signal.SIGUSR1)  # a second request: exit now, without saving
    time.sleep(5)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once_and_a_relayed_one_does_not(tmp_path):
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, str(tmp_path / "stop")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 128 + signal.SIGUSR1
    assert done.stdout == "asked: True SIGTERM\n"
    assert done.stderr.splitlines() == [
        ("received SIGTERM: finishing this optimizer step, saving a checkpoint, then exiting (signal again to stop "
        "at once)"), "received SIGUSR1 again: exiting now without saving"]


def test_cpu_threads_come_from_the_config_the_launcher_or_the_free_cores(monkeypatch):
    from ondol.train.config import TrainConfig
    from ondol.train.engine import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr("ondol.train.engine.busy_cores", lambda: 0.0)
    assert cpu_threads(0) == (cores, f"auto: {cores} of {cores} cores free at start")
    monkeypatch.setattr("ondol.train.engine.busy_cores", lambda: cores + 3.0)  # more jobs than cores
    assert cpu_threads(0)[0] == 1 and cpu_threads(3) == (3, "train.cpu_threads")
    assert cpu_threads(0, resumed=2) == (2, "auto: the resumed checkpoint's")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # ondol launch's share of the node's cores per rank
    assert cpu_threads(0) == (2, "auto: OMP_NUM_THREADS") and cpu_threads(1)[0] == 1
    with pytest.raises(ValueError, match="train.cpu_threads must be >= 0"):
        TrainConfig(cpu_threads=-1)


def test_auto_cpu_threads_are_kept_in_the_checkpoint_and_a_resume_uses_them_again(assets, tmp_path, monkeypatch):
    """A run that started beside another job (one free core) resumes on a free machine with its one thread: the
    thread count orders fp32 sums, so a resume repeats the saved run's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr("ondol.train.engine.busy_cores", lambda: cores - 1.0)
    auto = ("train.cpu_threads=0", "train.save_every=2", "train.eval_every=10")
    run_losses(tmp_path, assets, "train.steps=2", *auto)
    assert checkpoint.read_meta(tmp_path / "checkpoints" / "step_00000002")["cpu_threads"] == 1
    monkeypatch.setattr("ondol.train.engine.busy_cores", lambda: 0.0)
    run_losses(tmp_path, assets, "train.steps=4", *auto)
    assert torch.get_num_threads() == 1
    assert checkpoint.read_meta(tmp_path / "checkpoints" / "step_00000004")["cpu_threads"] == 1


# ---- console and metrics rows -------------------------------------------------------------------------------
def test_console_off_a_terminal_is_whole_timestamped_lines_with_header_and_timing(assets, tmp_path, capsys):
    """pytest's captured stdout is not a terminal: no bar, no wrapping, every line stamped; MFU on CPU too."""
    import re
    from datetime import datetime

    from ondol.model.flops import param_counts, train_flops_per_token

    run_losses(tmp_path, assets, "train.steps=3", "train.log_every=1", "train.eval_every=3",
               "train.save_every=3", "optim.warmup_steps=5", "logging.progress=true")
    out = capsys.readouterr().out
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    lines = [line for line in out.splitlines() if re.match(stamp, line)]
    assert "\r" not in out
    assert (tmp_path / "logs" / "train.log").read_text().splitlines() == lines  # the console, kept in the run
    cfg = tiny_config(tmp_path, assets)
    counts = param_counts(dataclasses.replace(cfg.model, vocab_size=2048))
    flops = train_flops_per_token(dataclasses.replace(cfg.model, vocab_size=2048), 64)
    body = [line[20:] for line in lines]
    assert body[0] == f"run {tmp_path}: steps 0 -> 3, seed 1234"
    assert body[1].startswith(f"model: {counts['total'] / 1e6:.3g}M parameters, {counts['active'] / 1e6:.3g}M "
                              f"active per token (4 layers, d_model 128, 8 experts top-2 + 1 shared), "
                              f"{flops / 1e6:.3g}M FLOPs per token (forward + backward)")
    assert body[2] == ("layout: world 1 = data-parallel 1 (expert-parallel groups of 1), ZeRO stage 0, fp32; batch "
                       "4 x 1 x 1 x 64 = 256 tokens per step (micro-batch x grad-accum x data-parallel x seq)")
    assert re.fullmatch(r"MFU: model FLOPs \(the per-token figure above; activation checkpointing's "
                        r"recompute not counted\) over a peak of [\d.e+-]+ TFLOP/s x 1 rank\(s\) "
                        r"\(measured fp32 matmul on cpu\)", body[3])
    assert body[4] == ("warning: optim.warmup_steps 5 >= train.steps 3: the learning rate ramps for the whole run "
                       "and never decays; lower optim.warmup_steps")
    threads = re.fullmatch(r"cpu threads: (\d+) per rank \(.+; train.cpu_threads sets it\)", body[5])
    assert threads and int(threads.group(1)) == torch.get_num_threads()  # what the run used, logged
    steps = [b for b in body if re.match(r"step +[123] \| loss", b)]
    assert len(steps) == 3
    assert re.fullmatch(r"step +3 \| loss \d+\.\d{4} \| lr [\d.e+-]+ \| gnorm [\d.]+ \| [\d,]+ tok/s \| [\d,]+ "
                        r"ms/step \| mfu \d+\.\d% \| load cv [\d.]+ \| nonfinite 0 \| 768 tokens \| elapsed 0:00:\d\d eta 0:00:00",
                        steps[-1]), steps[-1]
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["tokens_seen"] for r in records] == [256, 512, 768]
    assert all(r["mfu"] > 0 and r["ms_per_step"] > 0 for r in records)  # the peak is measured: no upper bound
    assert records[0]["eta_s"] == pytest.approx(2 * records[0]["ms_per_step"] / 1000)
    for r in read_metrics(tmp_path / "metrics.jsonl"):
        assert datetime.fromisoformat(r["time"]).utcoffset().total_seconds() == 0  # every row, UTC


def test_deepspeed_start_up_output_goes_to_its_log_and_the_libaio_probe_is_explained(tmp_path, capfd, monkeypatch):
    from ondol.train.deepspeed_log import NO_LIBAIO_NOTE, build_output_to

    monkeypatch.delenv("ONDOL_DEBUG", raising=False)
    probe = "/usr/bin/ld: cannot find -laio: No such file or directory\n"
    log = tmp_path / "deepspeed-rank0.log"
    with build_output_to(log):  # a compiler writes to file descriptor 2, as DeepSpeed's op probe does
        subprocess.run([sys.executable, "-c", f"import sys; sys.stderr.write({probe!r})"], check=True)
    with build_output_to(log):
        print("op built")
    assert log.read_text() == probe + NO_LIBAIO_NOTE + "op built\n"
    assert capfd.readouterr() == ("", "")


def test_live_bar_on_a_terminal_only(tmp_path, monkeypatch):
    from ondol.train.config import LoggingConfig
    from ondol.train.metrics import MetricsSink

    for tty in (True, False):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        sink = MetricsSink(tmp_path, 10, 0, LoggingConfig(wandb_mode="disabled"), True, {})
        assert (sink.progress is not None) == tty
        sink.close()
