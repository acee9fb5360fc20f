"""Bits per byte and per character of held-out text, per source: a measure that compares across tokenizers.

A document is scored as the model trains on it: its own tokens after the run's document start (bos when the
data has one, else the eos that ends the document before it), one context of data.seq_len tokens at a time.
A document longer than that is scored in sliding windows: each window predicts `stride` new tokens with the
tokens before them as context (at least seq_len - stride of them). The eos that ends a document is not scored:
it has no bytes. bits/byte = sum over text tokens of -log2 p(token | context) / UTF-8 bytes of the text.

`token_logprobs` is the scorer underneath, shared with the lm-evaluation-harness adapter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ondol.errors import ConfigError, ModelError


@dataclass
class Scored:
    logprob: float  # sum of natural-log probabilities of the scored tokens
    greedy: bool  # every scored token was the model's argmax
    tokens: int


def windows(length: int, first: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, score_from) windows over a sequence of `length` tokens scoring positions first..length-1:
    the window feeds tokens [start, end - 1) and scores the predictions of positions [score_from, end)."""
    out, pos = [], first
    while pos < length:
        end = min(length, max(pos + stride, context + 1))
        out.append((max(0, end - 1 - context), end, pos))
        pos = end
    return out


@torch.no_grad()
def token_logprobs(model, sequences: list[tuple[list[int], int]], context: int, stride: int | None = None,
                   batch_tokens: int = 8192) -> list[Scored]:
    """For each (ids, first): log p(ids[first:] | what precedes them), at most `context` tokens of it per
    prediction. Windows of similar length are batched together (padded on the right, which a causal model
    never sees)."""
    stride = stride or max(1, context // 2)
    jobs = [(i, *w) for i, (ids, first) in enumerate(sequences) for w in windows(len(ids), max(first, 1), context,
                                                                                   stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
    logprob = [0.0] * len(sequences)
    greedy = [True] * len(sequences)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        k = 0
        while k < len(jobs):
            width = jobs[k][2] - jobs[k][1] - 1
            batch = jobs[k:k + max(1, batch_tokens // width)]
            k += len(batch)
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (i, start, end, score_from) in enumerate(batch):
                ids = torch.tensor(sequences[i][0][start:end])
                inputs[row, :end - start - 1] = ids[:-1]
                scored = slice(score_from - start - 1, end - start - 1)
                labels[row, scored] = ids[1:][scored]
            logits = model(inputs.to(device)).logits.float()
            labels = labels.to(device)
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            hit = (logits.argmax(-1) == labels) | (labels == -100)
            for row, (i, *_) in enumerate(batch):
                logprob[i] -= float(nll[row].double().sum())
                greedy[i] = greedy[i] and bool(hit[row].all())
    finally:
        model.train(was_training)
    return [Scored(lp, g, len(ids) - max(first, 1)) for lp, g, (ids, first) in zip(logprob, greedy, sequences)]


def document_start(tokenizer, bos: bool) -> int:
    """The token a document follows in training: bos when the data has one, else the previous document's eos."""
    return tokenizer.bos_id if bos and tokenizer.bos_id >= 0 else tokenizer.eos_id


def bits_per_byte(model, tokenizer, documents: dict[str, list[str]], context: int, bos: bool,
                  batch_tokens: int = 8192) -> dict:
    """Per source and overall: documents, bytes, characters, tokens, bits per byte and per character."""
    named = ((name, t) for name, texts in documents.items() for t in texts)
    return streamed_bits_per_byte(model, tokenizer, named, context, bos, batch_tokens, names=list(documents))


def streamed_bits_per_byte(model, tokenizer, documents: Iterable[tuple[str, str]], context: int, bos: bool,
                           batch_tokens: int = 8192, chunk_docs: int = 256, names: Iterable[str] = (),
                           progress: Callable[[int], None] | None = None) -> dict:
    """bits_per_byte over (source name, text) pairs scored `chunk_docs` at a time, so memory stays bounded
    however many there are; `progress(documents)` after each chunk. `names`: sources listed even when empty."""
    start = document_start(tokenizer, bos)
    rows = {name: _empty_row() for name in names}
    for chunk in _chunks(((name, t) for name, t in documents if t), chunk_docs):
        texts = [t for _, t in chunk]
        scored = token_logprobs(model, [([start, *ids], 1) for ids in tokenizer.encode_batch(texts)], context,
                                batch_tokens=batch_tokens)
        for (name, text), s in zip(chunk, scored):
            row = rows.setdefault(name, _empty_row())
            row["documents"] += 1
            row["bytes"] += len(text.encode("utf-8"))
            row["chars"] += len(text)
            row["tokens"] += s.tokens
            row["bits"] -= s.logprob / math.log(2)
        if progress is not None:
            progress(len(chunk))
    rows["all"] = {k: sum(r[k] for r in rows.values()) for k in _empty_row()}
    for row in rows.values():
        row["bits_per_byte"] = row["bits"] / row["bytes"] if row["bytes"] else float("nan")
        row["bits_per_char"] = row["bits"] / row["chars"] if row["chars"] else float("nan")
    return rows


def _empty_row() -> dict:
    return {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0, "bits": 0.0}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def held_out_documents(data_dir, tokenizer, max_tokens: int | None = None) -> dict[str, list[str]]:
    """The validation documents of every source as text (decode(encode(x)) == x for cleaned text), each source
    cut after the document that reaches `max_tokens` tokens when given."""
    from ondol.data.shards import split_shards

    out: dict[str, list[str]] = {}
    for name, shards in split_shards(data_dir, "val").items():
        texts, tokens = out.setdefault(name, []), 0
        for shard in _shard_documents(shards):
            texts.append(tokenizer.decode(shard.tolist()))
            tokens += len(shard)
            if max_tokens is not None and tokens >= max_tokens:
                break
    return out


def _shard_documents(shards) -> Iterable:
    for shard in shards:
        for i in range(shard.docs):
            yield shard.document(i)


def load_tokenizer(cfg):
    """The run's tokenizer, refused when the run's prepared data (RUN_DIR/data, when there) was tokenized by
    another: the model learned those ids."""
    from ondol.configs import data_dir, tokenizer_dir
    from ondol.data.shards import MANIFEST, check_tokenizer, read_manifest
    from ondol.tokenizer.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir(cfg))
    if (data_dir(cfg) / MANIFEST).is_file():
        check_tokenizer(data_dir(cfg), read_manifest(data_dir(cfg)), tokenizer)
    return tokenizer


def load_model(run_dir, checkpoint: str | None = None, verify: bool = True):
    """The run's final weights (RUN_DIR/model), or those of checkpoint `step_N` (or its folder), or of a model
    folder (config.json: one written by `ondol average`); unless `verify` is off, a checkpoint whose bytes
    differ from the digests in its meta.json (a model folder: its SHA256SUMS) is refused."""
    from pathlib import Path

    from ondol.model.config import ModelConfig
    from ondol.model.io import load_pretrained
    from ondol.model.transformer import Transformer
    from ondol.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if checkpoint is None:
        return load_pretrained(run_dir / "model", verify=verify)
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / "checkpoints" / _tag(checkpoint)
    if (folder / "config.json").is_file() and not ckpt.is_complete(folder):
        return load_pretrained(folder, verify=verify)
    if not ckpt.is_complete(folder):
        have = ", ".join(p.name for p in ckpt.complete_checkpoints(run_dir / "checkpoints")) or "none"
        raise ConfigError(f"--checkpoint {checkpoint}: no complete checkpoint at {folder} (complete ones in "
                                f"{run_dir / 'checkpoints'}: {have})")
    if problem := ckpt.damage(folder, verify):
        raise ckpt.IncompatibleCheckpoint(f"checkpoint '{checkpoint}': {problem}: the checkpoint is damaged; "
                                          "evaluate another one, or pass --no-verify to read it as it is")
    model = Transformer(ModelConfig(**ckpt.read_meta(folder)["model"]))
    missing, unexpected = model.load_state_dict(ckpt.model_state(folder), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise ModelError(f"{folder}: weights do not match the model in its meta.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval()


def _tag(name: str) -> str:
    from ondol.train.checkpoint import tag_for

    digits = name.removeprefix("step_")
    if not digits.isdigit():
        raise ConfigError(f"--checkpoint {name}: give step_N (e.g. step_250) or a checkpoint folder")
    return tag_for(int(digits))



def _file_documents(data_files: list[str] | tuple[str, ...], max_docs: int | None, max_bytes: int | None
                    ) -> tuple[list[str], Iterator[tuple[str, str]]]:
    """The source names of the files (each named after its file) and their (name, text) pairs, read as they
    are scored: at most max_docs documents of each file, ending with the one that reaches max_bytes bytes."""
    from pathlib import Path

    from ondol.data.config import SourceConfig
    from ondol.data.sources import iter_documents

    sources = []
    for path in data_files:
        name = Path(path).name.split(".")[0]
        sources.append(SourceConfig(name=name if name not in [s.name for s in sources] else path, path=path,
                                    max_docs=max_docs))

    def documents() -> Iterator[tuple[str, str]]:
        for source in sources:
            read = 0
            for doc in iter_documents(source):
                yield source.name, doc.text
                read += len(doc.text.encode("utf-8"))
                if max_bytes is not None and read >= max_bytes:
                    break
    return [s.name for s in sources], documents()


def evaluate_run(run_dir, checkpoint: str | None = None, data_files: list[str] | tuple[str, ...] = (),
                 batch_tokens: int = 8192, max_docs: int | None = None, max_bytes: int | None = None,
                 progress: bool = False, verify: bool = True) -> dict:
    """`ondol eval`: bits per byte of RUN_DIR's model on the run's held-out documents of every source, or on
    the given jsonl/csv/text files (one source each, named after the file), streamed with at most max_docs
    documents and about max_bytes bytes of each. RUN_DIR may be the run's config YAML."""
    from tqdm import tqdm

    from ondol.configs import data_dir, load_run_config
    from ondol.train.phases import final_seq_len

    cfg = load_run_config(run_dir)
    context = final_seq_len(cfg)  # a run in phases may end at another length than data.seq_len
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg.run_dir, checkpoint, verify)
    if data_files:
        names, documents = _file_documents(data_files, max_docs, max_bytes)
    else:
        held_out = held_out_documents(data_dir(cfg), tokenizer)
        names, documents = list(held_out), ((name, t) for name, texts in held_out.items() for t in texts)
    total = max_docs * len(data_files) if data_files and max_docs and max_bytes is None else None
    with tqdm(desc="eval", unit=" docs", total=total, disable=None if progress else True, mininterval=0.5,
              dynamic_ncols=True) as bar:  # None: no bar off a terminal
        rows = streamed_bits_per_byte(model, tokenizer, documents, context, cfg.data.bos, batch_tokens,
                                      names=names, progress=bar.update)
    return {"run_dir": str(run_dir), "checkpoint": checkpoint or "final", "context": context,
            "tokenizer_fingerprint": tokenizer.fingerprint, "sources": rows}


def print_table(result: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['run_dir']} ({result['checkpoint']}, context {result['context']})")
    for col in ("source", "documents", "bytes", "chars", "tokens", "bytes/token", "bits/byte", "bits/char"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, r in result["sources"].items():
        table.add_row(name, f"{r['documents']:,}", f"{r['bytes']:,}", f"{r['chars']:,}", f"{r['tokens']:,}",
                      f"{r['bytes'] / max(r['tokens'], 1):.2f}", f"{r['bits_per_byte']:.4f}",
                      f"{r['bits_per_char']:.4f}")
    Console(width=None if sys.stdout.isatty() else 120).print(table)


class InLoopBitsPerByte:
    """Bits per byte per source on the first `max_tokens` held-out tokens of each source, every evaluation of
    the training loop. Every rank scores the same documents (a ZeRO-3 forward is collective), so all agree."""

    def __init__(self, data_dir, tokenizer, max_tokens: int, context: int, bos: bool) -> None:
        self.documents = held_out_documents(data_dir, tokenizer, max_tokens)
        self.tokenizer, self.context, self.bos = tokenizer, context, bos

    def __call__(self, model) -> dict[str, float]:
        rows = bits_per_byte(model, self.tokenizer, self.documents, self.context, self.bos)
        return {f"bpb/{name}": row["bits_per_byte"] for name, row in rows.items() if row["bytes"]}
