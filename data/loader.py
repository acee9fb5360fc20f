"""TokenLoader: deterministic, resumable, rank-sharded batches of packed sequences mixed across sources.

Every sequence has a global index g = 0, 1, 2, ...; the k-th batch of rank r holds g in
[p + r*B, p + (r+1)*B) with p = k*W*B, so the global order never depends on the number of ranks and a run may
resume on another data-parallel size. g maps to a sequence in closed form (no replay), so state is one int:
  1. source: a repeating pattern of PATTERN_LEN slots, each source holding a share of slots equal to its
     weight (largest remainder) spread evenly (smooth weighted round robin), so realised token shares match
     the weights to within 1/PATTERN_LEN over every whole pattern;
  2. within a source: the i-th draw is sequence perm_epoch[i mod n] (a seeded permutation per epoch; identity
     for validation, which has one fixed order), where sequence j of a shard is tokens [j*T, j*T + T + 1).
A chat source (shards with a loss mask, data/chat.py) has other sequences: whole conversations packed in order,
as many as fit in T + 1 tokens, the rest of the row padded; a conversation longer than T + 1 tokens is dropped
(the manifest counts them for data.seq_len; the loader logs its own count). Its labels are -100 (no loss) except
on the assistant's tokens, and the padding is a document of its own, so document masking keeps conversations
and padding from attending to each other.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ondol.data.shards import Shard, read_manifest, split_shards

PATTERN_LEN = 10_000
IGNORE = -100  # the label of a position the loss leaves out (model/loss.py's ignore_index)
log = logging.getLogger("ondol.data")


def mixture_pattern(weights: list[float], length: int = PATTERN_LEN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source index of each slot of the repeating pattern, slots per source, each slot's rank among its
    source's slots)."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.floor(share * length).astype(np.int64)
    remainder_order = np.argsort(-(share * length - counts), kind="stable")
    counts[remainder_order[: length - counts.sum()]] += 1
    current, pattern = np.zeros(len(counts), dtype=np.int64), np.empty(length, dtype=np.int64)
    for slot in range(length):
        current += counts
        chosen = int(np.argmax(current))
        current[chosen] -= length
        pattern[slot] = chosen
    rank = np.zeros(length, dtype=np.int64)
    for s in range(len(counts)):
        rank[pattern == s] = np.arange(counts[s])
    return pattern, counts, rank


def sequences_in(tokens: int, seq_len: int) -> int:
    """The seq_len + 1 token windows a shard of `tokens` tokens gives: window j starts at token j * seq_len."""
    return max(0, (tokens - 1) // seq_len)


def planned_mix(manifest: dict, weights: dict[str, float], seq_len: int, sequences: int
                ) -> dict[str, tuple[float, float]]:
    """Per source of the training split: (its expected share of the training sequences, the epochs over its own
    sequences) when `sequences` sequences are drawn as TokenLoader mixes them; (0, 0) for a source of weight 0
    or without a whole sequence. Weights apply when training, so they are the config's, not the preparation's."""
    counts = {name: sum(sequences_in(r["tokens"], seq_len) for r in records)
              for name, records in manifest["splits"]["train"].items()}
    mixed = [name for name, n in counts.items() if weights.get(name, 0) > 0 and n > 0]
    out = dict.fromkeys(counts, (0.0, 0.0))
    if mixed:
        _, slots, _ = mixture_pattern([weights[name] for name in mixed])
        for name, k in zip(mixed, slots):
            out[name] = (k / PATTERN_LEN, sequences * k / PATTERN_LEN / counts[name])
    return out


@dataclass
class _SourceSequences:
    """The seq_len + 1 token windows of one source: window j of a shard starts at token j * seq_len."""

    name: str
    shards: list[Shard]
    seq_len: int

    def __post_init__(self) -> None:
        per_shard = [sequences_in(len(s.tokens), self.seq_len) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self.count = int(self.offsets[-1])

    def locate(self, j: int) -> tuple[Shard, int]:
        k = int(np.searchsorted(self.offsets, j, side="right")) - 1
        return self.shards[k], int(j - self.offsets[k]) * self.seq_len

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Sequence j: (its seq_len + 1 tokens, 1 where a document starts at each of the first seq_len positions,
        None: every label is trained on)."""
        shard, start = self.locate(j)
        T = self.seq_len
        boundaries = np.zeros(T, dtype=np.int64)
        lo = np.searchsorted(shard.starts, start, side="right")
        hi = np.searchsorted(shard.starts, start + T, side="left")
        boundaries[shard.starts[lo:hi] - start] = 1
        return shard.window(start, T + 1), boundaries, None


