"""`prepare` as DataTrove stages: N tasks on this machine (data.executor=local) or on Slurm (slurm), writing
the same shards and manifest as the single-machine prepare.

Stages, each a DataTrove executor whose tasks leave a completion file, so a re-run skips finished tasks and
redoes a killed one from its start (a task's outputs are whole files, rewritten by the redo; the completion file
is written by temp + fsync + rename after the task's files are fsynced):
  count     (this process) reads every source once: its documents and bad input, reported as single-machine
            prepare reports them, and where every CHECKPOINT_DOCS-th document starts (file, line); it fixes the
            share of each source that each task takes
  clean     N tasks: task k takes the k-th contiguous share of every source, cleans and filters it (clean.py),
            writes the cleaned documents and their exact signatures (sorted in runs of at most
            RUN_SIGNATURES in memory, merged on disk beyond). A task starts reading at
            the checkpoint before its share: the files before it are not opened, the lines before it in its
            file are only decompressed and counted, not parsed
  exact     N tasks: DataTrove's ExactFindDedups, one hash range each, merging sorted signature files
            (memory bounded by a task's share, not by the corpus); the document kept of a duplicate group is
            the first one in source then document order, as in single-machine prepare
  near      data.near_dedup: DataTrove's MinhashDedupBuckets (one task per bucket) and MinhashDedupCluster
  tokenize  N tasks: drops duplicates, masks or drops personal data (pii.py), tokenizes into task shards
  pack      (this process) appends the task shards in task order to the final shards and writes the manifest
Exact duplicates are found by a 64-bit SHA-1 prefix (DataTrove's), the single-machine prepare uses 128-bit
BLAKE2b: they disagree only on a 64-bit collision (about 1e-8 for a million documents).
DataTrove's own log lines go to DATA_DIR/datatrove.log (local tasks; Slurm tasks write to their Slurm logs);
the console gets one line per finished stage.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
from datatrove.data import Document as TroveDocument
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.io import DataFolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    get_sig_dtype,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.logging import logger as trove_logger
from datatrove.utils.logging import setup_default_logger
from datatrove.utils.typeshelper import ExtensionHelperSD, StatHints
from datatrove.utils.word_tokenizers import KiwiTokenizer
from tqdm import tqdm

from ondol.data import pii
from ondol.data.clean import Cleaner
from ondol.data.config import DataConfig
from ondol.data.packing import build_manifest, deliver_documents, encode_documents, source_files
from ondol.data.shards import MANIFEST, SPLITS, ShardWriter, open_shard, token_dtype, write_json
from ondol.data.sources import BadInputLog, iter_documents, resolve_files
from ondol.errors import ConfigError, DataError, OndolError
from ondol.files import fsync_dir, fsync_file, fsync_tree, write_atomic

log = logging.getLogger("ondol.data")
WORK = "datatrove"  # DATA_DIR/datatrove: stage logs, completion files and intermediate data, removed when done
LOG = "datatrove.log"  # DATA_DIR/datatrove.log: DataTrove's own log lines (data.executor=local), kept
ENCODE_DOCS = 2048  # documents tokenized at a time
CHECKPOINT_DOCS = 4096  # the count stage notes where every this-many-th document of a source starts
RUN_SIGNATURES = 1 << 22  # exact-dedup signatures a task sorts in memory at a time (16 bytes each: 64 MiB)
MERGE_BLOCK = 1 << 12  # signatures read from each sorted run, and written, at a time
MAX_PRIORITY = 65535  # DataTrove keeps the duplicate of highest priority (16 bits)
KOREAN = "kor_Hang"  # DataTrove's language code for Korean (its MinHash n-grams are of Kiwi's words)
# Values that DataTrove writes into an sbatch script: no spaces, quotes, $, ;, newlines or other shell syntax.
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_./:%+,=@-]+$")


def _exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=_text, document_priority=_priority,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))


def _text(doc: TroveDocument) -> str:
    return doc.text


def _priority(doc: TroveDocument) -> int:
    return doc.metadata["priority"]


def _minhash_config(cfg: DataConfig) -> MinhashConfig:
    near = cfg.near_dedup
    return MinhashConfig(n_grams=near.n_grams, num_buckets=near.num_buckets, hashes_per_bucket=near.hashes_per_bucket,
                         hash_config=HashConfig(precision=64, hash_fc="sha1"))


def share(count: int, rank: int, tasks: int) -> tuple[int, int]:
    """The documents [start, end) of a source of `count` documents that task `rank` of `tasks` takes."""
    return count * rank // tasks, count * (rank + 1) // tasks


class _CleanShare(PipelineStep):
    """Stage clean, first step: this task's share of every source, cleaned and filtered (not deduplicated)."""

    name, type = "clean", "ondol"

    def __init__(self, cfg: DataConfig, seed: int, counts: dict[str, dict], work: str):
        super().__init__()
        self.cfg, self.seed, self.counts, self.work = cfg, seed, counts, work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg = self.cfg
        cleaner = Cleaner(replace(cfg.cleaning, dedup=False), self.seed, cfg.val_fraction)
        quiet = logging.getLogger("ondol.data")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the count stage has reported bad input once already
        read = kept = 0  # counted here, recorded once: DataTrove's per-call statistics cost more than cleaning
        try:
            for index, source in enumerate(cfg.sources):
                count = self.counts[source.name]
                start, end = share(count["read"], rank, world_size)
                if start == end:
                    continue
                priority = MAX_PRIORITY - (index * world_size + rank)  # earlier source, earlier share: kept
                checkpoints = count["checkpoints"]
                first, file, line = checkpoints[bisect.bisect_right([c[0] for c in checkpoints], start) - 1]
                documents = iter_documents(source, bad=BadInputLog(), start=(file, line))
                for number, doc in enumerate(documents, first):
                    if number >= end:
                        break
                    if number < start:
                        continue
                    read += 1
                    cleaned = cleaner.clean(doc.text, source.name)
                    if cleaned is None:
                        continue
                    kept += 1
                    yield TroveDocument(text=cleaned[0], id=f"{source.name}/{number}",
                                        metadata={"source": source.name, "split": cleaned[1], "priority": priority})
        finally:
            quiet.setLevel(level)
        self.stat_update("read", value=read)
        self.stat_update("kept", value=kept)
        path = Path(self.work) / "clean" / f"{rank:05d}.json"
        write_json(path, {"modified": cleaner.modified, "dropped": cleaner.dropped})
        fsync_written([str(path)], Path(self.work))


