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
Phases (train.phases): the global order is cut into segments, each from its first global index on with its own
mixture and sequence length T (a segment starts at a step, so at a micro-batch boundary of every rank). Step 1
restarts its pattern at each segment's start; step 2 continues across segments: a source's draws in a segment
are numbered after its draws in every earlier segment, so the i-th draw of a source counts all of them. Across a
change of T the count carries the source's tokens over: a source that ended a segment at draw index D of
length-T windows continues at draw ceil(D * T / T') of length-T' windows, so epochs stay passes over its tokens
(its windows, and their permutation per epoch, are those of T'; a chat source's rows are counted the same
way). Segments are still closed form: the state is
the position and the segments' starts, mixtures and lengths.
"""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

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


def _mixed_sources(data_dir, split: str, seq_len: int, names: list[str], weights: dict[str, float],
                   rows: Callable[[str], _SourceSequences | _Conversations]) -> list[_SourceSequences | _Conversations]:
    """The sources with a positive weight; a validation split may lack a small one (logged), training not."""
    sources = [rows(name) for name in names if weights.get(name, 0) > 0]
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


@dataclass(frozen=True)
class MixPhase:
    """A segment of the global order: from global sequence `start` on, `weights` mixed at `seq_len`."""

    start: int
    weights: dict[str, float] = field(hash=False)
    seq_len: int

    def to_dict(self) -> dict:
        return {"start": self.start, "weights": self.weights, "seq_len": self.seq_len}


@dataclass(eq=False)
class _Segment:
    """A MixPhase as drawn: its sources (indices into TokenLoader.sources at its seq_len), pattern, and where
    each source's draws start (draw index at this segment's length)."""

    phase: MixPhase
    sources: list[_SourceSequences | _Conversations]
    pattern: np.ndarray
    slots: np.ndarray
    slot_rank: np.ndarray
    first_draw: dict[str, int]

    def drawn(self, s: int, n: int) -> int:
        """How many of the segment's first n sequences source s (an index into self.sources) gave."""
        return (n // PATTERN_LEN) * int(self.slots[s]) + int(np.count_nonzero(self.pattern[:n % PATTERN_LEN] == s))


class TokenLoader:
    """Batches of dict(input_ids, labels, doc_ids), each LongTensor[micro_batch_size, seq_len].

    doc_ids numbers the documents within each row from 0, for document-masked attention. `weights` maps
    source names to mixture weights (default: the weights in the manifest); a weight of 0 leaves a source out.
    `phases` (the first starting at 0) replaces `weights` and `seq_len` with segments of the global order;
    `seq_len` is then the current segment's length.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, weights: dict[str, float] | None = None,
                 phases: list[MixPhase] | None = None):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.data_dir = data_dir
        manifest = read_manifest(data_dir)
        self.shards = split_shards(data_dir, split, manifest)
        self.split, self.batch_size = split, micro_batch_size
        self.pad_id = manifest["tokenizer"]["eos_id"]  # fills the rest of a chat row
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.data_hash = manifest["hash"]
        self.position = 0  # global sequences consumed by all ranks together
        self.last_sources: list[str] = []  # the source of each row of the last batch
        self._permutations: dict[tuple[str, int, int], np.ndarray] = {}
        self._windows: dict[tuple[str, int], _SourceSequences | _Conversations] = {}
        self.set_phases(phases or [MixPhase(0, dict(manifest["weights"] if weights is None else weights), seq_len)])

    def set_phases(self, phases: list[MixPhase]) -> None:
        """Segment the global order (a segment whose mixture and length equal its predecessor's continues it)."""
        if not phases or phases[0].start != 0 or any(b.start < a.start for a, b in itertools.pairwise(phases)):
            raise ValueError(f"phases must start at global sequence 0, in order: {[p.start for p in phases]}")
        merged = [phases[0]]
        for p in phases[1:]:
            if p.start == merged[-1].start:
                merged[-1] = p
            elif (p.weights, p.seq_len) != (merged[-1].weights, merged[-1].seq_len):
                merged.append(p)
        self.segments: list[_Segment] = []
        for p in merged:
            self.segments.append(self._segment(p, self.segments[-1] if self.segments else None))
        first = self.segments[0]  # what a loader without phases has: its sources and their weights
        self.sources, self.weights = first.sources, {s.name: float(first.phase.weights[s.name]) for s in first.sources}
        self.seq_len = self._segment_at(self.position).phase.seq_len

    def _source(self, name: str, seq_len: int) -> _SourceSequences | _Conversations:
        key = (name, seq_len)
        if key not in self._windows:
            shards = self.shards[name]
            chat = any(s.mask is not None for s in shards)
            self._windows[key] = (_Conversations(name, shards, seq_len, self.pad_id) if chat
                                  else _SourceSequences(name, shards, seq_len))
        return self._windows[key]

    def _segment(self, phase: MixPhase, before: _Segment | None) -> _Segment:
        if phase.seq_len < 1:
            raise ValueError(f"seq_len ({phase.seq_len}) must be >= 1")
        unknown = sorted(set(phase.weights) - set(self.shards))
        if unknown:
            raise ValueError(f"weights name unknown sources {unknown}; {self.data_dir} has {sorted(self.shards)}")
        sources = _mixed_sources(self.data_dir, self.split, phase.seq_len, list(self.shards), phase.weights,
                                 lambda name: self._source(name, phase.seq_len))
        weights = [float(phase.weights[s.name]) for s in sources]
        pattern, slots, slot_rank = mixture_pattern(weights)
        if not slots.all():
            raise ValueError(f"weights {dict(zip([s.name for s in sources], weights))}: each share must be at "
                             f"least 1/{PATTERN_LEN}")
        first_draw = {}  # a source not drawn from before starts at draw 0
        if before is not None:  # draws continue: the tokens a source gave so far, in windows of this length
            ended = dict(before.first_draw)
            for s, source in enumerate(before.sources):
                ended[source.name] = ended.get(source.name, 0) + before.drawn(s, phase.start - before.phase.start)
            first_draw = {name: -(-d * before.phase.seq_len // phase.seq_len) for name, d in ended.items()}
        return _Segment(phase, sources, pattern, slots, slot_rank, first_draw)

    def _segment_at(self, g: int) -> _Segment:
        return next(seg for seg in reversed(self.segments) if seg.phase.start <= g)

    def _permutation(self, source: _SourceSequences, epoch: int) -> np.ndarray:
        key = (source.name, source.seq_len, epoch)
        if key not in self._permutations:
            for old in [k for k in self._permutations if k[:2] == key[:2] and k[2] < epoch - 1]:
                del self._permutations[old]
            name_key = zlib.crc32(source.name.encode())
            rng = np.random.default_rng([self.seed, name_key, epoch])
            self._permutations[key] = rng.permutation(source.count)
        return self._permutations[key]

    def sequence(self, g: int) -> tuple[_SourceSequences | _Conversations, int]:
        """(source, the source's row) of global sequence g."""
        seg = self._segment_at(g)
        i = g - seg.phase.start
        slot = i % PATTERN_LEN
        s = int(seg.pattern[slot])
        source = seg.sources[s]
        draw = seg.first_draw.get(source.name, 0) + (i // PATTERN_LEN) * int(seg.slots[s]) + int(seg.slot_rank[slot])
        epoch, j = divmod(draw, source.count)
        if self.split == "train":
            j = int(self._permutation(source, epoch)[j])
        return source, j

    def realised_shares(self) -> tuple[int, dict[str, float]]:
        """(index of the current segment, each source's share of the sequences drawn in it so far); every
        sequence of a segment has its seq_len tokens, so these are token shares too."""
        g = max(self.position - 1, 0)
        index = max(i for i, seg in enumerate(self.segments) if seg.phase.start <= g)
        seg = self.segments[index]
        n = self.position - seg.phase.start
        return index, {src.name: seg.drawn(s, n) / max(n, 1) for s, src in enumerate(seg.sources)}

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.batch_size
        first = self.position + self.rank * B
        T = self.seq_len = self._segment_at(self.position).phase.seq_len
        tokens = np.empty((B, T + 1), dtype=np.int64)
        boundaries = np.zeros((B, T), dtype=np.int64)  # 1: a document starts at this position
        labels = np.empty((B, T), dtype=np.int64)
        sources = []
        for b in range(B):
            source, j = self.sequence(first + b)
            tokens[b], boundaries[b], trained = source.row(j)
            labels[b] = tokens[b, 1:] if trained is None else np.where(trained == 1, tokens[b, 1:], IGNORE)
            sources.append(source.name)
        self.position += self.world_size * B
        self.last_sources = sources
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :T])),
                "labels": torch.from_numpy(labels),
                "doc_ids": torch.from_numpy(np.cumsum(boundaries, axis=1))}

    def state_dict(self) -> dict:
        first = self.segments[0].phase
        return {"position": self.position, "split": self.split, "seed": self.seed, "data_hash": self.data_hash,
                "seq_len": first.seq_len, "weights": self.weights,
                "phases": [seg.phase.to_dict() for seg in self.segments]}

    @staticmethod
    def saved_phases(state: dict) -> list[MixPhase]:
        """The segments a state was saved with (states from before phases: one, of its weights and seq_len)."""
        return [MixPhase(**p) for p in state.get("phases", [{"start": 0, "weights": state["weights"],
                                                              "seq_len": state["seq_len"]}])]

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (the world size and micro batch size may differ, and so may
        the segments that start at or after its position: the ones not yet drawn from)."""
        for key in ("split", "seed", "data_hash", "seq_len", "weights"):
            if state.get(key) != getattr(self, key if key != "seq_len" else "_first_seq_len"):
                mine = getattr(self, key if key != "seq_len" else "_first_seq_len")
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                 f"{key}={mine!r}: resuming would not continue the same sequence order")
        position = int(state["position"])
        drawn = [p for p in self.saved_phases(state) if p.start < position]
        mine = [seg.phase for seg in self.segments if seg.phase.start < position]
        if drawn != mine:
            raise ValueError(f"loader state was saved with phases {[p.to_dict() for p in drawn]} before position "
                             f"{position}, this loader has {[p.to_dict() for p in mine]}: resuming would not "
                             "continue the same sequence order")
        self.position = position
        self.seq_len = self._segment_at(position).phase.seq_len

    @property
    def _first_seq_len(self) -> int:
        return self.segments[0].phase.seq_len
