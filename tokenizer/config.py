"""Typed configuration of the Korean-first tokenizer."""

from dataclasses import dataclass, field
from typing import Optional

from data.config import SourceConfig


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # use this trained tokenizer folder instead of training one
    sources: list[SourceConfig] = field(default_factory=list)  # empty: the data sources
    model_type: str = "bpe"  # bpe | unigram
    vocab_size: int = 8192  # rounded up to a multiple of 128
    normalization: str = "nfc"  # nfc | none
    max_sentences: int = 2_000_000  # cap on training sentences (sampled, shuffled)
    morpheme_aware: bool = False  # Kiwi morpheme boundaries as pre-tokenization
    hangul_coverage: bool = True  # every Hangul syllable is its own piece (no 3-byte fallback)
    special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    reserved_special_tokens: int = 8
    num_threads: int = 2
