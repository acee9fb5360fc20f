"""Train Ondol's tokenizer: sample sentences from the sources, run SentencePiece losslessly, write it."""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ondol.data.config import SourceConfig
from ondol.data.sources import source_identity
from ondol.errors import TokenizerError, ignore_interrupts
from ondol.files import exclusive_lock, fsync_dir, fsync_tree, move_aside, space_checked
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.hf_export import write_hf_files
from ondol.tokenizer.korean import (
    compatibility_jamo,
    conjoining_jamo,
    hangul_syllables,
    ksx1001_symbols,
    pretokenize,
)
from ondol.tokenizer.sample import mix, nfc, sample_source
from ondol.tokenizer.superword import append_pieces, learn_superwords
from ondol.tokenizer.tokenizer import META_FILE, MODEL_FILE, Tokenizer, fingerprint

CUT = "\u241f"  # marks pre-tokenization cuts in training sentences; SentencePiece cuts there and drops it
console = Console(stderr=True, soft_wrap=True)  # off a terminal, lines are never wrapped at 80 columns


def train_tokenizer(
    cfg: TokenizerConfig, sources: list[SourceConfig], out_dir: str | Path, seed: int, overwrite: bool = False
) -> Tokenizer:
    """Train on `sources` (cfg.sources wins when set) into out_dir; an identical finished run is reused. A
    tokenizer trained with another recipe is refused, or with `overwrite` moved aside and replaced."""
    out_dir = Path(out_dir)
    sources = list(cfg.sources or sources)
    if not sources:
        raise ValueError("tokenizer: no sources to train on (set tokenizer.sources or data.sources)")
    # what the tokenizer depends on, by content: not where it is stored nor how the source paths are spelled
    recipe = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("path", "sources")},
        "sources": [source_identity(s) for s in sources],
        "seed": seed,
    }
    # beside the folder, not in it: the folder appears only when the tokenizer is complete
    with exclusive_lock(out_dir.with_name(f"{out_dir.name}.lock"), TokenizerError):
        return _train_into(cfg, sources, out_dir, seed, recipe, overwrite)


def _train_into(cfg: TokenizerConfig, sources: list[SourceConfig], out_dir: Path, seed: int, recipe: dict,
                overwrite: bool) -> Tokenizer:
    if (out_dir / META_FILE).is_file():
        tok = Tokenizer.load(out_dir)
        if tok.meta.get("recipe") == recipe:
            console.print(f"tokenizer: reusing {out_dir} (same config, sources and seed)")
            return tok
        if not overwrite:
            raise TokenizerError(
                f"{out_dir} holds a tokenizer trained with another config, sources or seed: add --overwrite to "
                f"move it aside and train a new one, or choose another run_dir / tokenizer.path"
            )
        console.print(f"tokenizer: moved the tokenizer trained with another config to {move_aside(out_dir)}")

    if cfg.rounded_vocab_size() != cfg.vocab_size:
        console.print(f"tokenizer: vocab_size {cfg.vocab_size} rounded up to {cfg.rounded_vocab_size()} (a multiple "
                      f"of 128, for aligned embedding matmuls); set tokenizer.vocab_size={cfg.rounded_vocab_size()} "
                      "to say so", highlight=False, soft_wrap=True)
    started = time.perf_counter()
    sentences, stats = training_sentences(cfg, sources, seed)
    console.print(
        f"tokenizer: training SentencePiece {cfg.model_type} on {len(sentences):,} sentences "
        f"({sum(map(len, sentences)):,} chars), vocab {cfg.rounded_vocab_size():,}"
        + (f" ({cfg.subword_vocab_size():,} subword pieces, then {cfg.superword_pieces():,} superword pieces)"
           if cfg.superword_pieces() else "") + " ..."
    )
    model_proto = _train_sentencepiece(cfg, sentences, seed)
    seconds = time.perf_counter() - started

    special = cfg.all_special_tokens()
    meta = {
        "format": "ondol-tokenizer/1",
        "normalization": cfg.normalization,
        "morpheme_aware": cfg.morpheme_aware,
        "jamo_split": cfg.jamo_split,
        "vocab_size": cfg.rounded_vocab_size(),
        "special_tokens": {piece: i for i, piece in enumerate(special)},
        "unk_token": cfg.unk_token,
        "bos_token": cfg.bos_token,
        "eos_token": cfg.eos_token,
        "pad_token": cfg.pad_token,
        "config": dataclasses.asdict(cfg),
        "recipe": recipe,
        "sample": stats,
        "train_seconds": round(seconds, 2),
        "fingerprint": fingerprint(model_proto, cfg.normalization, cfg.morpheme_aware, cfg.jamo_split),
    }
    _write_folder(out_dir, model_proto, meta)
    console.print(f"tokenizer: wrote {out_dir} in {seconds:.1f} s (fingerprint {meta['fingerprint']})")
    return Tokenizer.load(out_dir)


