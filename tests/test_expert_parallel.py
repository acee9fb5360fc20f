"""Expert parallelism against plain single-process PyTorch: same losses, same biases, checkpoints across EP sizes.

EP runs are real DeepSpeed engines (gloo, CPU, fp32) in spawned worker processes; the reference is one process
without DeepSpeed holding every expert and the whole global batch. All train on UTF-8 bytes of real Korean
reviews with the trainer's step: loss + aux + MTP backward, optimizer step, loads summed over ranks, bias update.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ondol.configs import RunConfig
from ondol.data.config import DataConfig
from ondol.model.config import ModelConfig
from ondol.model.transformer import Transformer
from ondol.train.config import DeepSpeedConfig
from ondol.train.expert_parallel import check_expert_parallel, full_state_dict_from_checkpoint

try:
    from conftest import corpus_texts, free_port
except ImportError:  # collected as the tests package
    from tests.conftest import corpus_texts, free_port

STEPS, GLOBAL_BATCH, SEQ, CLIP = 20, 8, 32, 0.3
CFG = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
       "attn_pattern": "LG", "window": 16, "ffn_hidden": 64, "n_experts": 8, "top_k": 2,
       "n_shared_experts": 1, "expert_hidden": 32, "first_k_dense": 0, "bias_update_rate": 1e-2,
       "max_seq_len": 64, "attn_backend": "sdpa", "mtp_layers": 1}  # MTP on: its loss reaches the experts too
DATA = DataConfig(seq_len=CFG["max_seq_len"])  # what a run config of these models must have
# name: (world size, expert_parallel_size, ZeRO stage). Scenarios of one world share its processes. All clip
# gradients to CLIP as the trainer does: at ZeRO 0 its optimizer (clip_grad_norm_), at ZeRO 1/2 DeepSpeed.
SCENARIOS = {"ep2_z0": (2, 2, 0), "ep4_z1": (4, 4, 1), "ep2_w4_z2": (4, 2, 2)}
# Scenarios trained under selective activation checkpointing, as the trainer applies it: the blocks'
# all-to-alls are kept from the forward, the rest of each block is recomputed; the reference must still match.
SELECTIVE = {"ep2_z0"}


def global_batches() -> torch.Tensor:
    """[STEPS + 1, GLOBAL_BATCH, SEQ + 1] token ids: UTF-8 bytes of ko_reviews, documents joined by newlines;
    the last batch is for evaluation."""
    need = (STEPS + 1) * GLOBAL_BATCH * (SEQ + 1)
    data = b"\n".join(t.encode("utf-8") for t in corpus_texts("ko_reviews", 400))
    assert len(data) >= need, "not enough corpus text for the test batches"
    return torch.tensor(list(data[:need])).view(STEPS + 1, GLOBAL_BATCH, SEQ + 1)


def make_optimizer(model: torch.nn.Module, clip: float, clip_fn):
    """AdamW over decay / no-decay groups whose step first clips to the global gradient norm (as the trainer's
    GuardedAdamW does at ZeRO 0); records the norms it saw."""

    class ClippedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.norms: list[float] = []

        def step(self, closure=None):
            if clip > 0:
                params = [p for g in self.param_groups for p in g["params"]]
                self.norms.append(float(clip_fn(params, clip)))
            return super().step(closure)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return groups, lambda param_groups: ClippedAdamW(param_groups, lr=3e-3, betas=(0.9, 0.95))


def train_reference(clip: float) -> dict:
    """One process, no DeepSpeed, every expert, the whole global batch."""
    model = Transformer(ModelConfig(**CFG), seed=0)
    groups, build = make_optimizer(model, clip, lambda ps, c: torch.nn.utils.clip_grad_norm_(ps, c))
    opt = build(groups)
    batches, losses = global_batches(), []
    for step in range(STEPS):
        out = model(batches[step, :, :-1], labels=batches[step, :, 1:])
        opt.zero_grad()
        (out.loss + out.aux_loss + out.mtp_loss).backward()
        opt.step()
        model.update_router_biases()
        losses.append(float(out.loss.detach()))
    return {"losses": losses, "biases": torch.stack([m.expert_bias for m in model.moe_layers()]),
            "norms": opt.norms, "model": model}


# A dense model of 128 MiB in fp32 and no tensor over 4 MiB: large against the fixed overhead of a build
BIG = {**CFG, "d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "head_dim": 64, "ffn_hidden": 2048,
       "n_experts": 0, "mtp_layers": 0}


def zero3_build_growth(env) -> tuple[int, int]:
    """(growth of this process's peak resident memory while `build_model` builds BIG at ZeRO 3, BIG's fp32
    bytes). The peak is reset just before (/proc/self/clear_refs), and large allocations go back to the system
    when freed (a fixed mmap threshold), so it counts the tensors alive at once, not memory the allocator kept."""
    import ctypes

    import deepspeed.runtime.zero.partition_parameters  # noqa: F401 (imported before the first reading)

    from ondol.train.engine import build_model

    def status_kib(field: str) -> int:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":"))

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: 128 KiB, no longer raised on free
    torch.distributed.barrier()  # the process group's first collective sets up its connections
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    before = status_kib("VmRSS")
    model = build_model(RunConfig(seed=0, model=ModelConfig(**BIG), data=DATA, deepspeed=DeepSpeedConfig(zero_stage=3)), env)
    return (status_kib("VmHWM") - before) * 1024, sum(p.ds_numel for p in model.parameters()) * 4


def forward_host_syncs(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, int]:
    """Host-sync sites (file:line op -> calls) of one training forward with the CUDA dispatch (grouped_mm, whose
    own path has none), so that what remains is expert parallelism's."""
    from ondol.train.host_syncs import HostSyncCounter

    experts = [m.experts for m in model.moe_layers()]
    dispatch = experts[0].dispatch
    for e in experts:
        e.dispatch = "grouped_mm"
    with HostSyncCounter(torch.device("cpu")) as syncs:
        model(batch[:, :-1], labels=batch[:, 1:])
    for e in experts:
        e.dispatch = dispatch
    return dict(syncs.sites)


