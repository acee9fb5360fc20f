"""Sequence parallelism (deepspeed.sequence_parallel_size, DeepSpeed-Ulysses) on CPU over gloo, real text.

References: the same model on whole rows in one process (losses, gradients, logits), and the golden losses of
the tiny run (tests/golden/, one rank) for training through `python -m ondol.train` under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from golden import GOLDEN, STABLE_OPTIM, build_assets
from test_train_procs import _launch, _losses

from ondol.configs import load_config
from ondol.errors import ConfigError
from ondol.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "train_assets")


# ----- one step against the whole-row model ------------------------------------------------------------------

# (name, model overrides, backward): sliding windows of 16 in rows of 64, document masking (on by default),
# within-document RoPE positions that continue across shards, sinks sliced per rank, one KV head replicated
# to the group, selective activation checkpointing around the all-to-alls, two MTP depths whose targets cross
# the shard boundary; flex (no CPU backward) forward only.
CASES = [
    ("sdpa_sinks_doc_positions", {"attn_sinks": True, "doc_positions": True}, "none"),
    ("one_kv_head_replicated_selective_mtp", {"n_kv_heads": 1, "rope_on_global": True, "mtp_layers": 2},
     "selective"),
    ("flex_forward", {"attn_backend": "flex", "doc_positions": True}, None),
]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist

    from ondol.data.loader import TokenLoader
    from ondol.model.config import load_preset
    from ondol.model.transformer import Transformer
    from ondol.train.config import TrainConfig
    from ondol.train.engine import skip_shared_memory_op
    from ondol.train.fast_paths import apply_compile_and_checkpointing
    from ondol.train.qk_clip import QKClip
    from ondol.train.sequence_parallel import apply_sequence_parallel

    torch.set_num_threads(1)
    skip_shared_memory_op()
    deepspeed.init_distributed("gloo")
    batch = next(TokenLoader(data, "train", 64, 2, seed=3))  # whole rows of real text, the same on every rank
    assert int(batch["doc_ids"].max()) > 0  # rows hold several documents: masking and positions matter
    report = {}
    for name, overrides, recompute in CASES:
        cfg = load_preset("tiny", vocab_size=2048, window=16, moe_dispatch="loop", **overrides)
        model = Transformer(cfg, seed=5)
        sp = apply_sequence_parallel(model, world)
        if recompute is not None:
            apply_compile_and_checkpointing(model, TrainConfig(activation_checkpointing=recompute))
        shard = sp.shard(batch)
        clip = QKClip(model, threshold=0.0)
        clip.track(recompute is not None)  # the largest logits, on the backends that train (not CPU flex)
        with torch.set_grad_enabled(recompute is not None):
            whole = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"])
            whole_logits = torch.stack([a.max_logit.clone() for a in model.attention_layers()])
            clip.measure(world_size=1)  # resets them
            if recompute is not None:
                (whole.loss + whole.aux_loss + whole.mtp_loss).backward()
                reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                model.zero_grad()
            with sp.sharded():
                part = model(shard["input_ids"], labels=shard["labels"], doc_ids=shard["doc_ids"],
                             positions=shard["positions"], next_ids=shard.get("next_ids"),
                             next_labels=shard.get("next_labels"))
            loss, mtp_loss = sp.losses(part, shard)
        n = 64 // world
        if recompute is not None:  # each rank measures its heads over whole rows, -inf for the others'
            part_logits = torch.stack([a.max_logit for a in model.attention_layers()])
            dist.all_reduce(part_logits, op=dist.ReduceOp.MAX)
            gap = float(((part_logits - whole_logits) / whole_logits.abs().max()).abs().max())
            report.setdefault("max_logit", {})[name] = gap
        mine = slice(sp.rank * n, (sp.rank + 1) * n)
        gap = (part.logits - whole.logits[:, mine]).abs().max() / whole.logits.abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)  # the worst rank's
        row = {"logits": float(gap)}
        summed = torch.stack([loss, mtp_loss]).detach()
        dist.all_reduce(summed)
        row["loss"] = abs(float(summed[0]) / world - float(whole.loss)) / float(whole.loss)
        if cfg.mtp_layers:
            row["mtp_loss"] = abs(float(summed[1]) / world - float(whole.mtp_loss)) / float(whole.mtp_loss)
        if recompute is not None:
            (loss + part.aux_loss + mtp_loss).backward()
            worst = 0.0
            for pname, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)  # DeepSpeed's data-parallel average over every rank
                grad /= world
                ref = reference[pname]
                worst = max(worst, float((grad - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
            row["grad"] = worst
        report[name] = row
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def test_shards_give_the_whole_rows_loss_logits_and_gradients(assets, tmp_path):
    """SP=2: each rank's logits are the whole-row model's for its shard, the loss shares sum to the row mean, and
    the world-averaged gradients (what DeepSpeed applies) equal the whole-row gradients, within fp32 rounding
    (a different summation order: relative 1e-5 of each tensor's largest gradient)."""
    out = tmp_path / "report.json"
    mp.spawn(_worker, args=(2, free_port(), str(assets / "data"), str(out)), nprocs=2, join=True)
    report = json.loads(out.read_text())
    for name, _, recompute in CASES:
        row = report[name]
        assert row["logits"] < 1e-5 and row["loss"] < 1e-6 and row.get("mtp_loss", 0) < 1e-6, (name, row)
        if recompute is not None:
            assert row["grad"] < 1e-5, (name, row)
            assert report["max_logit"][name] < 1e-5, name


# ----- training through the launcher entry, against the golden one-rank losses ------------------------------

def _golden(steps: int) -> list[float]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["losses"][:steps]


GOLDEN_RUN = ("train.steps=50", *STABLE_OPTIM, "train.eval_bpb_tokens=0", "train.eval_every=100")


def test_sp2_with_expert_parallel_and_zero2_trains_the_golden_losses(assets, tmp_path):
    """2 ranks, one sequence-parallel group (data-parallel 1, the golden run's batch of 4 rows) that is also the
    expert-parallel group, ZeRO 2: the first 11 steps give the golden losses of one rank within 1e-5 (the
    2-rank tests' tolerance: summation order only). Killed (SIGKILL) after step 12, the run's last checkpoint is
    step 8 and records the sequence-parallel size; the same command resumes from it and repeats steps 9-11 bit for
    bit."""
    run = tmp_path / "run"
    layout = (*GOLDEN_RUN, "train.save_every=8", "deepspeed.sequence_parallel_size=2",
              "deepspeed.expert_parallel_size=2", "deepspeed.zero_stage=2")
    assert _launch(tmp_path, run, assets, "step:12", *layout, ranks=2) != 0
    first = _losses(run)
    assert first == pytest.approx(_golden(11), rel=1e-5)
    saved = checkpoint.read_meta(checkpoint.latest_checkpoint(run / "checkpoints"))
    assert (saved["step"], saved["sequence_parallel_size"], saved["world_size"]) == (8, 2, 2)
    assert _launch(tmp_path, run, assets, "step:12", *layout, ranks=2) != 0
    assert _losses(run) == first


@pytest.mark.slow
@pytest.mark.parametrize("ranks,sp,extra", [
    (4, 4, ()),  # one KV head of 2 replicated per rank pair
    (2, 2, ("deepspeed.zero_stage=3",)),
    (2, 2, ("train.activation_checkpointing=full", "model.window=16")),
])
def test_sp_sizes_and_stages_train_the_golden_losses(assets, tmp_path, ranks, sp, extra):
    run = tmp_path / "run"
    code = _launch(tmp_path, run, assets, "step:9", *GOLDEN_RUN, f"deepspeed.sequence_parallel_size={sp}",
                   *extra, ranks=ranks)
    assert code != 0
    if "model.window=16" in extra:  # another model than the golden one: its one-rank run is the reference
        reference = _launch_losses(tmp_path / "ref", assets, *GOLDEN_RUN, *extra)[:8]
    else:
        reference = _golden(8)
    assert _losses(run) == pytest.approx(reference, rel=1e-5)


def _launch_losses(run: Path, assets: Path, *overrides: str) -> list[float]:
    assert _launch(run.parent, run, assets, "step:9", *overrides) == -9
    return _losses(run)


@pytest.mark.slow
def test_resume_on_another_sequence_parallel_size(assets, tmp_path):
    """Killed after step 6 at SP=2 (checkpoint at step 4), resumed on the same 2 ranks at SP=1 (data-parallel 2
    x 2 rows: the same batch of 4): the checkpoint layout is the data-parallel one, so it loads as is and the
    losses continue the golden ones."""
    run = tmp_path / "run"
    assert _launch(tmp_path, run, assets, "step:6", *GOLDEN_RUN, "train.save_every=4",
                   "deepspeed.sequence_parallel_size=2", ranks=2) != 0
    assert _launch(tmp_path, run, assets, "step:9", *GOLDEN_RUN, "train.save_every=4",
                   "train.micro_batch_size=2", ranks=2) != 0
    assert _losses(run) == pytest.approx(_golden(8), rel=1e-5)


# ----- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (["deepspeed.sequence_parallel_size=3"], "must divide model.n_heads=4"),
    (["deepspeed.sequence_parallel_size=4", "model.n_kv_heads=3", "model.n_heads=12"],
     "the largest allowed size up to 4 is 3"),
    (["deepspeed.sequence_parallel_size=2", "data.seq_len=63"], "data.seq_len=63 must be divisible"),
    (["deepspeed.sequence_parallel_size=2", "model.aux_loss_coef=0.01"], "model.aux_loss_coef=0.01 is not"),
    (["deepspeed.sequence_parallel_size=0"], "deepspeed.sequence_parallel_size must be >= 1"),
])
def test_bad_layouts_refused_in_one_line(overrides, needle):
    with pytest.raises(ConfigError, match="deepspeed.sequence_parallel_size") as err:
        load_config(ROOT / "configs" / "tiny-ko.yaml", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_world_size_not_a_multiple_refused():
    from ondol.model.config import load_preset
    from ondol.model.transformer import Transformer
    from ondol.train.sequence_parallel import apply_sequence_parallel

    with torch.device("meta"):
        model = Transformer(dataclasses.replace(load_preset("tiny"), vocab_size=64))
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=2 must divide the world size 1"):
        apply_sequence_parallel(model, 2)


# ----- ondol plan ---------------------------------------------------------------------------------------------

def test_plan_divides_activations_and_logits_and_proposes_a_size(capsys):
    """At SP=N a rank holds seq_len / N tokens: activations and logits of a row of T tokens at SP=N are those of
    T / N tokens at SP=1, plus the all-to-all buffers; K-EXAONE at 32,768 tokens on 32 x 8 GPUs fits with a
    sequence-parallel size the search names, and the table names the size."""
    from ondol.launch.cli import main
    from ondol.launch.plan import plan_for_config

    config = ROOT / "configs" / "k-exaone-236b.yaml"
    long = plan_for_config(load_config(config, ["data.seq_len=32768", "deepspeed.sequence_parallel_size=8"]), 32, 8)
    short = plan_for_config(load_config(config, ["data.seq_len=4096"]), 32, 8)
    assert long.terms["activations"] == short.terms["activations"]
    assert long.terms["logits"] == short.terms["logits"]
    assert 0 < long.terms["all-to-all buffers"] < long.terms["activations"]
    assert "all-to-all buffers" not in short.terms
    assert main(["plan", str(config), "data.seq_len=32768", "--nodes", "32", "--gpus-per-node", "8"]) == 7
    out = capsys.readouterr().out
    assert "sequence-parallel 1, micro-batch 1 x 32768 tokens" in out and "DOES NOT FIT" in out
    assert "fits with any one of: deepspeed.sequence_parallel_size=" in out


def test_launch_preflight_checks_the_world_and_the_data_parallel_batch():
    """`ondol launch` refuses a world size the sequence-parallel size does not divide before starting anything,
    and counts the global batch over world / N data-parallel ranks."""
    from ondol.launch.preflight import Layout, PreflightError, check_global_batch, check_parallel_layout

    cfg = load_config(ROOT / "configs" / "tiny-ko.yaml", ["deepspeed.sequence_parallel_size=2"])
    with pytest.raises(PreflightError, match=r"world size 3 .* not divisible by deepspeed.sequence_parallel_size=2"):
        check_parallel_layout(cfg, Layout(1, 3, cpu=True))
    assert check_parallel_layout(cfg, Layout(1, 4, cpu=True))[0].endswith("sequence-parallel size 2")
    assert "x data-parallel size (2) = 16 sequences" in check_global_batch(cfg, Layout(1, 4, cpu=True))[0]
