"""Muon (optim.name=muon): the Newton-Schulz iteration against the SVD's polar factor, per-expert orthogonalisation
against a loop over experts, which parameters Muon takes, the logged update RMS against the parameter change,
`ondol plan`'s optimizer state, ZeRO 2 against ZeRO 0 (with QK-clip), two ranks with expert parallelism against
one (slow), and the bad settings refused with the key named. kill -9 and resume with Muon at ZeRO 2:
tests/test_train_procs.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import corpus_texts, free_port
from golden import STABLE_OPTIM, build_assets, run_losses
from safetensors.torch import load_file
from test_exit_codes import TINY, ondol, one_line
from test_train_procs import _launch, _losses

from ondol.model.config import load_preset
from ondol.model.transformer import Transformer
from ondol.train.optim import (
    GuardedMuon,
    matrix_exchange,
    muon_matrices,
    muon_updates,
    orthogonalise,
    param_groups,
    partition_layout,
)

# QK-clip at 3: the tiny model's largest logits are 2.9-3.8 in these steps, so some heads are clipped in most of
# them (tests/test_qk_clip.py checks the clip itself; here it runs on DeepSpeed's partitions and through resumes)
MUON_RUN = ("train.steps=8", "optim.name=muon", *STABLE_OPTIM, "train.save_every=4", "train.eval_every=8",
            "optim.qk_clip=3", "train.log_every=1")
# What 5 steps of Keller Jordan's quintic guarantee for a direction whose singular value, after the iteration's
# normalisation by the Frobenius norm, is at least SMALLEST: a singular value in about [0.7, 1.2] (the
# coefficients trade exact convergence for speed), with the singular vectors kept (every step is an odd
# polynomial of X, so it maps U S V^T to U p(S) V^T exactly, up to fp32 rounding)
SMALLEST, LOW, HIGH = 0.02, 0.68, 1.22


def _in_svd_basis(g: torch.Tensor, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """U^T O V for the iteration's output O and the SVD U S V^T of g (float64), and S / ||S||."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    o = orthogonalise(g, steps).double()
    return u.mT @ o @ vh.mT, s / s.norm()


def _check_polar(g: torch.Tensor) -> None:
    d, s = _in_svd_basis(g)
    diag = d.diagonal()
    off = d - torch.diag_embed(diag)
    assert float(off.norm() / diag.norm()) < 1e-4  # the polar factor's singular vectors (fp32 rounding)
    reached = diag[s >= SMALLEST]
    assert len(reached) > 0 and float(reached.min()) > LOW and float(diag.max()) < HIGH, diag
    # against U V^T itself, on the directions the iteration reaches: within the [0.7, 1.2] band
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    keep = s >= SMALLEST
    polar = u[:, keep] @ vh[keep]
    o = orthogonalise(g).double()
    projected = u[:, keep] @ (u[:, keep].mT @ o @ vh[keep].mT) @ vh[keep]
    assert float((projected - polar).norm() / polar.norm()) < 1 - LOW


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
def test_newton_schulz_gives_the_polar_factor_of_random_matrices(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _check_polar(g)


def test_newton_schulz_gives_the_polar_factor_of_real_weight_gradients():
    """Gradients of a tiny model on real Korean text (UTF-8 bytes as tokens): low-rank and far from random."""
    model = Transformer(load_preset("tiny", vocab_size=256, moe_dispatch="loop"), seed=0)
    text = "\n".join(corpus_texts("ko_reviews", 40)).encode("utf-8")[:4 * 129]
    ids = torch.tensor(list(text)).view(4, 129)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
                 "layers.1.self_attn.k_proj.weight"):
        _check_polar(dict(model.named_parameters())[name].grad)
    experts = model.layers[1].mlp.experts.gate_up_proj.grad
    busy = max(range(len(experts)), key=lambda e: float(experts[e].norm()))
    _check_polar(experts[busy])


