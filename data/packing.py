"""What both preparation paths (data/preparation.py on one machine, data/cluster.py on DataTrove) share:
documents encoded into one packed array, runs of them handed to their shard writers, and the manifest."""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ondol.data.chat import encode_conversations
from ondol.data.clean import Cleaner
from ondol.data.config import DataConfig
from ondol.data.shards import SPLITS
from ondol.data.sources import resolve_files

FORMAT = "ondol-data/1"


def encode_documents(tok, texts: list[str], dtype: str, bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of every text between bos (if asked) and eos, packed into one array, and each document's length."""
    head = [tok.bos_id] if bos else []
    flat, lengths = [], []
    for ids in tok.encode_batch(texts):
        flat.extend(head)
        flat.extend(ids)
        flat.append(tok.eos_id)
        lengths.append(len(head) + len(ids) + 1)
    return np.array(flat, dtype=dtype), np.array(lengths, dtype=np.int64)


def encode_chats(tok, conversations: list[list[tuple[str, str]]], dtype: str, bos: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """encode_documents for conversations (data/chat.py), eos after each, plus the packed loss mask."""
    flat, lengths, mask = [], [], []
    for ids, produced in encode_conversations(tok, conversations, bos):
        flat.extend(ids)
        flat.append(tok.eos_id)
        mask.extend(produced)
        mask.append(0)
        lengths.append(len(ids) + 1)
    return np.array(flat, dtype=dtype), np.array(lengths, dtype=np.int64), np.array(mask, dtype=np.uint8)


def source_files(source) -> list[list]:
    """[path, size] of each file of a source, as the manifest lists them (none for a Hugging Face dataset)."""
    return [] if source.format == "hf" else [[f, os.path.getsize(f)] for f in resolve_files(source)]


def deliver_documents(writers: dict, routes: list, flat: np.ndarray, lengths: np.ndarray,
                      mask: np.ndarray | None = None) -> None:
    """Hand each run of consecutive documents bound for the same shard stream (routes[i]) to its writer."""
    doc = offset = 0
    for key, run in itertools.groupby(routes):
        n = sum(1 for _ in run)
        size = int(lengths[doc:doc + n].sum())
        writers[key].add(flat[offset:offset + size], lengths[doc:doc + n],
                         None if mask is None else mask[offset:offset + size])
        doc, offset = doc + n, offset + size


def tokenizer_record(tokenizer) -> dict:
    return {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def chat_counts(writers: dict, name: str, seq_len: int) -> dict:
    """Per split of a chat source: conversations, the tokens the loss is taken on (the assistant's) and those it
    is not (masked: prompts, role tokens, bos, eos), and the conversations longer than seq_len + 1 tokens, which
    training at data.seq_len drops (data/loader.py packs whole conversations only)."""
    counts = {}
    for split in SPLITS:
        writer = writers[split, name]
        lengths = [np.diff(np.fromfile(writer.dir / f"{Path(r['path']).name}.idx", dtype=np.int64))
                   for r in writer.records]
        loss_tokens = sum(r["loss_tokens"] for r in writer.records)
        counts[split] = {"conversations": sum(r["docs"] for r in writer.records), "assistant_tokens": loss_tokens,
                         "masked_tokens": sum(r["tokens"] for r in writer.records) - loss_tokens,
                         "too_long": int(sum((n > seq_len + 1).sum() for n in lengths)), "seq_len": seq_len}
    return counts


def build_manifest(cfg: DataConfig, tokenizer, seed: int, digest: str, dtype: np.dtype, stats: list[dict],
                   cleaner: Cleaner, writers: dict) -> dict:
    """The manifest of a finished preparation: per-source counts and tokens, totals, and every shard."""
    for entry in stats:
        name = entry["name"]
        entry["modified"] = dict(cleaner.modified.get(name, {}))
        entry["dropped"] = dict(cleaner.dropped.get(name, {}))
        entry["tokens"] = {split: sum(r["tokens"] for r in writers[split, name].records) for split in SPLITS}
        if writers[SPLITS[0], name].masked:
            entry["chat"] = chat_counts(writers, name, cfg.seq_len)
    totals = {f"{split}_{what}": sum(e[key][split] for e in stats)
              for split in SPLITS for what, key in (("docs", "kept"), ("tokens", "tokens"), ("chars", "chars"))}
    totals["dropped"] = sum(sum(e["dropped"].values()) for e in stats)
    totals["bad_input"] = sum(sum(e["bad_input"].values()) for e in stats)
    return {
        "format": FORMAT, "hash": digest, "seed": seed, "dtype": dtype.name, "bos": cfg.bos,
        "tokenizer": tokenizer_record(tokenizer),
        "weights": {s.name: s.weight for s in cfg.sources},
        "sources": stats, "totals": totals, "config": asdict(cfg),
        "splits": {split: {s.name: writers[split, s.name].records for s in cfg.sources} for split in SPLITS},
    }
