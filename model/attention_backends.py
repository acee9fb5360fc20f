"""Attention kernels behind one interface, so the model never knows which one runs.

A backend turns a `MaskSpec` (sequence length, sliding window or None, document ids or None) into whatever mask
object its kernel wants, once per forward and layer kind (`prepare`), and then computes causal attention for
q [B, H, T, D] and k, v [B, Hkv, T, D] (`attend`), optionally with learned per-head sinks: a logit that joins
every softmax denominator without contributing a value (gpt-oss). `attend_and_max` also returns each query
head's largest attention logit q.k / sqrt(D) over the keys it may see ([H], fp32; sinks not included), which
QK-clip and the max-logit log read (train/qk_clip.py): FlexAttention's kernel writes it beside its output,
SDPA's is computed apart; flash-attn returns none, so that backend has no `attend_and_max`.

Window convention (transformers' `sliding_window`): a query at position i sees keys j with i - window < j <= i,
i.e. `window` keys including itself. Document masking: a query sees only keys of its own document.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ondol.model.layers import document_starts


@dataclass(frozen=True)
class MaskSpec:
    seq_len: int
    window: int | None  # None: global causal attention
    doc_ids: torch.Tensor | None  # [B, T] document index of each token, or None for one document per row

    @property
    def plain_causal(self) -> bool:
        return self.doc_ids is None and (self.window is None or self.window >= self.seq_len)


def dense_mask(spec: MaskSpec, device: torch.device) -> torch.Tensor:
    """The boolean [B or 1, 1, T, T] mask (True = may attend) the spec describes."""
    idx = torch.arange(spec.seq_len, device=device)
    diff = idx[:, None] - idx[None, :]
    allowed = diff >= 0
    if spec.window is not None:
        allowed = allowed & (diff < spec.window)
    allowed = allowed[None, None]
    if spec.doc_ids is not None:
        allowed = allowed & (spec.doc_ids[:, None, :, None] == spec.doc_ids[:, None, None, :])
    return allowed


@torch.no_grad()
def dense_max_logits(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, chunk: int = 0
                     ) -> torch.Tensor:
    """Each query head's largest logit q.k / sqrt(D) over the keys `allowed` ([B or 1, 1, T, S] booleans, True =
    may attend; None: causal) lets it see, [H] in fp32; -inf for a head that sees no key. `chunk` queries at a
    time (0: as many as keep one chunk's fp32 scores of all heads within 2^25 elements, 128 MiB), so no [T, S]
    score matrix of all heads is held; GQA by broadcasting, without repeating the keys."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    chunk = chunk or max(1, 2 ** 25 // (B * H * S))
    if allowed is None:
        allowed = dense_mask(MaskSpec(T, None, None), q.device)
    keys = k.float().unsqueeze(2).mT  # [B, Hkv, 1, D, S]
    best = torch.full((Hkv, H // Hkv), float("-inf"), device=q.device)
    for start in range(0, T, chunk):
        part = q[:, :, start:start + chunk].float().view(B, Hkv, H // Hkv, -1, D)
        scores = (part @ keys) / math.sqrt(D)  # [B, Hkv, G, c, S]
        scores = scores.masked_fill(~allowed[..., start:start + chunk, :].unsqueeze(1), float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 3, 4)))
    return best.view(H)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Rescale attention output [B, H, T, D] with log-sum-exp lse [B, H, T] as if sink logits joined the softmax."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    keep = torch.sigmoid(lse.to(dtype) - sinks.to(dtype)[None, :, None])
    return out * keep.unsqueeze(-1).to(out.dtype)


class SDPABackend:
    """torch's scaled_dot_product_attention with an explicit boolean mask (any device; the CPU path)."""

    name = "sdpa"

    def prepare(self, spec: MaskSpec, device: torch.device) -> torch.Tensor | None:
        return None if spec.plain_causal else dense_mask(spec, device)

    def attend(self, q, k, v, mask: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:
        if sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        # Sinks as one extra key with a zero value whose score is the sink logit, carried by a float mask.
        (B, H, T, _), S = q.shape, k.shape[2]  # S keys: T, or more when earlier keys come from a KV cache
        if mask is None:
            mask = dense_mask(MaskSpec(T, None, None), q.device)
        bias = torch.zeros(mask.shape[:-1] + (S + 1,), dtype=q.dtype, device=q.device)
        bias[..., :S].masked_fill_(~mask, float("-inf"))
        bias = bias.expand(B, H, T, S + 1) + F.pad(sinks.to(q.dtype)[None, :, None, None], (S, 0))
        zero = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
        return F.scaled_dot_product_attention(q, torch.cat([k, zero], 2), torch.cat([v, zero], 2),
                                              attn_mask=bias, enable_gqa=True)

    def attend_and_max(self, q, k, v, mask: torch.Tensor | None, sinks: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend`, and the largest logit per head computed apart (one more QK^T, without gradient)."""
        return self.attend(q, k, v, mask, sinks), dense_max_logits(q, k, mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # wrapped: one inductor_compiled_code op that selective checkpointing can keep (train/fast_paths.py)
    return torch.compile(flex_attention, dynamic=False, options={"wrap_inductor_compiled_regions": True})


class FlexBackend:
    """FlexAttention with block masks: windowed and document-masked blocks are skipped, never materialised.

    Compiled on CUDA (the fast path). On CPU it runs eagerly for forward checks only: torch has no CPU backward.
    """

    name = "flex"

    def prepare(self, spec: MaskSpec, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        window, docs = spec.window, spec.doc_ids

        def mask_mod(b, h, q_idx, kv_idx):
            ok = q_idx >= kv_idx
            if window is not None:
                ok = ok & (q_idx - kv_idx < window)
            if docs is not None:
                ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
            return ok

        batch = None if docs is None else docs.shape[0]
        return create_block_mask(mask_mod, batch, None, spec.seq_len, spec.seq_len, device=device,
                                 _compile=device.type == "cuda")

    def attend(self, q, k, v, mask: Any, sinks: torch.Tensor | None) -> torch.Tensor:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention

        fn = _compiled_flex() if q.is_cuda else flex_attention
        if sinks is None:
            return fn(q, k, v, block_mask=mask, enable_gqa=True)
        out, aux = fn(q, k, v, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
        return apply_sinks(out, aux.lse, sinks)

    def attend_and_max(self, q, k, v, mask: Any, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend`, with the kernel's own running maximum of each row's scores (CUDA only: torch's CPU
        FlexAttention does not return it, and has no backward to train with)."""
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True,
                                    return_aux=AuxRequest(lse=sinks is not None, max_scores=True))
        if sinks is not None:
            out = apply_sinks(out, aux.lse, sinks)
        return out, aux.max_scores.float().amax(dim=(0, 2))


@dataclass(frozen=True)
class VarlenMask:
    cu_seqlens: torch.Tensor | None  # int32 [n_docs + 1] offsets into the flattened B*T tokens; None: rows
    max_seqlen: int
    window: int | None


class FlashVarlenBackend:
    """flash-attn's varlen kernel: each packed document is its own sequence; sliding window via window_size."""

    name = "flash"

    def prepare(self, spec: MaskSpec, device: torch.device) -> VarlenMask:
        docs = spec.doc_ids
        if docs is None:
            return VarlenMask(None, spec.seq_len, spec.window)
        B, T = docs.shape
        starts = document_starts(docs).flatten().nonzero().flatten()
        bounds = torch.cat([starts, torch.tensor([B * T], device=device)])
        lengths = torch.diff(bounds)
        return VarlenMask(bounds.to(torch.int32), int(lengths.max()), spec.window)

    def attend(self, q, k, v, mask: VarlenMask, sinks: torch.Tensor | None) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        B, H, T, D = q.shape
        cu = mask.cu_seqlens
        if cu is None:  # one sequence per row
            cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)
        window = (-1, -1) if mask.window is None else (mask.window - 1, 0)
        res = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, mask.max_seqlen, mask.max_seqlen,
                                     causal=True, window_size=window, return_attn_probs=sinks is not None)
        if sinks is None:
            return res.view(B, T, H, D).transpose(1, 2)
        out, lse = res[0].view(B, T, H, D).transpose(1, 2), res[1]  # lse: [H, B*T]
        return apply_sinks(out, lse.view(H, B, T).transpose(0, 1), sinks)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


BACKENDS = {"sdpa": SDPABackend, "flex": FlexBackend, "flash": FlashVarlenBackend}


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The backend for `name`; 'auto' picks flex on CUDA, else SDPA (CPU: flex has no backward there). Never
    flash: its `prepare` reads document lengths on the host (4 syncs per forward), so only an explicit
    model.attn_backend=flash runs it."""
    if name == "auto":
        name = "flex" if device.type == "cuda" else "sdpa"
    if name == "flash" and not flash_available():
        raise RuntimeError("model.attn_backend=flash needs the flash-attn package (pip install flash-attn), "
                           "or set model.attn_backend=auto")
    return BACKENDS[name]()