DOC_FIELDS = ("text", "id", "source", "split")  # of a cleaned document between stages


class _SaveDocuments(PipelineStep):
    """Stage clean, last step: the cleaned documents of this task, in order, as zstd-compressed Arrow record
    batches (written and read a batch at a time: a JSON line per document cost a fifth of the pipeline)."""

    name, type = "save cleaned documents", "ondol"

    def __init__(self, work: str):
        super().__init__()
        self.work = work

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = Path(self.work) / "docs" / f"{rank:05d}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([(name, pa.string()) for name in DOC_FIELDS])
        batch: list[tuple] = []
        with pa.ipc.new_stream(str(path), schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as out:

            def write() -> None:
                out.write_batch(pa.record_batch([pa.array(column, pa.string()) for column in zip(*batch)],
                                                schema=schema))
                batch.clear()

            for doc in data:
                batch.append((doc.text, doc.id, doc.metadata["source"], doc.metadata["split"]))
                if len(batch) == ENCODE_DOCS:
                    write()
                yield doc
            if batch:
                write()
        fsync_written([str(path)], Path(self.work))


class _ReadCleaned(PipelineStep):
    """Stage tokenize, first step: this task's cleaned documents, in the order stage clean wrote them."""

    name, type = "read cleaned documents", "ondol"

    def __init__(self, work: str):
        super().__init__()
        self.work = work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with pa.ipc.open_stream(str(Path(self.work) / "docs" / f"{rank:05d}.arrow")) as batches:
            for batch in batches:
                for text, doc_id, source, split in zip(*(column.to_pylist() for column in batch.columns)):
                    yield TroveDocument(text=text, id=doc_id, metadata={"source": source, "split": split})


class _Tally(PipelineStep):
    """Counts the documents that pass it per source (between the dedup filters: what each one dropped)."""

    type = "ondol"

    def __init__(self, name: str):
        self.name = name  # before PipelineStep.__init__, which names the step's statistics
        super().__init__()
        self.counts: Counter = Counter()

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.counts[doc.metadata["source"]] += 1
            yield doc


class _ScrubPersonalData(PipelineStep):
    """Masks (pii=mask) or drops (pii=drop) the documents' personal data, counting hits per source and kind."""

    name, type = "personal data", "ondol"

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.hits: dict[str, Counter] = {}
        self.dropped: Counter = Counter()

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            text, hits = pii.scrub(doc.text)
            if hits:
                self.hits.setdefault(doc.metadata["source"], Counter()).update(hits)
                self.stat_update("documents_with_personal_data")
                if self.mode == "drop":
                    self.dropped[doc.metadata["source"]] += 1
                    continue
                doc.text = text
            yield doc


class _TokenizeAndWrite(PipelineStep):
    """Stage tokenize, last step: tokens of each document into this task's shards, one stream per
    (split, source), plus the task's counts."""

    name, type = "tokenize", "ondol"

    def __init__(self, cfg: DataConfig, tokenizer, work: str, tallies: list[_Tally],
                 scrubber: _ScrubPersonalData | None):
        super().__init__()
        # Each task loads the tokenizer from its folder with the tokenizer's own loader (pickled by name, so the
        # data package does not import the tokenizer package above it)
        self.load_tokenizer, self.tokenizer_dir = type(tokenizer).load, str(tokenizer.directory)
        self.cfg, self.work = cfg, work
        self.tallies, self.scrubber = tallies, scrubber

    def run(self, data, rank: int = 0, world_size: int = 1):
        tok = self.load_tokenizer(self.tokenizer_dir)
        dtype = token_dtype(tok.vocab_size)
        out = Path(self.work) / "tokens" / f"{rank:05d}"
        shutil.rmtree(out, ignore_errors=True)  # a killed earlier attempt of this task: start it over
        writers = {(split, s.name): ShardWriter(out / split / s.name, dtype, self.cfg.shard_tokens)
                   for split in SPLITS for s in self.cfg.sources}
        kept = {s.name: dict.fromkeys(SPLITS, 0) for s in self.cfg.sources}
        chars = {s.name: dict.fromkeys(SPLITS, 0) for s in self.cfg.sources}
        texts, routes = [], []

        def encode() -> None:
            deliver_documents(writers, routes, *encode_documents(tok, texts, dtype.name, self.cfg.bos))
            texts.clear()
            routes.clear()

        for doc in data:
            source, split = doc.metadata["source"], doc.metadata["split"]
            kept[source][split] += 1
            chars[source][split] += len(doc.text)
            texts.append(doc.text)
            routes.append((split, source))
            if len(texts) >= ENCODE_DOCS:
                encode()
        if texts:
            encode()
        for writer in writers.values():
            writer.flush()
        self.stat_update("documents", value=sum(sum(k.values()) for k in kept.values()))
        stats = {"kept": kept, "chars": chars, "passed": {t.name: t.counts for t in self.tallies},
                 "pii": self.scrubber.hits if self.scrubber else {},
                 "pii_dropped": self.scrubber.dropped if self.scrubber else {}}
        write_json(out / "stats.json", stats)
        fsync_written([str(out)], Path(self.work))


def fsync_written(paths: list[str], root: Path) -> None:
    """fsync each file (or every file of each folder) of `paths`, and every folder from it up to `root`, so
    that the files and their names are on disk before a completion file says they are."""
    folders = set()
    for path in dict.fromkeys(paths):
        if os.path.isdir(path):
            fsync_tree(path)
        elif os.path.exists(path):  # not a temporary file renamed away since
            fsync_file(path)
        folders.update(p for p in Path(path).parents if p.is_relative_to(root))
    for folder in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_dir(folder)


@contextlib.contextmanager
def _recording_writes(written: list[str]):
    """The path of every file opened for writing through a DataTrove DataFolder while inside goes to `written`
    (DataTrove closes its files without fsync)."""
    open_in_folder = DataFolder.open

    def open_and_record(folder, path, mode="rb", *args, **kwargs):
        if set(mode) & set("wax+"):
            written.append(folder.resolve_paths(path))
        return open_in_folder(folder, path, mode, *args, **kwargs)

    DataFolder.open = open_and_record
    try:
        yield
    finally:
        DataFolder.open = open_in_folder


def _log_datatrove_to(path: str) -> None:
    """DataTrove's log lines (loguru, INFO and up) to the file `path` instead of the console."""
    trove_logger.remove()
    trove_logger.add(path, level="INFO")


class _DurableTasks:
    """Mixed into DataTrove's executors: the files a task wrote are fsynced, and then its completion file is
    written by temp + fsync + rename (DataTrove creates it in place after files it never fsyncs), so a task
    marked complete has whole outputs after a crash. With log_file, a task's log lines go there, not to the
    console (DataTrove points a task's logger at sys.stderr, and at it again when the task ends)."""

    log_file: str | None = None

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        self.written: list[str] = []
        with _recording_writes(self.written):
            if self.log_file is None:
                return super()._run_for_rank(rank, local_rank, node_rank)
            with open(self.log_file, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
                try:
                    return super()._run_for_rank(rank, local_rank, node_rank)
                finally:
                    _log_datatrove_to(self.log_file)

    def mark_rank_as_completed(self, rank: int) -> None:
        root = Path(self.logging_dir.resolve_paths("")).parent  # the work folder, where every stage writes
        fsync_written(self.written, root)
        marker = Path(self.logging_dir.resolve_paths(f"completions/{rank:05d}"))
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, b"")
        fsync_written([str(marker)], root)


class _LocalExecutor(_DurableTasks, LocalPipelineExecutor):
    """A stage's tasks on this machine; with progress, a line on the console when the stage is done."""

    stage, progress = "", False

    def run(self):
        if self.depends is not None and not self.depends._launched:
            self.depends.run()  # first, so that this stage's time is its own
        started = time.perf_counter()
        stats = super().run()
        if self.progress:
            _report_stage(self.stage, self.world_size, time.perf_counter() - started,
                          Path(self.logging_dir.resolve_paths("")))
        return stats


class _SlurmExecutor(_DurableTasks, SlurmPipelineExecutor):
    stage = ""


def _report_stage(name: str, tasks: int, seconds: float, stage_dir: Path) -> None:
    """One console line for a finished stage: the time, and the documents its steps counted."""
    steps = _stage_counts(stage_dir.parent, [name])[name]
    counts = []
    for step in steps:
        shown = {k: v["total"] for k, v in step["stats"].items() if k in _SHOWN_COUNTS and isinstance(v, dict)}
        if shown:
            label = step["name"].rsplit(": ", 1)[-1].encode("ascii", "ignore").decode().strip()  # no emoji
            counts.append(f"{label}: " + ", ".join(f"{k} {v:,}" for k, v in shown.items()))
    print(f"data: {time.strftime('%H:%M:%S')} stage {name}: {tasks} task{'s' * (tasks > 1)} done in {seconds:.1f} s"
          + (f" ({'; '.join(counts)})" if counts else ""), file=sys.stderr, flush=True)


_SHOWN_COUNTS = ("read", "kept", "forwarded", "dropped", "documents")


def _count_sources(cfg: DataConfig, work: Path, progress: bool) -> dict:
    """Stage count: documents and bad input per source (remembered, so a re-run does not read again)."""
    path = work / "count.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    counts = {}
    for source in cfg.sources:
        bad = BadInputLog(strict=cfg.strict)
        files = {} if source.format == "hf" else {path: i for i, path in enumerate(resolve_files(source))}
        read, checkpoints = 0, []
        for doc in tqdm(iter_documents(source, bad=bad), desc=f"data: counting {source.name}", unit=" docs",
                        unit_scale=True, disable=not progress, mininterval=0.5, dynamic_ncols=True):
            if read % CHECKPOINT_DOCS == 0:
                checkpoints.append([read, files.get(doc.file, 0), doc.line])
            read += 1
        counts[source.name] = {"read": read, "bad_input": dict(bad.counts), "bad_input_examples": bad.examples,
                               "checkpoints": checkpoints}
    write_json(path, counts)
    return counts


def _stages(cfg: DataConfig, tokenizer, seed: int, work: Path, counts: dict) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of each DataTrove stage, in order."""
    n, w = cfg.tasks, str(work)
    if len(cfg.sources) * n > MAX_PRIORITY - 1:
        raise ConfigError(f"data.tasks ({n}) times the number of sources ({len(cfg.sources)}) must stay below "
                         f"{MAX_PRIORITY}: DataTrove orders duplicates by a 16-bit priority")
    # DataTrove's signature steps consume the documents: they end a stage
    clean: list = [_CleanShare(cfg, seed, counts, w), _SaveDocuments(w)]
    tokenize: list = [_ReadCleaned(w), _Tally("cleaned")]
    stages = []
    if cfg.cleaning.dedup:
        clean.append(_ExactSignatures(f"{work}/exact_signatures", _exact_config(), n, f"{work}/exact_runs",
                                      RUN_SIGNATURES))
        stages.append(("exact", [ExactFindDedups(f"{work}/exact_signatures", f"{work}/exact_duplicates",
                                                 _exact_config())], n))
        tokenize += [ExactDedupFilter(f"{work}/exact_duplicates", _exact_config()), _Tally("after_exact_dedup")]
    if cfg.near_dedup.enabled:
        minhash = _minhash_config(cfg)
        signatures = MinhashDedupSignature(f"{work}/minhash_signatures", minhash, language=KOREAN)
        # DataTrove asks Kiwi for its "sbg" model, which kiwipiepy_model does not ship: Kiwi's default model
        signatures.word_tokenizer = KiwiTokenizer(model_type=None)
        stages.append(("near_signatures", [_ReadCleaned(w), signatures], n))
        stages.append(("near_buckets", [MinhashDedupBuckets(f"{work}/minhash_signatures", f"{work}/minhash_buckets",
                                                            config=minhash)], minhash.num_buckets))
        stages.append(("near_clusters", [MinhashDedupCluster(f"{work}/minhash_buckets", f"{work}/minhash_remove",
                                                             config=minhash)], 1))
        tokenize += [MinhashDedupFilter(f"{work}/minhash_remove"),
                     _Tally("after_near_dedup")]
    scrubber = _ScrubPersonalData(cfg.pii) if cfg.pii != "off" else None
    if scrubber:
        tokenize.append(scrubber)
    tallies = [step for step in tokenize if isinstance(step, _Tally)]
    tokenize.append(_TokenizeAndWrite(cfg, tokenizer, w, tallies, scrubber))
    return [("clean", clean, n), *stages, ("tokenize", tokenize, n)]


def _sbatch_safe(what: str, value: str) -> str:
    if not _SBATCH_SAFE.match(value):
        raise ConfigError(f"{what} '{value}' goes into an sbatch script: use only letters, digits and . _ / : % + , "
                         f"= @ - (no spaces or shell characters)")
    return value


class _ExactSignatures(ExactDedupSignature):
    """DataTrove's exact-dedup signatures of a task, in the files its finder reads, with memory bounded by
    run_size signatures whatever the task's share: DataTrove's own step keeps every signature of the task in
    one Python list (about 150 bytes each). A task of more than run_size documents sorts runs of them, spills
    each to disk and merges them; the merged order (hash, highest priority, document) is that of one sort."""

    def __init__(self, output_folder: str, config: ExactDedupConfig, finder_workers: int, spill: str,
                 run_size: int):
        super().__init__(output_folder, config, finder_workers)
        self.spill, self.run_size = spill, run_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        dtype = get_sig_dtype(self.config.hash_config)
        spill = Path(self.spill) / f"{rank:05d}"
        shutil.rmtree(spill, ignore_errors=True)  # a killed earlier attempt of this task
        run, size, runs = np.empty(self.run_size, dtype), 0, []
        count = 0  # counted here, recorded once: DataTrove's per-document statistics cost more than hashing
        for count, doc in enumerate(data, 1):
            run[size] = self.get_hashes(doc, count - 1)[0]
            size += 1
            if size == self.run_size:
                spill.mkdir(parents=True, exist_ok=True)
                runs.append(spill / f"{len(runs):05d}.npy")
                np.save(runs[-1], _sorted_signatures(run))
                size = 0
        self.stat_update(StatHints.total, value=count)
        if not runs:
            self.save_hashes(rank, run[:size])
            return
        if size:
            runs.append(spill / f"{len(runs):05d}.npy")
            np.save(runs[-1], _sorted_signatures(run[:size]))
        self._merge(rank, runs, dtype)
        shutil.rmtree(spill)

    def _merge(self, rank: int, runs: list[Path], dtype: np.dtype) -> None:
        """The sorted runs merged into the finder's files: file i holds the hashes up to (i + 1) * max / workers,
        the last one the rest (DataTrove's save_hashes)."""
        per_worker = self.config.hash_config.max // self.finder_workers
        files = [self.output_folder.open(f"{i:04d}/{rank:05d}{ExtensionHelperSD.stage_1_signature}", mode="wb")
                 for i in range(self.finder_workers)]
        merged = heapq.merge(*(_run_records(path) for path in runs))
        try:
            while block := list(itertools.islice(merged, MERGE_BLOCK)):
                signatures = np.array(block, dtype)
                signatures["priority"] = -signatures["priority"]  # back from the sort key
                bounds = [(i + 1) * per_worker for i in range(self.finder_workers - 1)]
                cuts = [0, *signatures["hash"].searchsorted(bounds, side="right"), len(signatures)]
                for f, start, end in zip(files, cuts, cuts[1:]):
                    f.write(signatures[start:end].tobytes())
        finally:
            for f in files:
                f.close()


def _sorted_signatures(signatures: np.ndarray) -> np.ndarray:
    """Signatures sorted by (hash, highest priority first, document), the priority left negated (the key)."""
    signatures = signatures.copy()
    signatures["priority"] = -signatures["priority"]
    signatures.sort()
    return signatures


def _run_records(path: Path):
    """The (hash, negated priority, document) records of a sorted run on disk, a block at a time."""
    run = np.load(path, mmap_mode="r")
    for start in range(0, len(run), MERGE_BLOCK):
        yield from run[start:start + MERGE_BLOCK].tolist()


def _executors(cfg: DataConfig, stages: list, work: Path, log_file: Path, progress: bool) -> list:
    """One DataTrove executor per stage, each depending on the one before."""
    executors: list = []
    for name, pipeline, tasks in stages:
        common = {"pipeline": pipeline, "tasks": tasks, "logging_dir": str(work / name),
                  "depends": executors[-1] if executors else None}
        if cfg.executor == "local":
            executors.append(_LocalExecutor(**common, workers=min(tasks, cfg.num_proc)))
            executors[-1].stage, executors[-1].progress, executors[-1].log_file = name, progress, str(log_file)
            continue
        s = cfg.slurm
        if not s.partition:
            raise ConfigError("data.executor=slurm needs data.slurm.partition (sinfo lists the partitions)")
        bin_dir = os.path.dirname(sys.executable)  # launch_pickled_pipeline and merge_stats live beside python
        executors.append(_SlurmExecutor(
            **common, partition=_sbatch_safe("data.slurm.partition", s.partition),
            time=_sbatch_safe("data.slurm.time", s.time), cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb, qos=_sbatch_safe("data.slurm.qos", s.qos) if s.qos else "",
            job_name=_sbatch_safe("data.slurm.job_name", f"{s.job_name}-{name}"),
            slurm_logs_folder=_sbatch_safe("the run directory", str(work / "slurm_logs" / name)),
            env_command=f"export PATH={_sbatch_safe('the Python environment', bin_dir)}:$PATH"))
        executors[-1].stage = name
        _sbatch_safe("the run directory", str(work / name))
    return executors


def _wait_for_slurm(executors: list, progress: bool, poll_s: float = 2.0) -> None:
    """Until every task of the last stage is complete; an error naming the logs when a stage's job fails. With
    progress, a line for each stage when its tasks are done."""
    last = executors[-1]
    jobs = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    waiting, started = list(executors), time.perf_counter()

    def report_finished() -> None:
        while progress and waiting and not waiting[0].get_incomplete_ranks():
            done = waiting.pop(0)
            _report_stage(done.stage, done.world_size, time.perf_counter() - started,
                          Path(done.logging_dir.resolve_paths("")))

    while last.get_incomplete_ranks():
        report_finished()
        queue = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(jobs)], capture_output=True,
                               text=True, check=False).stdout if jobs else ""
        stuck = "DependencyNeverSatisfied" in queue
        if stuck or not queue.strip():
            time.sleep(poll_s)  # the last completion file may land just after the job leaves the queue
            if not last.get_incomplete_ranks():
                break
            failed = next((e for e in executors if e.get_incomplete_ranks()), last)
            raise DataError(f"Slurm stage job {failed.job_name} failed: see {failed.slurm_logs_folder}; "
                               f"re-run the same command to redo only the unfinished tasks")
        time.sleep(poll_s)
    report_finished()