def training_sentences(
    cfg: TokenizerConfig, sources: list[SourceConfig], seed: int
) -> tuple[list[str], dict]:
    """The mixed, bounded, shuffled sentence sample, and per-source counts for meta.json."""
    prepare = nfc if cfg.normalization == "nfc" else (lambda t: t)
    samples = []
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for source in sources:
            task = progress.add_task(f"reading {source.name}", total=source.max_docs)
            samples.append(
                sample_source(
                    source,
                    cfg.max_sentences,
                    cfg.max_sentence_chars,
                    seed,
                    prepare,
                    cfg.holdout_fraction,
                    lambda n, t=task: progress.advance(t, n),
                )
            )
    sentences = mix(samples, cfg.max_sentences, seed, cfg.max_chars)
    if cfg.morpheme_aware or cfg.jamo_split:
        with console.status(
            f"tokenizer: pre-tokenizing {len(sentences):,} sentences"
            f"{' with Kiwi (slow: about 0.1 MB/s a core)' if cfg.morpheme_aware else ''}"
        ):
            sentences = [
                CUT.join(segs) for segs in pretokenize(sentences, cfg.morpheme_aware, cfg.jamo_split)
            ]
    stats = {
        s.name: {
            "documents": s.documents,
            "held_out": s.held_out,
            "sentences_seen": s.seen,
            "chars_seen": s.seen_chars,
            "skipped": dict(s.bad.counts),
            "weight": s.weight,
        }
        for s in samples
    }
    for s in samples:
        if s.bad.counts:
            console.print(f"tokenizer: source '{s.name}' skipped {s.bad.summary()}")
    return sentences, stats


def drop_rare_chars(sentences: list[str], coverage: float, required: str) -> tuple[list[str], int]:
    """Replace the characters beyond `coverage` of the sample (most frequent first) by cuts.

    SentencePiece counts required_chars as if they were the most frequent characters, so with 2,350
    guaranteed syllables its own character_coverage drops real characters (English punctuation fell back
    to bytes 10x more often). Choosing the characters here and training at full coverage keeps both.
    Returns the sentences and how many distinct characters were dropped (they fall back to bytes).
    """
    counts = collections.Counter()
    for sentence in sentences:
        counts.update(sentence)
    counts.pop(CUT, None)
    budget, kept = coverage * sum(counts.values()), set(required)
    for ch, n in counts.most_common():
        if budget <= 0:
            break
        kept.add(ch)
        budget -= n
    rare = {ord(ch): CUT for ch in counts if ch not in kept}
    return ([s.translate(rare) for s in sentences] if rare else sentences), len(rare)


