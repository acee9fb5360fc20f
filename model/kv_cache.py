"""Keys and values of the positions a model has already processed, so that generation feeds only new tokens.

One `LayerCache` per attention layer (main layers, then MTP blocks). A sliding-window layer keeps only the
last `window - 1 + slack` positions: the `window - 1` earlier keys the next query can see, plus `slack` more so
that the last `slack` positions can be dropped again (`KVCache.crop`, used when speculative decoding rejects a
drafted token). Global layers keep every position.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, window: int | None, slack: int) -> None:
        self.keep = None if window is None else window - 1 + slack
        self.slack = slack
        self.window = window
        self.k: torch.Tensor | None = None  # [B, Hkv, S, D]
        self.v: torch.Tensor | None = None
        self.start = 0  # absolute position of the first kept key
        self.end = 0  # one past the last processed position

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the keys/values of T new positions; return all visible keys, values and the boolean
        [1, 1, T, S] mask (True = may attend) of the new queries over them (causal, windowed)."""
        T = k.shape[2]
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        q_pos = torch.arange(self.end, self.end + T, device=k.device)
        k_pos = torch.arange(self.start, self.end + T, device=k.device)
        diff = q_pos[:, None] - k_pos[None, :]
        mask = diff >= 0
        if self.window is not None:
            mask = mask & (diff < self.window)
        keys, values = self.k, self.v
        self.end += T
        if self.keep is not None and self.k.shape[2] > self.keep:
            drop = self.k.shape[2] - self.keep
            self.k, self.v = self.k[:, :, drop:], self.v[:, :, drop:]
            self.start += drop
        return keys, values, mask[None, None]

    def crop(self, n: int) -> None:
        """Forget the last n processed positions."""
        if n > self.k.shape[2] or (self.keep is not None and n > self.slack):
            raise ValueError(f"KVCache.crop({n}): more positions than the cache can give back ({self.slack})")
        keep = self.k.shape[2] - n
        self.k, self.v = self.k[:, :, :keep], self.v[:, :, :keep]
        self.end -= n


class KVCache:
    """The cache of a whole model: `length` positions processed, one LayerCache per attention layer."""

    def __init__(self, windows: list[int | None], slack: int = 0) -> None:
        self.layers = [LayerCache(w, slack) for w in windows]
        self.length = 0

    def crop(self, n: int) -> None:
        for layer in self.layers:
            layer.crop(n)
        self.length -= n
