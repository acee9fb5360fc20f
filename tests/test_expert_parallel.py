"""Expert parallelism against the single-process model: same losses, same biases, checkpoints across EP sizes.

Each scenario runs real DeepSpeed engines (gloo, CPU, fp32) in spawned worker processes on UTF-8 bytes of real
Korean reviews. The reference is one process holding every expert with the whole global batch; EP runs split
the same global batch over 2 or 4 ranks, so their mean losses must match it step for step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.config import ModelConfig
from model.transformer import Transformer
from train.expert_parallel import check_expert_parallel, full_state_dict_from_checkpoint

try:
    from conftest import corpus_texts
except ImportError:  # collected as the tests package
    from tests.conftest import corpus_texts

STEPS, MICRO_BATCH_4, SEQ = 20, 2, 32  # global batch 8 sequences of 32 tokens
CFG = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, attn_pattern="LG",
           window=16, ffn_hidden=64, n_experts=8, top_k=2, n_shared_experts=1, expert_hidden=32, first_k_dense=0,
           bias_update_rate=1e-2, max_seq_len=64, attn_backend="sdpa")


def global_batches(steps: int, rows: int) -> torch.Tensor:
    """[steps, rows, SEQ + 1] token ids: UTF-8 bytes of ko_reviews, documents joined by newlines."""
    need = steps * rows * (SEQ + 1)
    data = b"\n".join(t.encode("utf-8") for t in corpus_texts("ko_reviews", 400))
    assert len(data) >= need, "not enough corpus text for the test batches"
    return torch.tensor(list(data[:need])).view(steps, rows, SEQ + 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, ep: int, zero: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from train.expert_parallel import (apply_expert_parallel, checkpoint_load_fn, expert_parallel_metrics,
                                       optimizer_param_groups, reduce_expert_loads, save_expert_shards)

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out_dir = Path(out)

    def build(seed: int):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(**CFG))
        apply_expert_parallel(model, ep, zero)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        param_groups = optimizer_param_groups([{"params": decay, "weight_decay": 0.1},
                                               {"params": no_decay, "weight_decay": 0.0}])
        opt = torch.optim.AdamW(param_groups, lr=3e-3, betas=(0.9, 0.95))
        ds_config = {"train_micro_batch_size_per_gpu": 8 // world, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                     "gradient_clipping": 0.0, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        return model, engine

    model, engine = build(seed=0)
    B = 8 // world
    batches = global_batches(STEPS + 1, 8)[:, rank * B:(rank + 1) * B]
    losses, sent, received = [], [], []
    for step in range(STEPS):
        ids = batches[step]
        result = engine(ids[:, :-1], labels=ids[:, 1:])
        engine.backward(result.loss + result.aux_loss)
        engine.step()
        reduce_expert_loads(model)
        model.update_router_biases()
        loss = result.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        m = expert_parallel_metrics(model, step_seconds=1.0)
        sent.append(m["ep/tokens_sent"] if m else 0.0)
        received.append(m["ep/tokens_received"] if m else 0.0)

    model.eval()
    eval_ids = batches[STEPS][:, :-1]
    with torch.no_grad():
        logits = model(eval_ids).logits

    engine.save_checkpoint(str(out_dir / "ckpt"), tag="final")
    save_expert_shards(model, out_dir / "ckpt" / "final")
    # Resume into a differently initialised model at the same EP size: the engine plus the shards restore it.
    model2, engine2 = build(seed=1)
    engine2.load_checkpoint(str(out_dir / "ckpt"), tag="final",
                            custom_load_fn=checkpoint_load_fn(out_dir / "ckpt" / "final"))
    model2.eval()
    with torch.no_grad():
        resumed_logits = model2(eval_ids).logits

    torch.save({"losses": losses, "biases": torch.stack([moe.expert_bias for moe in model.moe_layers()]),
                "logits": logits, "eval_ids": eval_ids, "resumed_logits": resumed_logits,
                "tallies": torch.tensor([sum(sent), sum(received)])}, out_dir / f"rank{rank}.pt")
    dist.barrier()


def run_world(world: int, ep: int, zero: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), ep, zero, str(out)), nprocs=world, join=True,
                       start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {**ranks[0], "biases": torch.stack([r["biases"] for r in ranks]),
            "tallies": torch.stack([r["tallies"] for r in ranks]), "ckpt": out / "ckpt" / "final"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ep")
    return {name: run_world(world, ep, zero, root / name)
            for name, (world, ep, zero) in {"ref": (1, 1, 0), "ep2_z0": (2, 2, 0), "ep4_z1": (4, 4, 1),
                                            "ep2_w4_z2": (4, 2, 2)}.items()}


@pytest.mark.parametrize("name", ["ep2_z0", "ep4_z1", "ep2_w4_z2"])
def test_losses_match_single_process(runs, name):
    ref, got = runs["ref"]["losses"], runs[name]["losses"]
    assert len(got) == STEPS
    assert ref[-1] < ref[0] - 0.5, f"the reference did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    assert max(diffs) < 1e-5, f"{name}: max loss difference {max(diffs):.2e} at step {diffs.index(max(diffs))}"


@pytest.mark.parametrize("name", ["ep2_z0", "ep4_z1", "ep2_w4_z2"])
def test_bias_update_identical_on_every_rank_and_to_reference(runs, name):
    biases, ref = runs[name]["biases"], runs["ref"]["biases"][0]
    assert ref.abs().sum() > 0, "the biases never moved: the test would not see a difference"
    for r in range(biases.shape[0]):
        assert torch.equal(biases[r], biases[0]), f"{name}: rank {r} has different expert biases from rank 0"
    assert torch.equal(biases[0], ref), f"{name}: expert biases differ from the single-process run"


def test_tokens_travel(runs):
    """Every rank sends and receives token copies; what the world sends it receives."""
    for name in ("ep2_z0", "ep4_z1", "ep2_w4_z2"):
        tallies = runs[name]["tallies"]
        assert (tallies > 0).all(), f"{name}: a rank sent or received no tokens: {tallies.tolist()}"
        assert tallies[:, 0].sum() == tallies[:, 1].sum()
    assert runs["ref"]["tallies"].sum() == 0


def test_resume_same_ep_restores_experts(runs):
    for name in ("ref", "ep2_z0", "ep4_z1", "ep2_w4_z2"):
        assert torch.equal(runs[name]["resumed_logits"], runs[name]["logits"]), name


def test_ep2_checkpoint_loads_at_ep1(runs):
    """EP=2 checkpoint -> standard state dict -> plain single-process Transformer: identical logits."""
    ckpt = runs["ep2_z0"]["ckpt"]
    assert sorted(p.name for p in ckpt.glob("expert_shard_*")) == ["expert_shard_00_of_02.safetensors",
                                                                    "expert_shard_01_of_02.safetensors"]
    model = Transformer(ModelConfig(**CFG))
    model.load_state_dict(full_state_dict_from_checkpoint(ckpt), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(runs["ep2_z0"]["eval_ids"]).logits
    assert torch.equal(logits, runs["ep2_z0"]["logits"])


@pytest.mark.parametrize("ep,n_experts,world,zero,needle", [
    (3, 8, 3, 0, "must divide model.n_experts=8"),
    (4, 8, 6, 0, "must divide the world size 6"),
    (2, 8, 4, 3, "deepspeed.zero_stage=3 is not supported"),
    (2, 0, 4, 0, "needs an MoE model"),
    (0, 8, 4, 0, "must be >= 1"),
])
def test_bad_layouts_refused(ep, n_experts, world, zero, needle):
    with pytest.raises(ValueError, match="deepspeed") as err:
        check_expert_parallel(ep, n_experts, world, zero)
    assert needle in str(err.value)


def test_apply_refuses_ep_larger_than_world():
    from train.expert_parallel import apply_expert_parallel
    model = Transformer(ModelConfig(**CFG))
    with pytest.raises(ValueError, match="must divide the world size 1"):
        apply_expert_parallel(model, 2, 0)
