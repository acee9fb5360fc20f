"""Ondol's tokenizer: a SentencePiece model plus the normalization and pre-tokenization it was trained with.

Everything SentencePiece itself would change is switched off at training time (identity normalization,
whitespace kept, no dummy prefix), so `decode(encode(x)) == normalize(x)` for every string, and with the
default `normalization: none` that is x itself: nothing is lost, compatibility ideographs (U+F900..U+FAFF,
which NFC maps to other characters) included. The one character SentencePiece cannot pass through is its
own whitespace mark U+2581, which it would decode as a space; encode emits it as its three UTF-8 byte
tokens instead.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import sentencepiece as spm

from ondol.errors import TokenizerError
from ondol.files import read_json
from ondol.tokenizer.korean import pretokenize

META_SPACE = "\u2581"
MODEL_FILE, META_FILE, HF_FILE = "tokenizer.model", "meta.json", "tokenizer.json"


def fingerprint(model_proto: bytes, normalization: str, morpheme_aware: bool, jamo_split: bool) -> str:
    """A short hash of everything that decides the ids of a text."""
    h = hashlib.sha256(model_proto)
    h.update(f"|{normalization}|{int(morpheme_aware)}|{int(jamo_split)}".encode())
    return h.hexdigest()[:16]


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No trained tokenizer where the run reads it."""


class Tokenizer:
    def __init__(self, model_proto: bytes, meta: dict):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.meta = meta
        self.normalization: str = meta["normalization"]
        self.morpheme_aware: bool = meta["morpheme_aware"]
        self.jamo_split: bool = meta["jamo_split"]
        self.num_threads: int = meta.get("config", {}).get("num_threads", 2)
        self._nfc = self.normalization == "nfc"
        self._pretokenized = self.morpheme_aware or self.jamo_split
        self._meta_space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode()]
        self._fingerprint = fingerprint(model_proto, self.normalization, self.morpheme_aware, self.jamo_split)
        self.directory: Path | None = None  # the folder it was loaded from

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        model, meta_path = directory / MODEL_FILE, directory / META_FILE
        for p in (model, meta_path):
            if not p.is_file():
                raise TokenizerNotFound(
                    f"{p} not found: train one with `ondol tokenizer train CONFIG` "
                    f"or point tokenizer.path at a trained tokenizer folder"
                )
        retrain = "retrain the tokenizer (`ondol tokenizer train CONFIG`) or copy its folder again"
        meta = read_json(meta_path, TokenizerError, retrain)
        try:
            tok = cls(model.read_bytes(), meta)
        except RuntimeError:  # SentencePiece could not parse the model
            raise TokenizerError(f"{model}: damaged, not a SentencePiece model; {retrain}") from None
        except KeyError as e:
            raise TokenizerError(f"{meta_path}: damaged, no {e} key; {retrain}") from None
        tok.directory = directory
        if meta.get("fingerprint") != tok.fingerprint:
            raise TokenizerError(
                f"{model} does not match the fingerprint in {meta_path}: the folder was changed "
                f"after training; retrain it"
            )
        return tok

    # -- text <-> ids -------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalization == "nfc" else text

    def encode(self, text: str) -> list[int]:
        """Token ids of normalize(text), without bos/eos."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._pretokenized or META_SPACE in text:
            return self._encode_segments(pretokenize([text], self.morpheme_aware, self.jamo_split)[0])
        return self._sp.encode(text)  # one text: SentencePiece's single-text path, no thread pool

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        if not (self._pretokenized or any(META_SPACE in t for t in texts)):
            return self._sp.encode(list(texts), num_threads=self.num_threads)
        return [self._encode_segments(s) for s in pretokenize(texts, self.morpheme_aware, self.jamo_split)]

    def _encode_segments(self, segments: list[str]) -> list[int]:
        """Encode each segment on its own (pieces never cross a cut) and U+2581 as its bytes."""
        parts = []
        for seg in segments:
            for i, chunk in enumerate(seg.split(META_SPACE)):
                if i:
                    parts.append(None)
                if chunk:
                    parts.append(chunk)
        encoded = iter(self._sp.encode([p for p in parts if p is not None], num_threads=self.num_threads))
        ids: list[int] = []
        for p in parts:
            ids.extend(self._meta_space_ids if p is None else next(encoded))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    # -- vocabulary ---------------------------------------------------------------------------------------
    def token_to_id(self, piece: str) -> int:
        """Id of a piece or special token; KeyError when the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"'{piece}' is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def is_byte(self, i: int) -> bool:
        return self._sp.is_byte(i)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.meta["special_tokens"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def sentencepiece(self) -> spm.SentencePieceProcessor:
        return self._sp

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, normalization={self.normalization!r}, "
            f"morpheme_aware={self.morpheme_aware}, jamo_split={self.jamo_split}, "
            f"fingerprint={self.fingerprint!r})"
        )