def _pack(cfg: DataConfig, out_dir: Path, work: Path, dtype: np.dtype, tasks: int) -> dict:
    """Append each task's shards, in task order, to the final shard streams; the final writers."""
    writers = {}
    for split in SPLITS:
        for source in cfg.sources:
            writer = ShardWriter(out_dir / split / source.name, dtype, cfg.shard_tokens)
            skip = writer.skip_docs  # documents already in final shards of an interrupted pack
            for rank in range(tasks):
                task_dir = work / "tokens" / f"{rank:05d}"
                for record in ShardWriter(task_dir / split / source.name, dtype, cfg.shard_tokens).records:
                    shard = open_shard(task_dir, record, dtype.name, cfg.bos)
                    lengths = np.diff(shard.starts)
                    drop = min(skip, len(lengths))
                    skip -= drop
                    writer.add(np.asarray(shard.tokens[shard.starts[drop]:]), lengths[drop:])
            writer.flush()
            writers[split, source.name] = writer
    return writers


def _source_stats(cfg: DataConfig, counts: dict, work: Path, tasks: int) -> tuple[list[dict], SimpleNamespace]:
    """The manifest's per-source counts (as single-machine prepare makes them) from the stages' task files."""
    modified = {s.name: Counter() for s in cfg.sources}
    dropped = {s.name: Counter() for s in cfg.sources}
    kept = {s.name: Counter() for s in cfg.sources}
    chars = {s.name: Counter() for s in cfg.sources}
    hits = {s.name: Counter() for s in cfg.sources}
    for rank in range(tasks):
        clean = json.loads((work / "clean" / f"{rank:05d}.json").read_text(encoding="utf-8"))
        tokens = json.loads((work / "tokens" / f"{rank:05d}" / "stats.json").read_text(encoding="utf-8"))
        passed = tokens["passed"]
        for s in cfg.sources:
            name = s.name
            modified[name].update(clean["modified"].get(name, {}))
            dropped[name].update(clean["dropped"].get(name, {}))
            steps = [("duplicate", "after_exact_dedup"), ("near_duplicate", "after_near_dedup")]
            before = passed["cleaned"].get(name, 0)
            for reason, tally in steps:
                if tally in passed:
                    dropped[name][reason] += before - passed[tally].get(name, 0)
                    before = passed[tally].get(name, 0)
            dropped[name]["personal_data"] += tokens["pii_dropped"].get(name, 0)
            kept[name].update(tokens["kept"][name])
            chars[name].update(tokens["chars"][name])
            hits[name].update(tokens["pii"].get(name, {}))
    stats = []
    for s in cfg.sources:
        read = {k: v for k, v in counts[s.name].items() if k != "checkpoints"}
        entry = {"name": s.name, "path": s.path, "weight": s.weight, **read,
                 "kept": {split: kept[s.name][split] for split in SPLITS},
                 "chars": {split: chars[s.name][split] for split in SPLITS}}
        if cfg.pii != "off":
            entry["personal_data"] = dict(hits[s.name])
        stats.append(entry)
    dropped = {name: Counter({k: v for k, v in c.items() if v}) for name, c in dropped.items()}
    return stats, SimpleNamespace(modified=modified, dropped=dropped)