@dataclass
class _Conversations:
    """The rows of a chat source: consecutive whole conversations of one shard, as many as fit in seq_len + 1
    tokens (next fit, in shard order), then padding."""

    name: str
    shards: list[Shard]
    seq_len: int
    pad_id: int

    def __post_init__(self) -> None:
        rows, self.too_long, fits = [], 0, self.seq_len + 1  # rows: (shard, first token, end token)
        for k, shard in enumerate(self.shards):
            first = end = 0
            for start, stop in zip(shard.starts[:-1].tolist(), shard.starts[1:].tolist()):
                if stop - start > fits:  # dropped; it ends the row, as what follows does not continue it
                    self.too_long += 1
                    if end > first:
                        rows.append((k, first, end))
                    first = end = stop
                elif stop - first > fits:  # does not fit the row: it starts the next
                    rows.append((k, first, end))
                    first, end = start, stop
                else:
                    end = stop
            if end > first:
                rows.append((k, first, end))
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 3)
        self.count = len(self.rows)

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row j: (seq_len + 1 tokens, document starts over the first seq_len positions, 1 where the label of
        each of the seq_len positions is trained on)."""
        k, first, end = (int(x) for x in self.rows[j])
        shard, T, n = self.shards[k], self.seq_len, end - first
        tokens = np.full(T + 1, self.pad_id, dtype=np.int64)
        tokens[:n] = shard.window(first, n)
        trained = np.zeros(T + 1, dtype=np.uint8)
        trained[:n] = shard.mask[first:end]
        boundaries = np.zeros(T + 2, dtype=np.int64)  # [n]: where padding starts, past the row when there is none
        starts = shard.starts[np.searchsorted(shard.starts, first):np.searchsorted(shard.starts, end)]
        boundaries[starts - first] = 1
        boundaries[n] = 1  # the padding is a document of its own
        return tokens, boundaries[:T], trained[1:]


def _mixed_sources(data_dir, split: str, seq_len: int, shards: dict[str, list[Shard]],
                   weights: dict[str, float], pad_id: int) -> list[_SourceSequences | _Conversations]:
    """The sources with a positive weight; a validation split may lack a small one (logged), training not."""
    sources = [_Conversations(name, shards[name], seq_len, pad_id) if any(s.mask is not None for s in shards[name])
               else _SourceSequences(name, shards[name], seq_len) for name in shards if weights.get(name, 0) > 0]
    for source in sources:
        if getattr(source, "too_long", 0):
            log.warning("%s: %s %s: %d conversations longer than seq_len + 1 = %d tokens are left out",
                        data_dir, split, source.name, source.too_long, seq_len + 1)
    if not sources:
        raise ValueError(f"{data_dir}: every source has weight 0")
    empty = [s.name for s in sources if s.count == 0]
    if empty and (split == "train" or len(empty) == len(sources)):
        raise ValueError(f"{data_dir}: no {split} sequences of {seq_len + 1} tokens in source(s) {empty}: "
                         f"add data, lower seq_len, or give them weight 0")
    if empty:
        log.warning("%s: no %s sequences of %d tokens in %s: left out of this split's mixture",
                    data_dir, split, seq_len + 1, ", ".join(empty))
    return [s for s in sources if s.count > 0]


class TokenLoader:
    """Batches of dict(input_ids, labels, doc_ids), each LongTensor[micro_batch_size, seq_len].

    doc_ids numbers the documents within each row from 0, for document-masked attention. `weights` maps
    source names to mixture weights (default: the weights in the manifest); a weight of 0 leaves a source out.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, weights: dict[str, float] | None = None):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        manifest = read_manifest(data_dir)
        shards = split_shards(data_dir, split, manifest)
        weights = dict(manifest["weights"] if weights is None else weights)
        unknown = sorted(set(weights) - set(shards))
        if unknown:
            raise ValueError(f"weights name unknown sources {unknown}; {data_dir} has {sorted(shards)}")
        self.sources = _mixed_sources(data_dir, split, seq_len, shards, weights, manifest["tokenizer"]["eos_id"])
        self.weights = {s.name: float(weights[s.name]) for s in self.sources}
        self.pattern, self.slots, self.slot_rank = mixture_pattern(list(self.weights.values()))
        if not self.slots.all():
            raise ValueError(f"weights {self.weights}: each share must be at least 1/{PATTERN_LEN}")
        self.split, self.seq_len, self.batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.data_hash = manifest["hash"]
        self.position = 0  # global sequences consumed by all ranks together
        self.last_sources: list[str] = []  # the source of each row of the last batch
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._permutations:
            for old in [k for k in self._permutations if k[0] == s and k[1] < epoch - 1]:
                del self._permutations[old]
            name_key = zlib.crc32(self.sources[s].name.encode())
            rng = np.random.default_rng([self.seed, name_key, epoch])
            self._permutations[key] = rng.permutation(self.sources[s].count)
        return self._permutations[key]

    def sequence(self, g: int) -> tuple[int, int]:
        """(source index, the source's sequence) of global sequence g."""
        slot = g % PATTERN_LEN
        s = int(self.pattern[slot])
        draw = (g // PATTERN_LEN) * int(self.slots[s]) + int(self.slot_rank[slot])
        source = self.sources[s]
        epoch, j = divmod(draw, source.count)
        if self.split == "train":
            j = int(self._permutation(s, epoch)[j])
        return s, j

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        tokens = np.empty((B, T + 1), dtype=np.int64)
        boundaries = np.zeros((B, T), dtype=np.int64)  # 1: a document starts at this position
        labels = np.empty((B, T), dtype=np.int64)
        first = self.position + self.rank * B
        sources = []
        for b in range(B):
            s, j = self.sequence(first + b)
            tokens[b], boundaries[b], trained = self.sources[s].row(j)
            labels[b] = tokens[b, 1:] if trained is None else np.where(trained == 1, tokens[b, 1:], IGNORE)
            sources.append(self.sources[s].name)
        self.position += self.world_size * B
        self.last_sources = sources
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :T])),
                "labels": torch.from_numpy(labels),
                "doc_ids": torch.from_numpy(np.cumsum(boundaries, axis=1))}

    def state_dict(self) -> dict:
        return {"position": self.position, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "data_hash": self.data_hash, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (the world size and micro batch size may differ)."""
        for key in ("split", "seq_len", "seed", "data_hash", "weights"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}: resuming would not continue the same sequence order")
        self.position = int(state["position"])
