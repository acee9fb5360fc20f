"""Tokenizer efficiency per source, beside comparison tokenizers (Ondol, any tokenizer.json, o200k).

Metrics, per source: chars/token and bytes/token (higher is better), tokens per eojeol (space-separated
word), the byte-fallback rate (share of tokens that are a fragment of a character: SentencePiece byte
pieces, or byte-level tokens that are not whole UTF-8) and strict round-trip failures (decode(encode(x))
is not x; a tokenizer that normalizes counts every text it changes).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from rich.table import Table

from ondol.data.config import SourceConfig
from ondol.data.sources import iter_documents
from ondol.tokenizer.sample import is_held_out
from ondol.tokenizer.tokenizer import META_FILE, Tokenizer

TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "baselines" / "tiktoken_cache"
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class Encoder(Protocol):
    name: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def is_fragment(self, token_id: int) -> bool: ...


@dataclass
class OndolEncoder:
    tok: Tokenizer
    name: str

    def encode_batch(self, texts):
        return self.tok.encode_batch(texts)

    def decode(self, ids):
        return self.tok.decode(ids)

    def is_fragment(self, token_id):
        return self.tok.is_byte(token_id)


@dataclass
class HFEncoder:
    tok: object  # tokenizers.Tokenizer
    name: str

    def __post_init__(self):
        self._bytes = {i for piece, i in self.tok.get_vocab().items() if BYTE_PIECE.fullmatch(piece)}

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def is_fragment(self, token_id):
        return token_id in self._bytes


@dataclass
class TiktokenEncoder:
    enc: object  # tiktoken.Encoding
    name: str

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=2)

    def decode(self, ids):
        return self.enc.decode(ids)

    def __post_init__(self):
        self._whole: dict[int, bool] = {}

    def is_fragment(self, token_id):
        if token_id not in self._whole:
            try:
                self.enc.decode_single_token_bytes(token_id).decode("utf-8")
                self._whole[token_id] = True
            except UnicodeDecodeError:
                self._whole[token_id] = False
        return not self._whole[token_id]


def load_encoder(spec: str) -> Encoder:
    """'o200k' (GPT-4o, offline from ../shared/baselines), an Ondol tokenizer folder, or a tokenizer.json."""
    if spec in ("o200k", "o200k_base"):
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        import tiktoken

        return TiktokenEncoder(tiktoken.get_encoding("o200k_base"), "o200k")
    path = Path(spec)
    if (path / META_FILE).is_file():
        return OndolEncoder(Tokenizer.load(path), f"ondol:{_short(path)}")
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer as HFTokenizer

        return HFEncoder(HFTokenizer.from_file(str(path)), f"hf:{_short(path.parent)}")
    raise ValueError(
        f"comparison tokenizer '{spec}': give o200k, an Ondol tokenizer folder (with {META_FILE}) "
        f"or a tokenizer.json file"
    )


def _short(path: Path) -> str:
    return "/".join(path.resolve().parts[-2:])


@dataclass
class SourceMetrics:
    tokenizer: str
    source: str
    docs: int
    chars: int
    bytes: int
    tokens: int
    eojeols: int
    chars_per_token: float
    bytes_per_token: float
    tokens_per_eojeol: float
    byte_fallback_rate: float
    round_trip_failures: int


def measure(encoder: Encoder, source: str, texts: list[str]) -> SourceMetrics:
    ids = encoder.encode_batch(texts)
    tokens = sum(map(len, ids))
    fallback = sum(encoder.is_fragment(i) for seq in ids for i in seq)
    failures = sum(encoder.decode(seq) != text for text, seq in zip(texts, ids))
    chars = sum(map(len, texts))
    nbytes = sum(len(t.encode()) for t in texts)
    eojeols = sum(len(t.split()) for t in texts)
    return SourceMetrics(
        encoder.name,
        source,
        len(texts),
        chars,
        nbytes,
        tokens,
        eojeols,
        chars / max(tokens, 1),
        nbytes / max(tokens, 1),
        tokens / max(eojeols, 1),
        fallback / max(tokens, 1),
        failures,
    )


def evaluate(encoders: list[Encoder], texts_by_source: dict[str, list[str]]) -> dict:
    """Metrics of every encoder on every source; ratios: chars/token over the last encoder's (the baseline)."""
    rows = [measure(e, name, texts) for name, texts in texts_by_source.items() for e in encoders]
    baseline = encoders[-1].name
    base = {r.source: r.chars_per_token for r in rows if r.tokenizer == baseline}
    return {
        "baseline": baseline,
        "rows": [{**asdict(r), "ratio_vs_baseline": r.chars_per_token / base[r.source]} for r in rows],
    }


def table(report: dict, title: str = "tokenizer efficiency") -> Table:
    t = Table(title=title)
    for col in (
        "source",
        "tokenizer",
        "docs",
        "chars/tok",
        "bytes/tok",
        "tok/eojeol",
        "byte-fb %",
        "rt fail",
        f"x {report['baseline']}",
    ):
        t.add_column(col, justify="left" if col in ("source", "tokenizer") else "right")
    for r in report["rows"]:
        t.add_row(
            r["source"],
            r["tokenizer"],
            f"{r['docs']:,}",
            f"{r['chars_per_token']:.3f}",
            f"{r['bytes_per_token']:.3f}",
            f"{r['tokens_per_eojeol']:.3f}",
            f"{100 * r['byte_fallback_rate']:.3f}",
            str(r["round_trip_failures"]),
            f"{r['ratio_vs_baseline']:.3f}",
        )
    return t


def evaluation_texts(
    sources: list[SourceConfig], holdout_fraction: float, max_docs: int
) -> dict[str, list[str]]:
    """Up to max_docs documents per source that the tokenizer did not train on: its hold-out (by text hash) when
    tokenizer.holdout_fraction > 0, else the documents after the source's max_docs (training reads the first
    max_docs in file order). A source read whole without a hold-out has none: its list is empty."""
    out = {}
    for source in sources:
        if holdout_fraction > 0:
            docs = (d.text for d in iter_documents(source) if is_held_out(d.text, holdout_fraction))
        elif source.max_docs is not None:
            unread = itertools.islice(iter_documents(dataclasses.replace(source, max_docs=None)), source.max_docs, None)
            docs = (d.text for d in unread)
        else:
            docs = iter(())
        out[source.name] = list(itertools.islice(docs, max_docs))
    return out
