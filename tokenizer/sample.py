"""The training sample: documents cut into sentences, mixed by per-source weights, bounded and shuffled.

SentencePiece holds its whole input in memory and skips sentences longer than max_sentence_length, so
the trainer never sees raw documents: each is cut at line ends into sentences of at most
`max_sentence_chars` (newlines stay inside, so pieces such as ".\\n" and indentation can be learned), and
each source keeps a reservoir sample of at most `max_sentences` sentences however large it is. The
reservoirs are then weighted by characters: source i contributes weight_i / sum(weights) of the training
characters, by subsampling or by repeating its sentences; the total is every reservoir character, or
`max_chars` when that is smaller (training time and memory grow with it).
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ondol.data.config import SourceConfig
from ondol.data.sources import BadInputLog, iter_documents


def split_sentences(text: str, max_chars: int) -> Iterator[str]:
    """Cut text into consecutive pieces of at most max_chars, at line ends where possible, losing nothing."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = text.rfind("\n", start, start + max_chars) + 1
        if end <= start:  # one long line: cut after a space, else hard
            end = text.rfind(" ", start, start + max_chars) + 1
        if end <= start:
            end = start + max_chars
        yield text[start:end]
        start = end
    if start < n:
        yield text[start:]


@dataclass
class SourceSample:
    """A bounded uniform sample (reservoir) of one source's sentences, with counts of what was seen."""

    name: str
    weight: float
    sentences: list[str] = field(default_factory=list)
    documents: int = 0
    held_out: int = 0  # documents kept out for evaluation
    seen: int = 0  # sentences offered to the reservoir
    seen_chars: int = 0
    bad: BadInputLog = field(default_factory=BadInputLog)


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document is in the evaluation hold-out: a function of its text alone, so every reader agrees."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def sample_source(
    source: SourceConfig,
    capacity: int,
    max_chars: int,
    seed: int,
    prepare: Callable[[str], str],
    holdout_fraction: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> SourceSample:
    """Reservoir-sample (algorithm R) at most `capacity` sentences of a source, deterministically per seed."""
    rng = random.Random(_source_seed(seed, source.name))
    out = SourceSample(source.name, source.weight)
    for doc in iter_documents(source, bad=out.bad):
        if progress is not None:
            progress(1)
        if is_held_out(doc.text, holdout_fraction):
            out.held_out += 1
            continue
        out.documents += 1
        for sentence in split_sentences(prepare(doc.text), max_chars):
            out.seen += 1
            out.seen_chars += len(sentence)
            if len(out.sentences) < capacity:
                out.sentences.append(sentence)
            else:
                j = rng.randrange(out.seen)
                if j < capacity:
                    out.sentences[j] = sentence
    return out


def mix(samples: list[SourceSample], max_sentences: int, seed: int, max_chars: int = 0) -> list[str]:
    """Weight the reservoirs by characters, cap the total at max_chars (0: every reservoir character) and
    max_sentences, and shuffle."""
    rng = random.Random(seed)
    samples = [s for s in samples if s.sentences and s.weight > 0]
    total_w = sum(s.weight for s in samples)
    kept = {s.name: sum(map(len, s.sentences)) for s in samples}
    total_chars = min(sum(kept.values()), max_chars or sum(kept.values()))
    mixed: list[str] = []
    for s in samples:
        factor = total_chars * s.weight / total_w / kept[s.name]  # > 1: repeat, < 1: subsample
        whole, frac = int(factor), factor - int(factor)
        mixed.extend(s.sentences * whole)
        mixed.extend(rng.sample(s.sentences, round(frac * len(s.sentences))))
    if len(mixed) > max_sentences:
        mixed = rng.sample(mixed, max_sentences)
    rng.shuffle(mixed)
    return mixed


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _source_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
