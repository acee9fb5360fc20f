"""`prepare`: sources -> cleaned documents -> tokens (in parallel) -> packed shards and a manifest.

The main process reads, cleans, deduplicates and splits documents (cheap, and order-dependent); worker
processes tokenize chunks of them (the expensive part) and results come back in submission order, so the
shards are the same for any `num_proc`. A re-run resumes: finished shards are kept and their documents are
neither tokenized nor written again; the identity hash of tokenizer + config + input files refuses to mix
two preparations in one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ondol.data.chat import chat_ids
from ondol.data.clean import Cleaner, check_normalization
from ondol.data.config import DataConfig
from ondol.data.packing import (
    FORMAT,
    build_manifest,
    deliver_documents,
    encode_chats,
    encode_documents,
    source_files,
    tokenizer_record,
)
from ondol.data.shards import (
    IDENTITY,
    MANIFEST,
    SPLITS,
    ShardWriter,
    read_manifest,
    shard_intact,
    token_dtype,
    write_json,
)
from ondol.data.sources import BadInputLog, is_chat, iter_documents, source_identity
from ondol.errors import DataError, ignore_interrupts
from ondol.files import exclusive_lock, move_aside, read_json

CHUNK_DOCS, CHUNK_CHARS = 2048, 1 << 20  # documents sent to a worker at a time
log = logging.getLogger("ondol.data")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_worker_tokenizer = None  # set before forking the pool; each worker inherits it


def _encode_chunk(items: list, dtype: str, bos: bool, chat: bool) -> tuple:
    """(tokens, lengths) of texts, or (tokens, lengths, loss mask) of conversations."""
    return (encode_chats if chat else encode_documents)(_worker_tokenizer, items, dtype, bos)


class _OrderedEncoder:
    """Tokenizes chunks in worker processes (or inline for num_proc <= 1), delivering results in order.

    A worker that dies (killed, out of memory) fails the run with a clear error instead of hanging it.
    """

    def __init__(self, tokenizer, num_proc: int, dtype: np.dtype, bos: bool, deliver):
        global _worker_tokenizer
        _worker_tokenizer = tokenizer  # forked workers inherit it: nothing to pickle
        self.args, self.deliver = (dtype.name, bos), deliver
        self.pool = (ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                                         initializer=ignore_interrupts)
                     if num_proc > 1 else None)
        self.window = 2 * num_proc
        self.pending: deque = deque()

    def submit(self, items: list, routes: list, chat: bool) -> None:
        if self.pool is None:
            self.deliver(routes, *_encode_chunk(items, *self.args, chat))
            return
        self.pending.append((routes, self.pool.submit(_encode_chunk, items, *self.args, chat)))
        while len(self.pending) > self.window:
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        routes, future = self.pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            raise RuntimeError("a tokenizing worker process died (killed or out of memory?): lower "
                               "data.num_proc and re-run; finished shards are kept") from None
        self.deliver(routes, *result)

    def close(self) -> None:
        while self.pending:
            self._deliver_oldest()
        if self.pool is not None:
            self.pool.shutdown()

    def terminate(self) -> None:
        """Stop now: queued chunks are dropped and busy workers terminated, not left to finish their chunk."""
        if self.pool is not None:
            workers = list((self.pool._processes or {}).values())  # the executor has no public way to stop them
            self.pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.terminate()


def _identity(cfg: DataConfig, tokenizer, seed: int) -> dict:
    """Everything that decides the shards' bytes (not weights, seq_len or num_proc: those never change them)."""
    sources = []
    for s in cfg.sources:
        sources.append({k: v for k, v in source_identity(s).items() if k != "weight"})
    cleaning = asdict(cfg.cleaning)
    if not cfg.cleaning.languages:  # off: preparations from before the language filter keep their identity
        for key in ("languages", "min_language_score", "language_sources"):
            del cleaning[key]
    return {"format": FORMAT, "seed": seed, "sources": sources, "cleaning": cleaning,
            "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens, "bos": cfg.bos,
            "tokenizer": tokenizer_record(tokenizer)}


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_sources(cfg: DataConfig) -> None:
    if not cfg.sources:
        raise ValueError("data.sources is empty: list at least one source (name, path)")
    names = [s.name for s in cfg.sources]
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"data.sources: name '{name}' must be letters, digits, '_', '.' or '-' "
                             f"(it names a folder of shards)")
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names must be unique, got {names}")