def test_each_expert_is_orthogonalised_on_its_own_as_a_loop_would():
    gen = torch.Generator().manual_seed(1)
    stacked = torch.randn(8, 256, 128, generator=gen) * torch.logspace(-3, 0, 8).view(8, 1, 1)
    dense = torch.randn(256, 128, generator=gen)
    batched = muon_updates([stacked, dense], steps=5)
    looped = torch.stack([muon_updates([e], steps=5)[0] for e in stacked])
    torch.testing.assert_close(batched[0], looped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], muon_updates([dense], steps=5)[0], rtol=1e-5, atol=1e-6)
    # Moonlight's scale: RMS 0.2 sqrt(max(A, B)) / sqrt(A B) x the singular values (~1) of each expert alone
    rms = looped.square().mean(dim=(1, 2)).sqrt()
    assert torch.all((rms > 0.2 * 0.7) & (rms < 0.2 * 1.2)), rms


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = Transformer(load_preset("tiny", vocab_size=256, mtp_layers=1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, muon=True)}
    assert groups["muon"] == {names[id(p)] for p in muon_matrices(model)}
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.1.mlp.experts.gate_up_proj",
            "layers.1.mlp.experts.down_proj", "layers.1.mlp.shared_experts.down_proj.weight"} <= groups["muon"]
    assert any(n.startswith("mtp.") for n in groups["muon"])
    assert groups["decay"] == {"lm_head.weight"} | {n for n in names.values() if n.endswith("mlp.gate.weight")}
    assert "embed_tokens.weight" in groups["no_decay"]
    assert all(model.get_parameter(n).ndim == 1 for n in groups["no_decay"] - {"embed_tokens.weight"})
    assert sum(map(len, groups.values())) == len(names)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "train_assets")


@pytest.fixture(scope="module")
def muon_runs(assets, tmp_path_factory) -> dict:
    """8 Muon steps at ZeRO 0 and at ZeRO 2 (one rank), checkpoints at steps 4 and 8."""
    runs = {stage: tmp_path_factory.mktemp(f"muon_zero{stage}") for stage in (0, 2)}
    return {stage: {"run": run, "losses": run_losses(run, assets, *MUON_RUN, f"deepspeed.zero_stage={stage}")}
            for stage, run in runs.items()}


def test_zero2_equals_zero0_and_update_rms_is_logged(muon_runs):
    from ondol.train.metrics import read_metrics

    zero0, zero2 = muon_runs[0], muon_runs[2]
    assert zero2["losses"] == pytest.approx(zero0["losses"], rel=1e-5)
    ref = load_file(zero0["run"] / "model" / "model.safetensors")
    got = load_file(zero2["run"] / "model" / "model.safetensors")
    for k in ref:
        assert float((got[k] - ref[k]).norm() / ref[k].norm()) < 1e-5, k
    records = [r for r in read_metrics(zero2["run"] / "metrics.jsonl") if "loss" in r]
    # Muon's orthogonalised update at Moonlight's scale: RMS 0.2 x singular values in [0.7, 1.2]
    assert 0.2 * 0.6 < records[-1]["update_rms/muon"] < 0.2 * 1.2
    assert {"update_rms/decay", "update_rms/no_decay"} <= records[-1].keys()
    # QK-clip acted (on this rank's fp32 partition at ZeRO 2, on the module's weights at ZeRO 0)
    assert sum(r["qk_clip/clipped_heads"] for r in records) > 0
    assert all(r["qk_clip/clipped_heads"] == 0 or r["attn/max_logit"] > 3 for r in records)