def _stage_counts(work: Path, names: list[str]) -> dict:
    """Each stage's merged DataTrove statistics (documents in and out of every step, time spent)."""
    from datatrove.utils.stats import PipelineStats

    merged = {}
    for name in names:
        files = sorted((work / name / "stats").glob("*.json"))
        total = sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files), start=PipelineStats())
        merged[name] = json.loads(total.to_json())
    return merged


def prepare_on_datatrove(cfg: DataConfig, tokenizer, out_dir: Path, seed: int, digest: str,
                         progress: bool) -> dict:
    """The DataTrove form of preparation.prepare (which has checked the config and written the identity)."""
    if tokenizer.directory is None:
        raise ConfigError("data.executor local/slurm loads the tokenizer in every task: save it to a folder first")
    started = time.perf_counter()
    work = (out_dir / WORK).resolve()
    plan = {"hash": digest, "tasks": cfg.tasks, "checkpoint_docs": CHECKPOINT_DOCS}
    plan_path = work / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        log.warning("%s: unfinished preparation with other data.tasks: starting its stages over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(plan_path, plan)
    counts = _count_sources(cfg, work, progress)
    log_file = out_dir / LOG
    if progress:
        print(f"data: DataTrove's log: {log_file}", file=sys.stderr, flush=True)
    _log_datatrove_to(str(log_file))
    try:
        stages = _stages(cfg, tokenizer, seed, work, counts)
        executors = _executors(cfg, stages, work, log_file, progress)
        executors[-1].run()
        if cfg.executor == "slurm":
            _wait_for_slurm(executors, progress)
        elif executors[-1].get_incomplete_ranks():
            raise DataError(f"DataTrove tasks failed: see {log_file}; re-run to redo only the unfinished ones")
    except OndolError:
        raise
    except Exception as e:  # a task's error: its traceback is in the log
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"a DataTrove task failed ({type(e).__name__}: {first}): see {log_file}; re-run to redo "
                        f"only the unfinished tasks") from e
    finally:
        trove_logger.remove()
        setup_default_logger()
    dtype = token_dtype(tokenizer.vocab_size)
    writers = _pack(cfg, out_dir, work, dtype, cfg.tasks)
    stats, cleaner = _source_stats(cfg, counts, work, cfg.tasks)
    for entry, source in zip(stats, cfg.sources):
        entry["files"] = source_files(source)
    manifest = build_manifest(cfg, tokenizer, seed, digest, dtype, stats, cleaner, writers)
    manifest["stages"] = _stage_counts(work, [name for name, _, _ in stages])
    manifest["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(work)
    return manifest
