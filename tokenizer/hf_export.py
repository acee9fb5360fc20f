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
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ondol.data.chat import chat_template, missing_chat_tokens
from ondol.files import write_atomic
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


def tokenizer_json(tok: HFTokenizer) -> str:
    """The text of tokenizer.json, as tokenizers' save() writes it. Written by Python rather than by save(),
    whose Rust writer reports a full disk as a plain Exception: Python's OSError (ENOSPC) is what the space checks
    turn into one line naming the folder."""
    return tok.to_str(pretty=True)


def write_hf_files(model_proto: bytes, meta: dict, out_dir: Path) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets transformers' AutoTokenizer load the folder: the
    tokenizer alone, giving Ondol's `encode` ids (no bos/eos added, no model context known yet)."""
    tok = build_hf_tokenizer(model_proto, meta["normalization"], meta["jamo_split"])
    (out_dir / "tokenizer.json").write_text(tokenizer_json(tok), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(meta, 1_000_000_000), indent=2), encoding="utf-8"
    )


def _tokenizer_config(meta: dict, model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **{k: meta[k] for k in SPECIAL_KEYS},
    }


SPECIAL_KEYS = ("unk_token", "bos_token", "eos_token", "pad_token")


def write_model_tokenizer(model_proto: bytes, meta: dict, out_dir: Path, add_bos: bool,
                          model_max_length: int) -> str | None:
    """The tokenizer files of an exported model. `tokenizer(text)` gives the ids the model was trained on: bos
    first (a TemplateProcessing post-processor) exactly when training documents started with it (data.bos),
    never eos (a prompt continues, it does not end). model_max_length is the model's context; bos, eos, pad and
    unk are named. The chat template is Ondol's (tokenizer/chat.py) when the tokenizer has its role tokens
    (tokenizer.special_tokens); otherwise there is none and the returned note says why."""
    tok = build_hf_tokenizer(model_proto, meta["normalization"], meta["jamo_split"])
    bos = meta["bos_token"]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["special_tokens"][bos])]
        )
    write_atomic(out_dir / "tokenizer.json", tokenizer_json(tok))
    config = {**_tokenizer_config(meta, model_max_length), "add_bos_token": add_bos, "add_eos_token": False}
    missing = missing_chat_tokens(meta["special_tokens"])
    note = None
    if missing:
        note = (f"no chat template: the tokenizer lacks the role token(s) {', '.join(missing)} "
                "(tokenizer.special_tokens) that Ondol's template is written with")
    else:
        config["chat_template"] = chat_template(add_bos)
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "special_tokens_map.json",
                 json.dumps({k: meta[k] for k in SPECIAL_KEYS}, indent=2, ensure_ascii=False) + "\n")
    return note