@pytest.mark.parametrize("world,size", [(2, 70), (3, 45), (4, 33), (6, 22), (9, 15)])
def test_each_rank_rebuilds_the_matrices_it_overlaps_from_exactly_the_pieces_it_lacks(world, size):
    """The ZeRO 1/2 exchange, simulated on one process: a rank's own pieces and what each peer sends it (the
    peer's send list for it, in order, cut from the peer's partition) rebuild every matrix overlapping its
    partition, matrices wider than a partition included, and nothing else travels."""
    shapes = [(3, 5), (2, 2), (7, 4), (1, 9), (6, 6), (4, 3), (2, 11)]
    offsets = [sum(a * b for a, b in shapes[:i]) for i in range(len(shapes))]
    flat = torch.randn(world * size, generator=torch.Generator().manual_seed(world))  # the tail is padding
    assert offsets[-1] + 22 <= flat.numel()
    parts = flat.split(size)
    mine = [[(off, shape) for off, shape in zip(offsets, shapes) if off < (r + 1) * size and
             off + shape[0] * shape[1] > r * size] for r in range(world)]
    plans = [matrix_exchange(mine[r], size, world, r) for r in range(world)]
    for r in range(world):
        whole = {off: torch.full((a * b,), float("nan")) for off, (a, b) in mine[r]}
        for off, (a, b) in mine[r]:
            lo, hi = max(off, r * size), min(off + a * b, (r + 1) * size)
            whole[off][lo - off:hi - off] = parts[r][lo - r * size:hi - r * size]
        moved = 0
        for q in range(world):
            sent = [parts[q][lo - q * size:hi - q * size] for _, lo, hi in plans[q][0][r]]
            received = plans[r][1][q]
            assert [len(x) for x in sent] == [hi - lo for _, lo, hi in received]
            for x, (i, lo, hi) in zip(sent, received):
                off = mine[r][i][0]
                whole[off][lo - off:hi - off] = x
                moved += hi - lo
        for off, (a, b) in mine[r]:
            assert torch.equal(whole[off], flat[off:off + a * b])
        own = sum(min(off + a * b, (r + 1) * size) - max(off, r * size) for off, (a, b) in mine[r])
        assert moved == sum(a * b for _, (a, b) in mine[r]) - own


# matrices of a flat Muon group: dense ones, and a stacked [3, 4, 6] expert tensor counted as its 3 experts
EXCHANGE_SHAPES = [(3, 5), (2, 2), (7, 4), (4, 6), (4, 6), (4, 6), (1, 9), (6, 6), (2, 11)]


