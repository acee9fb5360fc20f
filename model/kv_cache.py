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

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """The absolute positions [T] of T new tokens."""
        return torch.arange(self.length, self.length + T, device=device)

    def advance(self, T: int) -> None:
        self.length += T

    def crop(self, n: int) -> None:
        for layer in self.layers:
            layer.crop(n)
        self.length -= n


class StaticLayerCache:
    """A LayerCache of fixed shape for compiled decoding: a buffer of `size` slots (the window for a
    sliding-window layer, used as a ring; max_seq_len for a global one), each slot's absolute position in
    `slot_pos` (-1: empty), positions written in place. The new keys are attended together with the buffer
    before they are written, so a chunk longer than the ring (the prompt) still sees its own window."""

    def __init__(self, window: int | None, size: int, position: torch.Tensor, shape: tuple[int, int, int],
                 dtype: torch.dtype) -> None:
        B, H, D = shape
        self.window = window
        self.position = position  # the model cache's next position [1], shared by its layers
        self.k = torch.zeros(B, H, size, D, dtype=dtype, device=position.device)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((size,), -1, dtype=torch.long, device=position.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, size = k.shape[2], self.slot_pos.shape[0]
        q_pos = self.position + torch.arange(T, device=k.device)
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        k_pos = torch.cat([self.slot_pos, q_pos])
        diff = q_pos[:, None] - k_pos[None, :]
        mask = (diff >= 0) & (k_pos >= 0)[None, :]
        if self.window is not None:
            mask = mask & (diff < self.window)
        last = min(T, size)  # positions the buffer keeps; distinct slots, so the writes do not collide
        slots = q_pos[-last:] % size
        self.k.index_copy_(2, slots, k[:, :, -last:])
        self.v.index_copy_(2, slots, v[:, :, -last:])
        self.slot_pos.index_copy_(0, slots, q_pos[-last:])
        return keys, values, mask[None, None]


class StaticKVCache:
    """KVCache with fixed-shape buffers and the position as a tensor, so that one compiled graph serves every
    decoding step (model/generate.py, `compile=True`). Holds at most `max_len` positions."""

    def __init__(self, windows: list[int | None], max_len: int, shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.layers = [StaticLayerCache(w, max_len if w is None else w, self.position, shape, dtype)
                       for w in windows]

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.position + torch.arange(T, device=self.position.device)

    def advance(self, T: int) -> None:
        self.position += T
