"""QK-clip (optim.qk_clip) and the max-logit measurement: the chunked largest logit against a per-head loop over
each query's visible keys, the clip against its definition (after a step that changes nothing else, every head's
largest logit on the same inputs is min(S, tau), or the layer's shared factor with QK-norm), and the scaling of a
ZeRO fragment against the scaling of the whole tensor. The trainer's path (ZeRO 2 against ZeRO 0, kill -9 and
resume) runs with QK-clip in tests/test_muon.py; sequence-parallel shards against whole rows in
tests/test_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch
from conftest import corpus_texts

from ondol.model.attention_backends import MaskSpec, dense_mask, dense_max_logits
from ondol.model.config import load_preset
from ondol.model.transformer import Transformer
from ondol.train.optim import GuardedAdamW, param_groups
from ondol.train.qk_clip import QKClip, scale_rows


def _naive_max_logits(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Each head's largest q.k / sqrt(D) over the keys each query may see, one query at a time, in float64."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    best = torch.full((H,), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = allowed[min(b, allowed.shape[0] - 1), 0, i].nonzero().flatten()
                if len(keys):
                    logits = k[b, h // group, keys].double() @ q[b, h, i].double() / D ** 0.5
                    best[h] = max(best[h], logits.max())
    return best


@pytest.mark.parametrize("window,docs", [(None, False), (5, False), (None, True), (6, True)])
def test_largest_logit_is_each_heads_maximum_over_its_visible_keys(window, docs):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 23, 8
    q, k = torch.randn(B, H, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    doc_ids = torch.tensor([[0] * 9 + [1] * 14, [0] * 17 + [1] * 6]) if docs else None
    spec = MaskSpec(T, window, doc_ids)
    allowed = dense_mask(spec, q.device)
    mask = None if spec.plain_causal else allowed
    got = dense_max_logits(q, k, mask, chunk=7)  # chunks that do not divide T
    assert torch.allclose(got.double(), _naive_max_logits(q, k, allowed), rtol=1e-6, atol=0)


def _capture_inputs(model: Transformer) -> list[tuple]:
    """Each attention layer's forward inputs, kept by a pre-hook (the clip is checked layer by layer on fixed
    inputs: a clipped layer changes what every later layer sees)."""
    seen: list[tuple] = []
    for attn in model.attention_layers():
        attn.register_forward_pre_hook(lambda module, args: seen.append((module, args)))
    return seen


@pytest.mark.parametrize("qk_norm", [True, False])
def test_a_step_that_changes_nothing_else_leaves_each_heads_largest_logit_at_min_s_tau(qk_norm):
    """lr 0: the update changes no weight, so after the step only the clip has acted. Without QK-norm each head's
    largest logit on the same inputs becomes min(S, tau); with it each layer's heads all scale by the factor of
    its most-exceeding head (their gains are shared). fp32 rounding of the scaled weights: relative 1e-5."""
    cfg = load_preset("tiny", vocab_size=256, qk_norm=qk_norm, mtp_layers=1, moe_dispatch="loop")
    model = Transformer(cfg, seed=0)
    text = "\n".join(corpus_texts("ko_reviews", 40)).encode("utf-8")[:2 * 97]
    ids = torch.tensor(list(text)).view(2, 97)
    clip = QKClip(model, threshold=0.0)  # the threshold is set from the measured logits below
    seen = _capture_inputs(model)
    clip.track(True)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.mtp_loss).backward()
    logits = torch.stack([attn.max_logit.clone() for attn in model.attention_layers()])
    clip.threshold = float(logits.flatten().median())  # about half the heads over it, in most layers
    metrics = clip.measure(world_size=1)
    assert float(metrics["attn/max_logit"]) == float(logits.max())
    assert int(metrics["qk_clip/clipped_heads"]) == int((logits > clip.threshold).sum()) > 0
    optimizer = GuardedAdamW(param_groups(model, 0.1), owns_clipping=False, clip_norm=0.0, lr=0.0)
    optimizer.after_update = clip.after_update
    optimizer.step()
    after = []
    for module, args in seen[:len(model.attention_layers())]:  # the first forward's inputs, layer by layer
        after.append(module(*args)[1])
    after = torch.stack(after)
    tau = clip.threshold
    if qk_norm:
        factor = (tau / logits.amax(dim=1, keepdim=True)).clamp(max=1.0)
        expected = logits * factor
    else:
        expected = logits.clamp(max=tau)
    assert torch.allclose(after, expected, rtol=1e-5, atol=0)
    assert (after <= tau * (1 + 1e-5)).all()


def test_scaling_a_fragment_equals_scaling_the_whole_tensor_then_cutting_it():
    """What a ZeRO 1/2 rank holds of a query projection (any contiguous run of its flattened elements, which may
    start and end inside a head's rows) is scaled as the same run of the whole scaled tensor."""
    gen = torch.Generator().manual_seed(2)
    heads, rows, cols = 4, 8, 16
    weight = torch.randn(heads * rows, cols, generator=gen)
    factors = torch.rand(heads, generator=gen)
    whole = (weight.view(heads, rows * cols) * factors[:, None]).flatten()
    for start, n in [(0, weight.numel()), (37, 200), (128, 128), (300, weight.numel() - 300)]:
        fragment = weight.flatten()[start:start + n].clone()
        scale_rows(fragment, start, factors, rows * cols)
        assert torch.equal(fragment, whole[start:start + n])


def test_logits_are_measured_only_when_tracked_and_training():
    """The measurement costs nothing unless asked for: untracked, or in eval mode, nothing is measured."""
    model = Transformer(load_preset("tiny", vocab_size=256), seed=0)
    ids = torch.tensor(list("\n".join(corpus_texts("ko_reviews", 5)).encode("utf-8")[:64])).view(1, 64)
    clip = QKClip(model, threshold=0.0)
    measured = lambda: torch.stack([attn.max_logit for attn in model.attention_layers()])
    model(ids)
    assert torch.isneginf(measured()).all()
    clip.track(True)
    model.eval()
    model(ids)
    assert torch.isneginf(measured()).all()
    model.train()
    model(ids)
    assert torch.isfinite(measured()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention returns its maximum on CUDA only")
@pytest.mark.parametrize("sinks", [False, True])
def test_flex_kernels_maximum_equals_the_dense_one(sinks):
    """FlexAttention's own running maximum (CUDA) against the dense computation, under document masking and a
    sliding window, in bf16 (the kernel's scores in fp32: relative 1e-2 covers bf16 inputs' rounding)."""
    from ondol.model.attention_backends import FlexBackend, SDPABackend

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 2, 256, 64
    q = torch.randn(B, H, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    docs = (torch.arange(T, device="cuda")[None] >= torch.tensor([[100], [180]], device="cuda")).long()
    spec = MaskSpec(T, 64, docs)
    sink = torch.randn(H, generator=gen, device="cuda") if sinks else None
    out, got = FlexBackend().attend_and_max(q, k, v, FlexBackend().prepare(spec, q.device), sink)
    ref_out, ref = SDPABackend().attend_and_max(q, k, v, SDPABackend().prepare(spec, q.device), sink)
    assert torch.allclose(got, ref, rtol=1e-2, atol=0)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2)
