"""Parameter and FLOP counts against the built module (meta device) and hand-written formulas."""

from __future__ import annotations

import pytest
import torch

from ondol.model.config import load_preset
from ondol.model.flops import param_counts, train_flops_per_token
from ondol.model.moe import GroupedExperts
from ondol.model.transformer import Transformer

CONFIGS = {
    "tiny": {"vocab_size": 4096},
    "tiny_tied_sinks": {"vocab_size": 4096, "tie_embeddings": True, "attn_sinks": True, "qk_norm": False},
    "tiny_dense": {"vocab_size": 4096, "n_experts": 0},
    "tiny_no_shared_top3": {"vocab_size": 4096, "n_shared_experts": 0, "top_k": 3, "first_k_dense": 2},
    "tiny_mtp2_tied_sinks": {"vocab_size": 4096, "mtp_layers": 2, "tie_embeddings": True, "attn_sinks": True},
}


def build_meta(cfg) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def counted(model: Transformer) -> tuple[int, int, int]:
    """(total, active, active matmul) from the module itself: unchosen experts and the lookup table removed."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are yielded once
    inactive = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in model.modules()
                   if isinstance(m, GroupedExperts)) * (cfg.n_experts - cfg.top_k) // max(cfg.n_experts, 1)
    if not cfg.tie_embeddings:
        inactive += model.embed_tokens.weight.numel()
    active = total - inactive
    vectors = sum(p.numel() for p in model.parameters() if p.ndim == 1)  # norms and sinks
    return total, active, active - vectors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_counts_match_built_model(name):
    cfg = load_preset("tiny", **CONFIGS[name])
    total, active, _ = counted(build_meta(cfg))
    assert param_counts(cfg)["total"] == total
    assert param_counts(cfg)["active"] == active


def test_k_exaone_counts_match_published_figures():
    cfg = load_preset("k-exaone-236b")
    model = build_meta(cfg)
    total, active, _ = counted(model)
    counts = param_counts(cfg)
    assert (counts["total"], counts["active"]) == (total, active)
    # Published (model card, transformers docs): 236B total, 23B active, "48 main layers + 1 MTP layer".
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert counts["mtp"] == mtp and len(model.mtp) == 1
    assert abs(total / 236e9 - 1) < 0.01 and abs((total - mtp) / 236e9 - 1) < 0.01, total
    assert abs((active - mtp) / 23e9 - 1) < 0.01, active  # the published active count is the main model's
    assert abs(active / 23e9 - 1) > 0.01
    assert cfg.layer_kinds == ["L", "L", "L", "G"] * 12
    assert len(model.moe_layers()) == 47


def test_one_b_preset_is_about_one_billion():
    total, active, _ = counted(build_meta(load_preset("moe-1b", vocab_size=32768)))
    assert 0.9e9 < total < 1.3e9 and active < 0.3 * total


@pytest.mark.parametrize("name,seq_len", [("tiny", 256), ("tiny", 40), ("tiny_tied_sinks", 100), ("tiny_dense", 7),
                                           ("tiny_mtp2_tied_sinks", 100)])
def test_train_flops_match_hand_formula(name, seq_len):
    cfg = load_preset("tiny", **CONFIGS[name])
    model = build_meta(cfg)
    _, _, matmul_params = counted(model)
    matmul_params += len(model.mtp) * model.lm_head.weight.numel()  # each MTP depth runs the shared head
    attn = 0
    for kind in cfg.layer_kinds + [depth.block.kind for depth in model.mtp]:
        window = cfg.window if kind == "L" else seq_len
        keys = sum(min(i + 1, window) for i in range(seq_len))  # causal, windowed key count over the sequence
        attn += 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * keys / seq_len  # (fwd + 2x bwd) x (QK, PV) x 2 flops
    assert train_flops_per_token(cfg, seq_len) == pytest.approx(6 * matmul_params + attn, rel=1e-12)
