"""The on-disk format of prepared data, written so that an interrupted run never leaves a shard to mistrust.

DATA_DIR/manifest.json        what was prepared (sources, counts, token totals, tokenizer, config, shard list)
DATA_DIR/prepare.json         the identity hash of a preparation, written first: a changed one refuses to mix
DATA_DIR/{split}/{source}/NNNNN.bin   packed tokens (uint16, or uint32 for vocabularies over 65,536): each
                                      document as [bos] text tokens eos (bos when the manifest says "bos")
DATA_DIR/{split}/{source}/NNNNN.idx   int64 document start offsets into the .bin, then its length
DATA_DIR/{split}/{source}/NNNNN.mask  chat sources only: one uint8 a token, 1 where the loss is taken (the
                                      assistant's tokens, data/chat.py), 0 elsewhere
DATA_DIR/{split}/{source}/NNNNN.json  the shard record; written last, so it marks a complete shard

Every file is written by temp + fsync + rename (ondol.files), so a kill at any moment leaves whole files only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondol.errors import DataError
from ondol.files import read_json, space_checked, write_atomic

MANIFEST = "manifest.json"
IDENTITY = "prepare.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


class DataNotPrepared(DataError, FileNotFoundError):
    """No manifest: the data was never prepared, or its preparation did not finish."""


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataNotPrepared(f"no {MANIFEST} in {data_dir}: run `ondol data prepare CONFIG` first "
                                f"(an interrupted preparation resumes when re-run)")
    return read_json(path, DataError, "re-run `ondol data prepare CONFIG`: it rebuilds the manifest from the "
                                      "finished shards")


def check_tokenizer(data_dir: str | os.PathLike, manifest: dict, tokenizer) -> None:
    """Refuse prepared data whose tokens come from another tokenizer than `tokenizer` (ids would mean other
    pieces: a model trained or scored on them would not match its tokenizer)."""
    prepared = manifest["tokenizer"]["fingerprint"]
    if prepared != tokenizer.fingerprint:
        raise DataError(f"{data_dir} was prepared with tokenizer {prepared}, but the run's tokenizer at "
                        f"{tokenizer.directory} is {tokenizer.fingerprint}: delete {data_dir} and re-run "
                        "`ondol data prepare CONFIG` with this tokenizer, or point tokenizer.path at the one the data "
                        "was prepared with")


def shard_intact(data_dir: str | os.PathLike, record: dict, dtype: str) -> bool:
    """Whether a recorded shard's token and index files are there with the sizes its record gives."""
    stem = Path(data_dir) / record["path"]
    tokens, index, mask = stem.with_suffix(".bin"), stem.with_suffix(".idx"), stem.with_suffix(".mask")
    return (tokens.is_file() and tokens.stat().st_size == record["tokens"] * np.dtype(dtype).itemsize
            and index.is_file() and index.stat().st_size == 8 * (record["docs"] + 1)
            and (not record.get("mask") or (mask.is_file() and mask.stat().st_size == record["tokens"])))


