"""Small building blocks: RMSNorm, rotary position embedding, SwiGLU MLP.

Numerics follow transformers' EXAONE code so exported models give the same logits: RMSNorm normalises in fp32
and casts back before the weight; RoPE rotates the two halves of each head (rotate_half layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): (inverse frequencies, cos/sin scale), as transformers' `_compute_yarn_parameters`
    computes them (truncated correction range, attention factor 0.1 ln(factor) + 1). Dimensions that rotate
    more than beta_fast times over the original context keep their frequency, those under beta_slow times are
    divided by `factor`, a linear ramp in between."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    extrapolation = rope_inv_freq(head_dim, theta)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: divided by factor (interpolation)
    inv_freq = extrapolation / factor * (1 - keep) + extrapolation * keep
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """cos and sin of shape [B, 1, T, head_dim] for integer positions [B, T] (or [1, T]), times `scale`
    (YaRN's attention factor; 1 otherwise)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """True where a packed document begins (every row starts one) for doc_ids [B, T]."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its packed document: 0 at every document start."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_idx = torch.where(document_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class SwiGLU(nn.Module):
    """Dense gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
