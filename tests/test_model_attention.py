"""Attention backends against a naive softmax attention written here (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from ondol.model.attention_backends import FlexBackend, MaskSpec, SDPABackend
from ondol.model.config import load_preset
from ondol.model.transformer import Transformer


def naive_attention(q, k, v, window, doc_ids, sinks):
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    allowed = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                in_window = window is None or i - j < window
                same_doc = doc_ids is None or doc_ids[b, i] == doc_ids[b, j]
                allowed[b, 0, i, j] = in_window and same_doc
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :T]
    return probs @ v


def make_inputs(seed: int, B=2, H=4, Hkv=2, T=24, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    doc_ids = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 24])[:B]
    sinks = torch.randn(H, generator=g, dtype=torch.float64)
    return q, k, v, doc_ids, sinks


CASES = [(w, d, s) for w in (None, 5) for d in (False, True) for s in (False, True)]


@pytest.mark.parametrize("window,docs,sinks", CASES)
def test_sdpa_matches_naive_values_and_grads(window, docs, sinks):
    q, k, v, doc_ids, sink = make_inputs(0)
    doc_ids = doc_ids if docs else None
    sink = sink if sinks else None
    leaves = [t.requires_grad_() for t in (q, k, v) + ((sink,) if sinks else ())]
    backend = SDPABackend()
    out = backend.attend(q, k, v, backend.prepare(MaskSpec(q.shape[2], window, doc_ids), q.device), sink)
    ref = naive_attention(q, k, v, window, doc_ids, sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g_out)
    grads_ref = torch.autograd.grad(ref, leaves, g_out)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window,docs,sinks", CASES)
def test_flex_forward_matches_naive(window, docs, sinks):
    """FlexAttention runs eagerly on CPU (forward only: torch has no CPU backward for it)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, doc_ids, sink = (t.float() for t in make_inputs(1))
    doc_ids = doc_ids.long() if docs else None
    sink = sink if sinks else None
    backend = FlexBackend()
    out = backend.attend(q, k, v, backend.prepare(MaskSpec(q.shape[2], window, doc_ids), q.device), sink)
    torch.testing.assert_close(out, naive_attention(q, k, v, window, doc_ids, sink), rtol=1e-5, atol=1e-5)


def test_auto_backend_is_sdpa_on_cpu():
    model = Transformer(load_preset("tiny", vocab_size=256))
    assert model.backend(torch.device("cpu"), torch.float32).name == "sdpa"


def test_packed_documents_equal_separate_runs():
    """Document masking + per-document positions: a packed row gives each document exactly its solo logits,
    through sliding-window and global layers alike (window 8 < document length)."""
    cfg = load_preset("tiny", vocab_size=300, window=8, doc_positions=True)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    lengths = [13, 20, 7]
    docs = [torch.randint(0, 300, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        logits = model(packed, doc_ids=doc_ids).logits[0]
        solo = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(logits, solo, rtol=1e-6, atol=1e-6)  # router runs in fp32


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size, return_attn_probs=False):
    """flash-attn's varlen contract ([total, H, D] tensors, int32 offsets, lse [H, total]) in plain torch."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    outs, lses = [], []
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert e - s <= max_q
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        i = torch.arange(e - s)
        allowed = i[:, None] >= i[None]
        if window_size[0] >= 0:
            allowed &= i[:, None] - i[None] <= window_size[0]
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(scores, -1))
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1), None) if return_attn_probs else out


@pytest.mark.parametrize("window,docs,sinks", CASES)
def test_flash_varlen_glue_matches_naive(monkeypatch, window, docs, sinks):
    """The flash backend's document offsets, window and sink handling, with flash-attn's kernel replaced by a
    plain implementation of its documented contract (flash-attn itself needs CUDA)."""
    import sys
    import types

    from ondol.model.attention_backends import FlashVarlenBackend

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_varlen))
    q, k, v, doc_ids, sink = make_inputs(2)
    doc_ids = doc_ids if docs else None
    sink = sink if sinks else None
    backend = FlashVarlenBackend()
    out = backend.attend(q, k, v, backend.prepare(MaskSpec(q.shape[2], window, doc_ids), q.device), sink)
    torch.testing.assert_close(out, naive_attention(q, k, v, window, doc_ids, sink), rtol=1e-10, atol=1e-10)