def _train_sentencepiece(cfg: TokenizerConfig, sentences: list[str], seed: int) -> bytes:
    # Text is kept as it comes (no NFC), so decomposed Hangul needs its jamo as pieces, not 3 bytes each.
    hangul = hangul_syllables(cfg.hangul_syllables) + conjoining_jamo()
    required = (
        (hangul if cfg.hangul_coverage else "")
        + (compatibility_jamo() if cfg.jamo_coverage else "")
        + (ksx1001_symbols() if cfg.symbol_coverage else "")
    )
    sentences, dropped = drop_rare_chars(sentences, cfg.character_coverage, required)
    console.print(f"tokenizer: {dropped:,} rare characters left to byte fallback")
    special = cfg.all_special_tokens()
    superwords = cfg.superword_pieces()
    options = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.subword_vocab_size(),
        # lossless: SentencePiece changes nothing; Ondol applies the declared normalization itself
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": cfg.split_digits,
        "byte_fallback": True,
        "split_by_unicode_script": cfg.split_by_script,
        "split_by_whitespace": cfg.split_by_whitespace or superwords > 0,
        "character_coverage": 1.0,  # drop_rare_chars applied cfg.character_coverage
        "required_chars": required,
        "max_sentencepiece_length": cfg.max_piece_chars,
        "max_sentence_length": 4 * cfg.max_sentence_chars + 16,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,  # the sample is already bounded and shuffled
        "pretokenization_delimiter": CUT,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "unk_piece": special[0],
        "bos_piece": special[1],
        "eos_piece": special[2],
        "pad_piece": special[3],
        "control_symbols": special[4:],
        "hard_vocab_limit": True,
        "num_threads": cfg.num_threads,
        "minloglevel": 2,
    }
    model = run_trainer(sentences, options, seed)
    if superwords:
        started = time.perf_counter()
        with console.status(f"tokenizer: learning {superwords:,} superword pieces over the subword tokens"):
            learned = json.loads(run_in_child(
                lambda: json.dumps(learn_superwords(model, sentences, superwords, cfg.max_piece_chars,
                                                    cfg.split_digits, cfg.num_threads)).encode(),
                "the superword phase (Hugging Face tokenizers' BPE trainer) failed"))
        if len(learned) < superwords:
            raise TokenizerError(
                f"tokenizer: the superword phase found {len(learned):,} of the {superwords:,} pieces asked for "
                "(pairs seen at least twice); lower tokenizer.superword_share or train on more text"
            )
        model = append_pieces(model, learned)
        console.print(f"tokenizer: {superwords:,} superword pieces learned in {time.perf_counter() - started:.1f} s")
    return model


class TrainerAbort(TokenizerError):
    """A trainer died in its child process (SentencePiece's failed CHECK aborts it); the message is one line."""


def run_trainer(sentences: list[str], options: dict, seed: int) -> bytes:
    """SentencePiece's trainer in a forked child (run_in_child): the serialized model."""
    too_old = tuple(int(x) for x in spm.__version__.split(".")[:3]) < (0, 2, 3)

    def train() -> bytes:
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
        return model.getvalue()

    return run_in_child(train, f"SentencePiece {spm.__version__} aborted training",
                        "; install sentencepiece >= 0.2.3" if too_old else "")


def run_in_child(work: Callable[[], bytes], failure: str, hint: str = "") -> bytes:
    """work() in a forked child, which inherits the training sample (fork, no copy) and sends back the bytes.

    A C++ abort ends the child, not this process, and becomes a TrainerAbort naming `failure` and the cause (the
    last line of the child's stderr, which goes to a file: SentencePiece's failed CHECK); Ctrl-C stops the child
    at once, where a trainer running in this process would finish before Python sees the signal."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryFile() as log:
        child = ctx.Process(target=_child, args=(work, send, log.fileno()))
        child.start()
        send.close()
        try:
            result = receive.recv_bytes()
        except EOFError:
            result = None
        except BaseException:  # Ctrl-C: the child ignores it, so stop it here
            child.terminate()
            child.join()
            raise
        child.join()
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").strip().splitlines()
    if child.exitcode != 0 or result is None:
        checks = [line for line in lines if "Check failed" in line]  # glog's line before its stack trace
        cause = (checks or lines or [f"exit code {child.exitcode}"])[-1].strip()
        raise TrainerAbort(f"tokenizer: {failure} ({cause}){hint}")
    return result


def _child(work: Callable[[], bytes], send, stderr_fd: int) -> None:
    faulthandler.disable()  # an abort's last stderr line stays the trainer's, not a Python stack dump
    ignore_interrupts()
    os.dup2(stderr_fd, 2)
    send.send_bytes(work())


def _write_folder(out_dir: Path, model_proto: bytes, meta: dict) -> None:
    """Write into a scratch folder, then move the files in, meta.json last: it marks a finished tokenizer."""
    scratch = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    need = 4 * len(model_proto)  # the model, tokenizer.json (about 3x the model) and meta.json
    try:
        with space_checked(scratch.parent, TokenizerError, "the tokenizer", need):
            (scratch / MODEL_FILE).write_bytes(model_proto)
            write_hf_files(model_proto, meta, scratch)
            (scratch / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
            fsync_tree(scratch)
    except BaseException:  # a full disk, a signal: no half-written folder is left
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(scratch.iterdir(), key=lambda p: p.name == META_FILE):
        os.replace(f, out_dir / f.name)
    fsync_dir(out_dir)
    scratch.rmdir()