def _worker(rank: int, world: int, port: int, names: list[str], root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from ondol.train import state_shards
    from ondol.train.config import TrainConfig
    from ondol.train.engine import DistEnv, build_model, skip_shared_memory_op
    from ondol.train.expert_parallel import (
        checkpoint_load_fn,
        clip_grad_norm_,
        expert_parallel_metrics,
        full_state_dict,
        optimizer_param_groups,
        save_expert_shards,
    )
    from ondol.train.fast_paths import apply_compile_and_checkpointing
    from ondol.train.optim import param_groups

    skip_shared_memory_op()  # as ondol train does on CPU: no op build, no build lock
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    env = DistEnv(rank, rank, world, torch.device("cpu"), "gloo")
    z3_build = zero3_build_growth(env)
    whole = dict(Transformer(ModelConfig(**CFG), seed=0).named_parameters())

    def init_mismatches(model: torch.nn.Module) -> list[str]:
        """Names of this rank's initial parameters (expert slices, ZeRO-3 partitions gathered) that differ from
        a whole single-process build with the same seed."""
        bad = []
        for n, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                owner = model.get_submodule(n.rpartition(".")[0])
                start = getattr(owner, "first_expert", 0)
                if not torch.equal(p.detach(), whole[n][start:start + p.shape[0]]):
                    bad.append(n)
        return bad

    def group_mismatches(model: torch.nn.Module) -> list[str]:
        """Names of parameters the trainer's AdamW groups (decay or not) place differently than for a whole
        build: a ZeRO-3 partition is an empty 1-D tensor whatever its parameter's shape."""
        def groups(m):
            names = {id(p): n for n, p in m.named_parameters()}
            return {names[id(p)]: g["name"] for g in param_groups(m, 0.1) for p in g["params"]}

        ref = groups(Transformer(ModelConfig(**CFG), seed=0))
        return [n for n, g in groups(model).items() if ref[n] != g]

    def buffer_mismatches(model: torch.nn.Module) -> list[str]:
        """Buffers (rotary frequencies, router biases) not in fp32 with a whole build's values: zero.Init creates
        them in its dtype, bf16 under deepspeed.precision=bf16."""
        ref = dict(Transformer(ModelConfig(**CFG), seed=0).named_buffers())
        return [n for n, b in model.named_buffers() if b.dtype != ref[n].dtype or not torch.equal(b, ref[n])]

    zero3 = RunConfig(seed=0, model=ModelConfig(**CFG), data=DATA, deepspeed=DeepSpeedConfig(zero_stage=3))
    z3_model = build_model(zero3, env)
    z3_bf16 = build_model(dataclasses.replace(zero3, deepspeed=DeepSpeedConfig(zero_stage=3, precision="bf16")), env)
    init_bad = {"z3": init_mismatches(z3_model) + group_mismatches(z3_model) + buffer_mismatches(z3_bf16)}
    B = GLOBAL_BATCH // world
    batches = global_batches()[:, rank * B:(rank + 1) * B]
    eval_ids = batches[STEPS, :, :-1]
    for name in names:
        _, ep, zero = SCENARIOS[name]
        out_dir = Path(root) / name

        def build(seed: int, ep: int = ep, zero: int = zero, selective: bool = name in SELECTIVE):
            """The trainer's meta-device build."""
            cfg = RunConfig(seed=seed, model=ModelConfig(**CFG), data=DATA,
                            deepspeed=DeepSpeedConfig(zero_stage=zero, expert_parallel_size=ep))
            model = build_model(cfg, env)
            if selective:
                apply_compile_and_checkpointing(model, TrainConfig(activation_checkpointing="selective"))
            groups, make = make_optimizer(model, CLIP if zero == 0 else 0.0, clip_grad_norm_)
            ds_config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                         "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                         "gradient_clipping": 0.0 if zero == 0 else CLIP, "steps_per_print": 1 << 30}
            engine, *_ = deepspeed.initialize(model=model, optimizer=make(optimizer_param_groups(groups)),
                                              config=ds_config)
            return model, engine

        model, engine = build(seed=0)
        init_bad[name] = init_mismatches(model)
        losses = []
        for step in range(STEPS):
            result = engine(batches[step, :, :-1], labels=batches[step, :, 1:])
            engine.backward(result.loss + result.aux_loss + result.mtp_loss)
            engine.step()
            loads = torch.stack([m.tokens_per_expert for m in model.moe_layers()])
            dist.all_reduce(loads)  # the trainer's global loads
            for m, load in zip(model.moe_layers(), loads):
                m.tokens_per_expert.copy_(load)
            model.update_router_biases()
            loss = result.loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / world)
        metrics = expert_parallel_metrics(model, seconds=1.0, steps=STEPS)
        syncs = forward_host_syncs(model, batches[0])
        model.eval()
        with torch.no_grad():
            logits = model(eval_ids).logits

        # The trainer's consolidated weights: fp32 masters (ZeRO 1/2 partitions gathered), experts gathered.
        masters = {n: p.detach() if (full := safe_get_full_fp32_param(p)) is None else full
                   for n, p in model.named_parameters()}
        gathered = full_state_dict(model, {**model.state_dict(), **masters})
        state_shards.save(engine, engine.client_optimizer, out_dir / "shards", rank, world, with_optimizer=False)
        engine.save_checkpoint(str(out_dir / "ckpt"), tag="final")
        save_expert_shards(model, out_dir / "ckpt" / "final")
        # Resume into a differently initialised model at the same EP size: engine state plus expert shards.
        model2, engine2 = build(seed=1)
        engine2.load_checkpoint(str(out_dir / "ckpt"), tag="final",
                                custom_load_fn=checkpoint_load_fn(out_dir / "ckpt" / "final"))
        model2.eval()
        with torch.no_grad():
            resumed_logits = model2(eval_ids).logits
        # Each rank writes its own file; no collectives after the last engine call.
        torch.save({"losses": losses, "biases": torch.stack([m.expert_bias for m in model.moe_layers()]),
                    "logits": logits, "eval_ids": eval_ids, "resumed_logits": resumed_logits,
                    "metrics": metrics, "syncs": syncs, "gathered": gathered if rank == 0 else None, "init_bad": init_bad,
                    "z3_build": z3_build},
                   out_dir / f"rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ep")
    for world in sorted({w for w, *_ in SCENARIOS.values()}):
        names = [n for n, (w, *_) in SCENARIOS.items() if w == world]
        for n in names:
            (root / n).mkdir()
        mp.start_processes(_worker, args=(world, free_port(), names, str(root)), nprocs=world, join=True,
                           start_method="spawn")
    out = {}
    for name, (world, *_) in SCENARIOS.items():
        ranks = [torch.load(root / name / f"rank{r}.pt", weights_only=False) for r in range(world)]
        out[name] = {**ranks[0], "biases": torch.stack([r["biases"] for r in ranks]),
                     "init_bad": [b for r in ranks for b in r["init_bad"][name]],
                     "z3_init_bad": [b for r in ranks for b in r["init_bad"]["z3"]],
                     "z3_build": [r["z3_build"] for r in ranks],
                     "ckpt": root / name / "ckpt" / "final", "shards": root / name / "shards"}
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return train_reference(CLIP)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_losses_match_single_process(runs, reference, name):
    ref = reference
    assert ref["losses"][-1] < ref["losses"][0] - 0.5, "the reference did not learn"
    diffs = [abs(a - b) for a, b in zip(ref["losses"], runs[name]["losses"], strict=True)]
    assert max(diffs) < 1e-5, f"{name}: max loss difference {max(diffs):.2e} at step {diffs.index(max(diffs))}"


