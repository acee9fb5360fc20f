"""Initialisation: statistics equal the init formula, and the values do not depend on how the model is built
(meta device, expert slices); the multi-process builds (expert parallel, ZeRO 3) are in test_expert_parallel.py."""

from __future__ import annotations

import math

import torch

from ondol.model.config import ModelConfig
from ondol.model.moe import GroupedExperts
from ondol.model.transformer import Transformer

CFG = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, attn_pattern="LLLG",
                  window=16, ffn_hidden=128, n_experts=8, top_k=2, n_shared_experts=1, expert_hidden=32,
                  first_k_dense=1, max_seq_len=64, mtp_layers=1, init_std=0.02)


def test_statistics_follow_the_init_formula():
    """Each weight ~ Normal(0, init_std), residual output projections Normal(0, init_std / sqrt(2 n_layers)),
    norm gains 1: the sample mean and std of every tensor (and of every expert) within 4 standard errors."""
    model = Transformer(CFG, seed=7)
    out_std = CFG.init_std / math.sqrt(2 * CFG.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = out_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else CFG.init_std
        for piece in (p.unbind(0) if "mlp.experts." in name else [p]):  # every expert separately
            n = piece.numel()
            assert abs(float(piece.mean())) < 4 * want / math.sqrt(n), name
            assert abs(float(piece.std()) - want) < 4 * want / math.sqrt(2 * n), (name, float(piece.std()), want)
    for moe in model.moe_layers():
        assert not moe.expert_bias.any()


def test_values_depend_on_seed_and_name_only():
    """A different seed changes every tensor; experts of one layer differ from each other; the global RNG does
    not matter once the seed is given."""
    torch.manual_seed(0)
    a = dict(Transformer(CFG, seed=7).named_parameters())
    torch.manual_seed(1)
    b = dict(Transformer(CFG, seed=7).named_parameters())
    c = dict(Transformer(CFG, seed=8).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if not k.endswith("norm.weight"))
    experts = a["layers.1.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])


def test_meta_build_materialised_in_slices_equals_a_whole_build():
    """Built on the meta device, each MoE layer's experts replaced by a slice [2, 6) (what one expert-parallel
    rank holds), materialised and initialised: every tensor equals the whole build's (the slice's experts)."""
    whole = dict(Transformer(CFG, seed=3).named_parameters())
    with torch.device("meta"):
        model = Transformer(CFG, seed=3)
    for moe in model.moe_layers():
        moe.experts = GroupedExperts(4, CFG.d_model, CFG.expert_hidden, "loop", first_expert=2)
    model.to_empty(device="cpu")
    model.reset_parameters(3)
    for name, p in model.named_parameters():
        want = whole[name][2:6] if ".mlp.experts." in name else whole[name]
        assert torch.equal(p, want), name
    assert torch.equal(model.inv_freq, Transformer(CFG, seed=3).inv_freq)  # buffers are set too

