"""The MoE layer against a naive per-token loop; balancing and auxiliary losses against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ondol.model.config import load_preset
from ondol.model.moe import MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route and run each token on its own, straight from the definitions."""
    cfg = moe.cfg
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = moe.gate.weight.float() @ token.float()  # the router runs in fp32
        scores = logits.sigmoid() if cfg.router_score == "sigmoid" else logits.softmax(-1)
        chosen = sorted(range(cfg.n_experts), key=lambda e: -float(scores[e].detach() + moe.expert_bias[e]))[:cfg.top_k]
        w = scores[chosen]
        if cfg.norm_topk:
            w = w / w.sum()
        w = w * cfg.routed_scaling
        y = torch.zeros_like(token)
        for weight, e in zip(w, chosen):
            gate_w, up_w = moe.experts.gate_up_proj[e].chunk(2, dim=0)
            h = F.silu(gate_w @ token) * (up_w @ token)
            y = y + weight * (moe.experts.down_proj[e] @ h)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(token)
        out.append(y)
    return torch.stack(out).view_as(x)


def build(seed=0, **overrides) -> MoE:
    cfg = load_preset("tiny", vocab_size=256, **overrides)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.expert_bias.normal_(0, 0.05)
    return moe


VARIANTS = [
    {},
    {"router_score": "softmax", "norm_topk": False, "routed_scaling": 2.5},
    {"top_k": 3, "n_shared_experts": 0, "routed_scaling": 2.5},
]


@pytest.mark.parametrize("dispatch", ["loop", "bmm_padded", "grouped_mm"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_moe_matches_per_token_loop(dispatch, variant):
    moe = build(moe_dispatch=dispatch, **VARIANTS[variant])
    x = torch.randn(3, 10, moe.cfg.d_model, generator=torch.Generator().manual_seed(1))
    tol = 1e-4  # grouped_mm: torch has fp32 and bf16 kernels only
    if dispatch != "grouped_mm":  # float64 experts for tight comparisons; the router stays fp32 in both
        moe, x = moe.double(), x.double()
        # The router logits are D-term fp32 dot products, summed in another order here (one batched GEMM, whose
        # blocking depends on the CPU's kernels) than in the reference (one matrix-vector product per token):
        # each may be off by D * 2^-24 relative (the worst-case bound of a D-term sum), and the combine weights
        # carry that into the output (seen: up to 6e-7 on AVX2, 1.3e-6 on AVX-512 FP16; bound 7.6e-6 at D=128).
        tol = moe.cfg.d_model * 2.0 ** -24
    x.requires_grad_()
    out, _ = moe(x)
    ref = naive_moe(moe, x)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    params = [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight]
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)
    assert got[3] is not None and got[3].abs().sum() > 0  # the router learns through the combine weights
    out, _ = moe(x)
    out.sum().backward()  # stride-0 output gradient (torch's CPU grouped_mm backward needs the wrapper)


def test_auto_dispatch_on_cpu_is_bmm_padded():
    from ondol.model.moe import auto_dispatch

    assert auto_dispatch(torch.zeros(9, 4), n_experts=8) == "bmm_padded"
    with torch.no_grad():
        assert auto_dispatch(torch.zeros(2, 4), n_experts=8) == "loop"  # one decoded token, top-2
    assert auto_dispatch(torch.zeros(2, 4), n_experts=8) == "bmm_padded"  # training: one path on every rank


def run_counted(moe: MoE, x: torch.Tensor, forward=None) -> torch.Tensor:
    """The layer as the model runs it: forward (the layer's own, or e.g. a checkpointed one), then its
    returned loads counted outside."""
    out, stats = (forward or moe)(x)
    moe.count_load(stats["load"])
    return out


def test_loads_accumulate_in_training_only():
    moe = build()
    x = torch.randn(2, 16, moe.cfg.d_model)
    moe.eval()
    run_counted(moe, x)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()
    run_counted(moe, x)
    run_counted(moe, x)
    with torch.no_grad():
        chosen = torch.topk(moe.gate(x.reshape(-1, x.shape[-1])).sigmoid() + moe.expert_bias, moe.cfg.top_k).indices
    assert torch.equal(moe.tokens_per_expert, 2 * torch.bincount(chosen.flatten(), minlength=moe.cfg.n_experts).float())
    assert "tokens_per_expert" not in moe.state_dict() and "expert_bias" in moe.state_dict()


def test_checkpoint_recompute_does_not_count_loads_twice():
    from torch.utils.checkpoint import checkpoint

    moe = build()
    x = torch.randn(2, 16, moe.cfg.d_model, requires_grad=True)
    out = run_counted(moe, x, lambda x: checkpoint(moe, x, use_reentrant=False))
    out.sum().backward()  # recomputes the forward inside backward
    assert moe.tokens_per_expert.sum() == 32 * moe.cfg.top_k


def test_bias_update_moves_load_toward_balance():
    """A router skewed toward expert 0 on real-looking (shared-direction) inputs gets balanced by the bias."""
    moe = build(bias_update_rate=0.02)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(moe.cfg.d_model, generator=g)
    x = direction + 0.5 * torch.randn(4, 64, moe.cfg.d_model, generator=g)
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.gate.weight[0] = direction  # expert 0 scores high on every token
    moe.train()

    def imbalance() -> float:
        counts = moe.tokens_per_expert.clone()
        return float(counts.max() / counts.mean())

    run_counted(moe, x)
    before = imbalance()
    first_bias = None
    for _ in range(60):
        moe.update_bias()
        if first_bias is None:
            first_bias = moe.expert_bias.clone()
        run_counted(moe, x)
    after = imbalance()
    assert first_bias[0] < 0  # the overloaded expert is pushed down first
    assert before > 2.0 and after < 0.6 * before, (before, after)


def test_sequence_aux_and_z_loss_match_formulas():
    moe = build(aux_loss_coef=0.01, z_loss_coef=0.001)
    B, T, E, k = 2, 12, moe.cfg.n_experts, moe.cfg.top_k
    x = torch.randn(B, T, moe.cfg.d_model, generator=torch.Generator().manual_seed(3))
    _, stats = moe(x)
    with torch.no_grad():
        logits = x.reshape(-1, x.shape[-1]) @ moe.gate.weight.T
        scores = logits.sigmoid().view(B, T, E)
        chosen = torch.topk(scores + moe.expert_bias, k, dim=-1).indices
    seq_aux = 0.0
    for b in range(B):
        f = torch.stack([(chosen[b] == e).sum() for e in range(E)]).float() * E / (k * T)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        seq_aux += float((f * p).sum()) / B
    z = float((torch.logsumexp(logits, -1) ** 2).mean())
    assert float(stats["seq_aux_loss"]) == pytest.approx(seq_aux, rel=1e-5)
    assert float(stats["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(stats["aux_loss"].detach()) == pytest.approx(0.01 * seq_aux + 0.001 * z, rel=1e-5)
    stats["aux_loss"].backward()
    assert moe.gate.weight.grad.abs().sum() > 0