class ShardWriter:
    """Packs the documents of one (split, source) stream into shards of about `shard_tokens` tokens.

    On creation it adopts the intact shards an earlier, interrupted run left (a contiguous run of records
    from 00000 whose files are whole) and deletes anything else; `skip_docs` then says how many leading
    documents they hold, so the caller neither re-tokenizes nor re-writes them. A `masked` stream (a chat source)
    also writes each token's loss mask, and its records count the tokens the loss is taken on.
    """

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int, masked: bool = False):
        self.dir, self.dtype, self.shard_tokens, self.masked = directory, dtype, shard_tokens, masked
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        while (record_path := self.dir / f"{len(self.records):05d}.json").is_file():
            record = json.loads(record_path.read_text())
            if not shard_intact(self.dir.parent.parent, record, dtype.name):
                break
            self.records.append(record)
        keep = {f"{i:05d}{ext}" for i in range(len(self.records)) for ext in (".bin", ".idx", ".json", ".mask")}
        for stale in self.dir.iterdir():  # incomplete shards, and temporaries of a killed writer
            if stale.name not in keep:
                stale.unlink()
        self.skip_docs = sum(r["docs"] for r in self.records)
        self._parts: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append whole documents (packed tokens, each ending in eos, and their lengths; a masked stream's loss
        mask beside the tokens); a shard is written as soon as its documents reach shard_tokens."""
        if self.masked != (mask is not None):
            raise ValueError(f"{self.dir}: a {'chat' if self.masked else 'text'} stream takes documents "
                             f"{'with' if self.masked else 'without'} a loss mask")
        while len(lengths):
            ends = np.cumsum(lengths)
            take = min(len(lengths), int(np.searchsorted(ends, self.shard_tokens - self._tokens)) + 1)
            size = int(ends[take - 1])
            self._parts.append(tokens[:size])
            if mask is not None:
                self._masks.append(mask[:size])
                mask = mask[size:]
            self._lengths.append(lengths[:take])
            self._tokens += size
            tokens, lengths = tokens[size:], lengths[take:]
            if self._tokens >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        stem = f"{len(self.records):05d}"
        starts = np.concatenate([[0], np.cumsum(np.concatenate(self._lengths))])
        need = int(starts[-1]) * (self.dtype.itemsize + self.masked) + starts.nbytes
        with space_checked(self.dir, DataError, f"shard {stem}", need):
            write_atomic(self.dir / f"{stem}.bin",
                         np.concatenate(self._parts).astype(self.dtype, copy=False).tobytes())
            write_atomic(self.dir / f"{stem}.idx", starts.tobytes())
            record = {"path": str(Path(self.dir.parent.name) / self.dir.name / stem), "tokens": int(starts[-1]),
                      "docs": len(starts) - 1}
            if self.masked:
                mask = np.concatenate(self._masks).astype(np.uint8, copy=False)
                write_atomic(self.dir / f"{stem}.mask", mask.tobytes())
                record |= {"mask": True, "loss_tokens": int(mask.sum())}
            write_json(self.dir / f"{stem}.json", record)
        self.records.append(record)
        self._parts, self._masks, self._lengths, self._tokens = [], [], [], 0


@dataclass
class Shard:
    tokens: np.ndarray  # read-only memmap of the packed tokens
    starts: np.ndarray  # document start offsets, then the token count
    bos: bool  # each document starts with bos
    path: Path  # the .bin file of `tokens`
    vocab_size: int = 0  # every id must lie below it (checked on the first window); 0: not checked
    checked: bool = False
    mask: np.ndarray | None = None  # chat sources: read-only memmap of each token's loss mask (1: trained on)

    @property
    def docs(self) -> int:
        return len(self.starts) - 1

    def window(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n). On the first call the shard's largest id is checked against vocab_size
        (one pass over the file, once per process): damaged bytes would index past the embedding."""
        if not self.checked and self.vocab_size and len(self.tokens):
            largest = int(self.tokens.max())
            if largest >= self.vocab_size:
                raise DataError(f"{self.path}: token id {largest} is not below the vocabulary of {self.vocab_size} "
                                "the manifest records: the shard is damaged; delete it and re-run "
                                "`ondol data prepare CONFIG` to rebuild it")
        self.checked = True
        return self.tokens[start:start + n]

    def document(self, i: int) -> np.ndarray:
        """The text tokens of document i (no bos, no eos)."""
        return self.tokens[self.starts[i] + self.bos:self.starts[i + 1] - 1]


def open_shard(data_dir: str | os.PathLike, record: dict, dtype: str, bos: bool, vocab_size: int = 0) -> Shard:
    stem = Path(data_dir) / record["path"]
    bin_path = stem.with_suffix(".bin")
    dtype_ = np.dtype(dtype)
    if not shard_intact(data_dir, record, dtype):
        raise DataError(f"{bin_path}: missing, or not the {record['tokens']} tokens and {record['docs']} documents "
                         f"the manifest says; re-run `ondol data prepare CONFIG` to rebuild it")
    starts = np.fromfile(stem.with_suffix(".idx"), dtype=np.int64)
    tokens = np.memmap(bin_path, dtype=dtype_, mode="r") if record["tokens"] else np.zeros(0, dtype_)
    mask = None
    if record.get("mask"):
        mask = np.memmap(stem.with_suffix(".mask"), dtype=np.uint8, mode="r") if record["tokens"] else np.zeros(0, np.uint8)
    return Shard(tokens, starts, bos, bin_path, vocab_size, mask=mask)


def split_shards(data_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> dict[str, list[Shard]]:
    """Every shard of a split, per source name, in manifest order."""
    manifest = manifest or read_manifest(data_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not '{split}'")
    vocab_size = manifest["tokenizer"]["vocab_size"]
    return {name: [open_shard(data_dir, r, manifest["dtype"], manifest["bos"], vocab_size) for r in records]
            for name, records in manifest["splits"][split].items()}


def first_documents(data_dir: str | os.PathLike, split: str, tokenizer, n: int) -> list[str]:
    """The decoded text of the first n documents of a split (sources in manifest order)."""
    texts: list[str] = []
    for shards in split_shards(data_dir, split).values():
        for shard in shards:
            for i in range(shard.docs):
                if len(texts) == n:
                    return texts
                texts.append(tokenizer.decode(shard.document(i).tolist()))
    return texts
