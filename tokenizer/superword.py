"""The superword phase (SuperBPE): BPE merges that may cross whitespace, learned after a subword vocabulary.

SuperBPE (Liu et al., 2025, arXiv:2503.13423) learns a vocabulary in two phases: ordinary BPE whose pieces
stay inside words up to a transition point, then more merges with that restriction lifted, so frequent
multi-word sequences (`▁수▁있다`, `▁of▁the`) become single pieces. SentencePiece cannot continue training
from a learned vocabulary, so the second phase runs Hugging Face tokenizers' BPE trainer over the first
phase's token sequences, each subword id written as one character: every merge it learns joins two runs
of whole subword tokens. The merged texts are appended to the SentencePiece model with scores below every
first-phase piece. SentencePiece's BPE encoder always applies the best-scored merge available, so it
finishes the subword segmentation before any superword merge, then merges in the order learned: the
two-phase encoding with the unchanged encoder, the same ids in tokenizer.json, and a decode that is
still the text itself.

A superword never joins across a byte-fallback or control token, nor across a digit when split_digits
keeps numbers digit by digit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, trainers

NORMAL = sp_pb.ModelProto.SentencePiece.NORMAL
FIRST_CHAR = 0x10000  # subword id i is written as chr(FIRST_CHAR + i): past the BMP, so never a surrogate
ENCODE_BATCH = 10_000  # sentences encoded at a time, so the id sequences never all sit in memory


def learn_superwords(
    subword_model: bytes, sentences: list[str], count: int, max_chars: int, split_digits: bool, num_threads: int
) -> list[str]:
    """Up to `count` new pieces learned by BPE over the subword model's tokens of `sentences`, in the order learned,
    each at most max_chars characters and none already in the vocabulary (fewer when the sample runs out of pairs
    seen twice)."""
    proto = sp_pb.ModelProto()
    proto.ParseFromString(subword_model)
    texts = [p.piece for p in proto.pieces]
    joinable = [p.type == NORMAL and not (split_digits and any(c.isdigit() for c in p.piece)) for p in proto.pieces]
    sp = SentencePieceProcessor(model_proto=subword_model)

    def runs() -> Iterator[str]:
        """Each maximal run of joinable tokens, one character per token (a run of one has nothing to merge)."""
        for start in range(0, len(sentences), ENCODE_BATCH):
            for ids in sp.encode(sentences[start : start + ENCODE_BATCH], num_threads=num_threads):
                run: list[str] = []
                for i in ids + [0]:  # id 0 (unk) is never joinable: it ends the last run
                    if joinable[i]:
                        run.append(chr(FIRST_CHAR + i))
                        continue
                    if len(run) > 1:
                        yield "".join(run)
                    run = []

    # Some merges give a text the vocabulary has or one longer than max_chars; ask for a quarter more. The
    # trainer's vocabulary counts its alphabet (at most the subword vocabulary) before the merges.
    trainer = trainers.BpeTrainer(
        vocab_size=len(texts) + count + count // 4 + 64,
        min_frequency=2,
        show_progress=False,
        max_token_length=max_chars,  # in tokens, each at least one character: a first cut at max_chars
    )
    bpe = HFTokenizer(models.BPE())
    bpe.train_from_iterator(runs(), trainer)
    known, learned = set(texts), []
    for merge in json.loads(bpe.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        text = "".join(texts[ord(c) - FIRST_CHAR] for c in left + right)
        if len(text) <= max_chars and text not in known:
            known.add(text)
            learned.append(text)
            if len(learned) == count:
                break
    return learned


def append_pieces(model_proto: bytes, texts: list[str]) -> bytes:
    """The model with `texts` as new pieces after every existing one, scored below all of them in order."""
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model_proto)
    lowest = min(p.score for p in proto.pieces if p.type == NORMAL)
    for k, text in enumerate(texts):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, lowest - 1 - k, NORMAL
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.split_by_whitespace = False  # what the pieces now do (SentencePiece's encoder ignores it)
    return proto.SerializeToString()