def _exchange_worker(rank: int, world: int, port: int, size: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    offsets = [sum(a * b for a, b in EXCHANGE_SHAPES[:i]) for i in range(len(EXCHANGE_SHAPES))]
    flat = torch.randn(world * size, generator=torch.Generator().manual_seed(0))  # the same on every rank
    layout = partition_layout(list(zip(offsets, EXCHANGE_SHAPES)), size, world, rank, None)
    assert layout["split"]
    muon = GuardedMuon([{"params": [torch.nn.Parameter(torch.zeros(1))], "muon": True}], owns_clipping=False,
                       clip_norm=0.0, momentum=0.95, ns_steps=5, lr=0.1)
    torch.save(muon._partition_update(flat[rank * size:(rank + 1) * size].clone(), layout),
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_update_their_partitions_as_one_process_updates_the_whole_group(tmp_path):
    """The ZeRO 1/2 step's exchange over gloo (2 ranks, a boundary inside a matrix): the partitions of the
    update equal the whole matrices' orthogonalised updates, cut at the boundary (fp32 rounding: 1e-5)."""
    world, size = 2, 100  # 186 elements: the boundary at 100 cuts the third expert's matrix
    mp.spawn(_exchange_worker, args=(world, free_port(), size, str(tmp_path)), nprocs=world, join=True)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)])
    flat = torch.randn(world * size, generator=torch.Generator().manual_seed(0))
    expected, off = torch.zeros_like(flat), 0
    for shape in EXCHANGE_SHAPES:
        n = shape[0] * shape[1]
        expected[off:off + n] = muon_updates([flat[off:off + n].view(shape)], 5)[0].flatten()
        off += n
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~35 s idle each: torchrun; the exchange's plan is checked above, simulated on one process
@pytest.mark.parametrize("ep", [1, 2])
def test_two_ranks_equal_one_rank_and_resume_resharded(assets, tmp_path, ep):
    """2 ranks x micro-batch 2 at ZeRO 2 against 1 rank x 4: matrices cut by the partition boundary exchanged
    between the ranks (EP 1: the dense and the expert groups; EP 2: the dense group, each rank holding its
    experts whole); killed after step 6, resumed on 1 rank at ZeRO 1 from the resharded momentum shards."""
    # QK-clip on. A dense MLP of 320 and 6 experts: the tiny model's power-of-two sizes would put both groups'
    # halfway points between matrices, leaving nothing to exchange; these cut a 128 x 128 dense matrix and a
    # 256 x 128 expert matrix in two
    steps = (*MUON_RUN, "model.ffn_hidden=320", "model.n_experts=6")
    reference = run_losses(tmp_path / "ref", assets, *steps)
    run = tmp_path / "run"
    assert _launch(tmp_path, run, assets, "step:6", *steps, "train.micro_batch_size=2",
                   f"deepspeed.expert_parallel_size={ep}", "deepspeed.zero_stage=2", ranks=2) != 0
    assert _losses(run) == pytest.approx(reference[:5], rel=1e-5)
    assert _launch(tmp_path, run, assets, "none", *steps, "deepspeed.zero_stage=1") == 0
    assert _losses(run) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("overrides,key", [(["optim.name=sgd"], "optim.name"),
                                           (["optim.name=muon", "deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
                                           (["optim.name=muon", "deepspeed.zero_stage=2",
                                             "deepspeed.extra={zero_optimization: {offload_optimizer: {device: cpu}}}"],
                                            "offload_optimizer"),
                                           (["optim.qk_clip=100", "deepspeed.zero_stage=3"], "optim.qk_clip"),
                                           (["optim.qk_clip=100", "model.attn_backend=flash"], "optim.qk_clip"),
                                           (["optim.qk_clip=-1"], "optim.qk_clip")])
def test_bad_settings_exit_2_naming_the_key(overrides, key):
    code, err = ondol("plan", TINY, *overrides)
    assert code == 2 and key in one_line(err, "ondol: config error: "), err


def test_plan_counts_one_fp32_state_for_muons_matrices_and_two_for_the_rest():
    from ondol.train.memory import RunShape, plan_memory

    cfg = load_preset("tiny", vocab_size=256)
    model = Transformer(cfg)
    adamw = sum(p.numel() for n, p in model.named_parameters()
                if p.ndim == 1 or n in ("embed_tokens.weight", "lm_head.weight") or n.endswith("mlp.gate.weight"))
    total = sum(p.numel() for p in model.parameters())
    muon = plan_memory(cfg, RunShape("fp32", 0, 1, 1, 1, 64, optimizer="muon")).terms
    plain = plan_memory(cfg, RunShape("fp32", 0, 1, 1, 1, 64)).terms
    assert muon["AdamW moments (fp32)"] == 8 * adamw and muon["Muon momentum (fp32)"] == 4 * (total - adamw)
    assert plain["AdamW moments (fp32)"] == 8 * total and "Muon momentum (fp32)" not in plain
    # ZeRO 2 on 4 ranks, EP 2: each group's partition plus two of its largest matrices, never more than the group
    z2 = plan_memory(cfg, RunShape("fp32", 2, 4, 2, 1, 64, optimizer="muon")).terms
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    dense = total - adamw - experts
    largest = max(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n not in (
        "embed_tokens.weight", "lm_head.weight") and not n.endswith("mlp.gate.weight"))
    one_expert = max(p[0].numel() for n, p in model.named_parameters() if ".experts." in n)
    expected = min(dense, dense / 4 + 2 * largest) + min(experts // 2, experts // 2 / 2 + 2 * one_expert)
    assert z2["Muon gathered momentum (fp32)"] == int(4 * expected)


def test_logged_update_rms_is_the_parameter_change_over_the_learning_rate():
    from ondol.train.optim import GuardedMuon

    gen = torch.Generator().manual_seed(0)
    matrix, gain = torch.nn.Parameter(torch.randn(64, 32, generator=gen)), torch.nn.Parameter(torch.randn(32))
    lr, wd = 0.01, 0.1
    opt = GuardedMuon([{"params": [matrix], "muon": True, "kind": "muon", "weight_decay": wd},
                       {"params": [gain], "muon": False, "kind": "no_decay", "weight_decay": wd}],
                      owns_clipping=True, clip_norm=0, momentum=0.95, ns_steps=5, lr=lr, foreach=True)
    for _ in range(3):
        for p in (matrix, gain):
            p.grad = torch.randn(p.shape, generator=gen)
        before = [p.detach().clone() for p in (matrix, gain)]
        opt.track_updates = True
        opt.step()
        logged = opt.update_rms()
        for kind, old, p in zip(("muon", "no_decay"), before, (matrix, gain)):  # p' = p (1 - lr wd) - lr u
            change = (old * (1 - lr * wd) - p.detach()) / lr
            assert logged[f"update_rms/{kind}"] == pytest.approx(float(change.square().mean().sqrt()), rel=1e-4)
