"""Export a trained SentencePiece model as a Hugging Face `tokenizer.json` giving the same ids.

SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the best-scored piece;
HF BPE merges by rank over a merge list. Listing every split (a, b) of every piece, ranked by the piece's
id (SentencePiece orders BPE pieces by score), makes the two agree. SentencePiece's space mark U+2581 is
written as a plain space in the exported pieces, so no normalizer rewrites the input: a literal U+2581
is not a piece there and falls back to its three byte tokens, as Ondol's encoder sends it, and
decode(encode(x)) == x for every string (with `normalization: nfc`, NFC(x)). There is no dummy prefix,
and the only pre-tokenizer is the optional cut around compatibility-jamo runs (jamo_split).
Limit, documented in tokenizer/README.md: morpheme-aware tokenizers need Kiwi's cuts applied before this
file.
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ondol.tokenizer.korean import JAMO_RUN

NORMAL, UNKNOWN, CONTROL, BYTE = (
    sp_pb.ModelProto.SentencePiece.NORMAL,
    sp_pb.ModelProto.SentencePiece.UNKNOWN,
    sp_pb.ModelProto.SentencePiece.CONTROL,
    sp_pb.ModelProto.SentencePiece.BYTE,
)


def build_hf_tokenizer(model_proto: bytes, normalization: str, jamo_split: bool) -> HFTokenizer:
    proto = sp_pb.ModelProto()
    proto.ParseFromString(model_proto)
    pieces = [(p.piece.replace("\u2581", " "), p.score, p.type) for p in proto.pieces]
    unk_id = next(i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN)
    if proto.trainer_spec.model_type == sp_pb.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_merges(pieces, vocab),
            unk_token=pieces[unk_id][0],
            byte_fallback=True,
            fuse_unk=False,
        )
    else:
        model = models.Unigram(
            [(piece, score) for piece, score, _ in pieces], unk_id=unk_id, byte_fallback=True
        )
    tok = HFTokenizer(model)
    if normalization == "nfc":
        tok.normalizer = normalizers.NFC()
    if jamo_split:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(JAMO_RUN.pattern), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False)
            for piece, _, t in pieces
            if t in (CONTROL, UNKNOWN)
        ]
    )
    return tok


def _merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked = []
    for i, (piece, _, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                ranked.append((i, vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def write_hf_files(model_proto: bytes, meta: dict, out_dir: Path) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets transformers' AutoTokenizer load the folder."""
    build_hf_tokenizer(model_proto, meta["normalization"], meta["jamo_split"]).save(
        str(out_dir / "tokenizer.json")
    )
    special = {k: meta[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