def _refuse_mixing(out_dir: Path, identity: dict, digest: str) -> None:
    """Refuse a folder holding data prepared with another identity. A preparation that never finished (no
    manifest: it failed, was stopped or found no documents) blocks nothing: without a finished shard it is
    replaced, with some it is moved aside, so the corrected command simply runs."""
    path = out_dir / IDENTITY
    if not path.is_file():
        return
    old = read_json(path, DataError, f"delete {out_dir} or use another run_dir, and prepare again")
    if old.get("hash") == digest:
        return
    if not (out_dir / MANIFEST).is_file():
        if any(out_dir.glob("*/*/*.json")):  # finished shards of the unfinished preparation
            log.warning("%s: moved the unfinished preparation with another config to %s", out_dir,
                        move_aside(out_dir))
        else:
            path.unlink()
        return
    changed = [k for k in sorted(identity) if old.get("identity", {}).get(k) != identity[k]] or ["format"]
    raise ValueError(f"{out_dir} holds data prepared with a different {', '.join(changed)} "
                     f"(hash {old.get('hash')} != {digest}): refusing to mix; delete {out_dir} or use "
                     f"another run_dir")


def _reuse(out_dir: Path, cfg: DataConfig, digest: str) -> dict | None:
    """The finished manifest for this identity, with the (free to change) mixture weights brought up to date."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except DataError as e:
        log.warning("%s; rebuilding it", e)
        path.unlink()
        return None
    if manifest.get("hash") != digest:
        return None
    records = [r for split in manifest["splits"].values() for rs in split.values() for r in rs]
    if not all(shard_intact(out_dir, r, manifest["dtype"]) for r in records):
        log.warning("%s: shards are missing or damaged; rebuilding them", out_dir)
        path.unlink()
        return None
    weights = {s.name: s.weight for s in cfg.sources}
    if manifest["weights"] != weights:
        manifest["weights"] = weights
        for entry in manifest["sources"] + manifest["config"]["sources"]:
            entry["weight"] = weights[entry["name"]]
        write_json(path, manifest)
    return manifest


def prepare(cfg: DataConfig, tokenizer, out_dir: str | os.PathLike, seed: int, progress: bool = True) -> dict:
    """Prepare every source into out_dir and return the manifest; finished work is reused, not redone."""
    out_dir = Path(out_dir)
    _check_sources(cfg)
    check_normalization(cfg.cleaning, tokenizer.normalize)
    if cfg.bos and tokenizer.bos_id < 0:
        raise ValueError("data.bos is on but the tokenizer has no bos token: set data.bos=false")
    identity = _identity(cfg, tokenizer, seed)
    if cfg.executor == "single" and (cfg.near_dedup.enabled or cfg.pii != "off"):
        raise ValueError("data.near_dedup and data.pii run on DataTrove: set data.executor=local "
                         "(data.tasks=1 is fine) or slurm")
    chat = {s.name for s in cfg.sources if is_chat(s)}
    if chat and cfg.executor != "single":
        raise ValueError(f"chat sources ({', '.join(sorted(chat))}) are prepared by data.executor=single only")
    if chat:
        chat_ids(tokenizer)  # the tokenizer has the role tokens
    # Only when on, so that preparations from before these settings keep their identity.
    identity |= {"near_dedup": asdict(cfg.near_dedup)} if cfg.near_dedup.enabled else {}
    identity |= {"pii": cfg.pii} if cfg.pii != "off" else {}
    digest = _digest(identity)
    # one preparation writes a data folder at a time; the lock lies beside the folder, which an unfinished
    # preparation with another config may be moved aside as a whole (_refuse_mixing)
    with exclusive_lock(out_dir.with_name(f"{out_dir.name}.lock"), DataError):
        _refuse_mixing(out_dir, identity, digest)
        return _reuse(out_dir, cfg, digest) or _prepare_into(cfg, tokenizer, out_dir, seed, progress, identity,
                                                             digest)


def _prepare_into(cfg: DataConfig, tokenizer, out_dir: Path, seed: int, progress: bool, identity: dict,
                  digest: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / IDENTITY, {"hash": digest, "identity": identity})
    if cfg.executor != "single":
        from ondol.data.cluster import prepare_on_datatrove

        return prepare_on_datatrove(cfg, tokenizer, out_dir, seed, digest, progress)

    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    chat = {s.name: is_chat(s) for s in cfg.sources}
    writers = {(split, s.name): ShardWriter(out_dir / split / s.name, dtype, cfg.shard_tokens, chat[s.name])
               for split in SPLITS for s in cfg.sources}

    def deliver(routes: list, *encoded: np.ndarray) -> None:
        deliver_documents(writers, routes, *encoded)

    cleaner = Cleaner(cfg.cleaning, seed, cfg.val_fraction)
    encoder = _OrderedEncoder(tokenizer, cfg.num_proc, dtype, cfg.bos, deliver)
    stats = []
    try:
        for source in cfg.sources:
            stats.append(_prepare_source(source, cfg, cleaner, encoder, writers, progress, chat[source.name]))
        encoder.close()
    except BaseException:
        encoder.terminate()
        raise
    for writer in writers.values():
        writer.flush()
    for entry, source in zip(stats, cfg.sources):
        entry["files"] = source_files(source)
    manifest = build_manifest(cfg, tokenizer, seed, digest, dtype, stats, cleaner, writers)
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    if not manifest["totals"]["train_tokens"]:  # unfinished, so a corrected config is not refused
        dropped = ", ".join(f"{n:,} {why}" for s in stats for why, n in s["dropped"].items()) or "none dropped"
        raise ValueError(f"{out_dir}: no training document is left of {sum(s['read'] for s in stats):,} read "
                         f"({dropped}): loosen data.cleaning or add data, and re-run")
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _prepare_source(source, cfg: DataConfig, cleaner: Cleaner, encoder: _OrderedEncoder,
                    writers: dict, progress: bool, chat: bool) -> dict:
    """Read, clean and split one source (texts, or a chat source's conversations), queueing for tokenization
    what finished shards do not hold yet."""
    bad = BadInputLog(strict=cfg.strict)
    kept, chars = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    keys = {split: (split, source.name) for split in SPLITS}
    skip = {split: writers[keys[split]].skip_docs for split in SPLITS}
    items: list = []  # texts, or conversations
    routes: list[tuple[str, str]] = []
    bar = tqdm(desc=f"data: {source.name}", unit=" docs", unit_scale=True, total=source.max_docs,
               disable=None if progress else True,  # None: no bar off a terminal
               mininterval=0.5, dynamic_ncols=True)
    read = chunk_chars = 0
    for doc in iter_documents(source, bad=bad):
        read += 1
        if read % 1024 == 0:
            bar.update(1024)
        cleaned = (cleaner.clean_conversation(doc.messages, source.name) if chat
                   else cleaner.clean(doc.text, source.name))
        if cleaned is None:
            continue
        item, split = cleaned
        size = sum(len(content) for _, content in item) if chat else len(item)
        kept[split] += 1
        chars[split] += size
        if kept[split] <= skip[split]:
            continue  # already in a finished shard from an earlier, interrupted run
        items.append(item)
        routes.append(keys[split])
        chunk_chars += size
        if len(items) >= CHUNK_DOCS or chunk_chars >= CHUNK_CHARS:
            encoder.submit(items, routes, chat)
            items, routes, chunk_chars = [], [], 0
    if items:
        encoder.submit(items, routes, chat)
    bar.update(read % 1024)
    bar.close()
    return {"name": source.name, "path": source.path, "weight": source.weight, "read": read,
            "bad_input": dict(bad.counts), "bad_input_examples": bad.examples,
            "kept": kept, "chars": chars}
