"""Typed configuration of text sources and of data preparation."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SourceConfig:
    """One source of documents: files (a path, glob or folder) or a Hugging Face dataset."""

    name: str = "???"
    path: str = "???"  # file, glob, folder, or a Hugging Face dataset name/path when format == "hf"
    format: str = "auto"  # auto | jsonl | text | parquet | hf (auto: by file suffix)
    text_field: str = "text"
    weight: float = 1.0  # mixture weight (tokenizer sampling and training data share)
    max_docs: Optional[int] = None  # read at most this many documents (None: all)
    hf_split: str = "train"
    hf_config: Optional[str] = None


@dataclass
class CleaningConfig:
    """Cleaning steps; each is counted in the manifest."""

    normalize: str = "nfc"  # nfc | none (must equal the tokenizer's normalization)
    remove_control: bool = True
    min_chars: int = 1
    max_chars: Optional[int] = None
    min_hangul_ratio: float = 0.0  # for sources listed in hangul_ratio_sources (empty: all)
    hangul_ratio_sources: list[str] = field(default_factory=list)
    dedup: bool = True


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    seq_len: int = 256
    val_fraction: float = 0.01  # share of documents (by content hash) held out for validation
    shard_tokens: int = 16_777_216  # tokens per shard file
    num_proc: int = 2
    strict: bool = False  # any bad input line becomes an error instead of a counted skip
    document_masking: bool = True  # loader returns per-token document ids for masking