def test_reference_clips(reference):
    """The runs only test the global gradient norm if clipping is active."""
    norms = reference["norms"]
    assert sum(n > CLIP for n in norms) >= STEPS // 2, norms


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bias_update_identical_on_every_rank_and_to_reference(runs, reference, name):
    biases, ref = runs[name]["biases"], reference["biases"]
    assert ref.abs().sum() > 0, "the biases never moved: the test would not see a difference"
    for r in range(biases.shape[0]):
        assert torch.equal(biases[r], biases[0]), f"{name}: rank {r} has different expert biases from rank 0"
    assert torch.equal(biases[0], ref), f"{name}: expert biases differ from the single-process run"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_host_sync_per_moe_layer_forward(runs, name):
    """Expert parallelism reads its all-to-all split sizes on the host once per layer (all_to_all_single takes
    them as ints); nothing else in a training forward waits for the device."""
    sites = runs[name]["syncs"]
    assert sum(sites.values()) <= CFG["n_layers"] - CFG["first_k_dense"], sites
    assert all("expert_parallel.py" in site for site in sites), sites


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_traffic_metrics(runs, name):
    """Token copies leave and arrive on every rank; what all ranks send they receive (so the means agree)."""
    m = runs[name]["metrics"]
    assert m["ep/tokens_sent_per_step"] > 0 and m["ep/tokens_received_per_step"] > 0
    assert m["ep/tokens_sent_per_step"] == pytest.approx(m["ep/tokens_received_per_step"])
    assert m["ep/tokens_sent_per_step_max"] >= m["ep/tokens_sent_per_step"]
    assert 0 < m["ep/all_to_all_share"] <= m["ep/all_to_all_share_max"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_initial_weights_equal_a_whole_build(runs, name):
    """Built on the meta device with only this rank's experts materialised (EP 2 and 4, ZeRO 0-2), or under
    zero.Init at ZeRO 3 (worlds 2 and 4, read back gathered): every rank's initial weights are the matching slice
    of one single-process build with the same seed, bit for bit, in the same AdamW (weight-decay) groups."""
    assert runs[name]["init_bad"] == [] and runs[name]["z3_init_bad"] == []


@pytest.mark.parametrize("world", sorted({w for w, *_ in SCENARIOS.values()}))
def test_zero3_build_holds_one_partition_per_rank(runs, world):
    """ZeRO 3 (the trainer's build_model, as `ondol train` calls it) builds under zero.Init: a rank's peak memory
    grows by its 1/world share of the fp32 model plus an overhead that does not depend on the world size (18-22
    MiB measured at worlds 2 and 4, allowed 40: one gathered tensor and its fp32 draw while initialising,
    DeepSpeed's bookkeeping), never by the whole model (129 MiB here)."""
    name = next(n for n, (w, *_) in SCENARIOS.items() if w == world)
    for rank, (growth, full) in enumerate(runs[name]["z3_build"]):
        assert full >= 128 * 2**20
        assert growth < full / world + 40 * 2**20, f"rank {rank}: {growth / 2**20:.0f} MiB of {full / 2**20:.0f}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_same_ep_restores_experts(runs, name):
    assert torch.equal(runs[name]["resumed_logits"], runs[name]["logits"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gathered_weights_equal_checkpoint(runs, name):
    """The standard-layout weights gathered from the live ranks (as the trainer exports them) equal those
    rebuilt from the checkpoint files, key for key."""
    gathered, saved = runs[name]["gathered"], full_state_dict_from_checkpoint(runs[name]["ckpt"])
    assert gathered.keys() == saved.keys()
    for key in saved:
        assert torch.equal(gathered[key], saved[key]), key


def test_ep2_checkpoint_loads_at_ep1(runs):
    """EP=2 checkpoint -> standard state dict -> plain single-process Transformer: the same logits."""
    ckpt = runs["ep2_z0"]["ckpt"]
    assert sorted(p.name for p in ckpt.glob("expert_shard_*")) == ["expert_shard_00_of_02.safetensors",
                                                                    "expert_shard_01_of_02.safetensors"]
    model = Transformer(ModelConfig(**CFG))
    model.load_state_dict(full_state_dict_from_checkpoint(ckpt), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(runs["ep2_z0"]["eval_ids"]).logits
    # Same weights bit for bit (test_gathered_weights_equal_checkpoint); the logits agree to fp32 rounding only,
    # since a matmul's rounding may depend on how many rows it gets (one rank's tokens here, two ranks' there).
    torch.testing.assert_close(logits, runs["ep2_z0"]["logits"], rtol=0, atol=1e-5)


def test_export_of_ep4_shards_equals_export_of_the_single_process_model(runs, reference, tmp_path):
    """The EP 4 run's per-rank weight shards (each rank wrote only its experts and its share of the dense
    tensors) exported for transformers give the logits of the single-process model trained on the same batches
    exported the same way, in transformers' ExaoneMoeForCausalLM, within 1e-4."""
    from transformers import AutoModelForCausalLM

    from ondol.model.export import export_weights, hf_config
    from ondol.model.io import save_pretrained

    cfg = ModelConfig(**CFG)
    shards = runs["ep4_z1"]["shards"]
    assert len(list(shards.glob("model-*-of-00004.safetensors"))) == 4
    save_pretrained(reference["model"], cfg, tmp_path / "single")
    logits = []
    for weights in (shards, tmp_path / "single"):
        out = tmp_path / f"hf_{weights.name}"
        export_weights(weights, cfg, out, torch.float32, max_shard_gb=0.0002)  # ~200 KB: several shards
        assert (out / "model.safetensors.index.json").is_file()
        (out / "config.json").write_text(json.dumps(hf_config(cfg, {"bos_token_id": 1, "eos_token_id": 2,
                                                                     "pad_token_id": 0})), encoding="utf-8")
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(hf(runs["ep4_z1"]["eval_ids"]).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)


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
    from ondol.train.expert_parallel import apply_expert_parallel
    model = Transformer(ModelConfig(**CFG))
    with pytest.raises(ValueError, match="must divide the world size 1"):
        apply_expert_parallel(model, 2, 0)
