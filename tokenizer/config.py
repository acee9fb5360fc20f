"""Typed configuration of the Korean-first tokenizer."""

from dataclasses import dataclass, field

from ondol.data.config import SourceConfig

KSX1001_SYMBOLS = 563  # len(korean.ksx1001_symbols()), which a test holds equal; configs stay plain data


@dataclass
class TokenizerConfig:
    path: str | None = None  # use this trained tokenizer folder instead of training one
    sources: list[SourceConfig] = field(default_factory=list)  # empty: the data sources
    model_type: str = "bpe"  # bpe | unigram
    vocab_size: int = 8192  # rounded up to a multiple of 128
    normalization: str = "none"  # none (lossless: decode(encode(x)) == x) | nfc (decode gives NFC(x))
    max_sentences: int = 2_000_000  # cap on training sentences (sampled, shuffled)
    max_chars: int = 0  # cap on training characters after weighting (0: all the sources' sampled characters)
    morpheme_aware: bool = False  # Kiwi morpheme boundaries as pre-tokenization
    hangul_coverage: bool = True  # every Hangul syllable and conjoining jamo is its own piece (no 3-byte fallback)
    special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    reserved_special_tokens: int = 8
    num_threads: int = 2
    hangul_syllables: str = (
        "common"  # which syllables hangul_coverage guarantees: common (KS X 1001, 2,350) | all (11,172)
    )
    jamo_split: bool = False  # pieces never join a run of compatibility jamo to its neighbours (다|ㅋㅋ)
    jamo_coverage: bool = True  # compatibility jamo (ㅋ, ㅠ, ...) are always pieces, never byte fallback
    symbol_coverage: bool = False  # KS X 1001's 563 symbols (①, 「」, ※, │, ㎏, ...) are always pieces
    character_coverage: float = (
        0.9995  # share of training characters kept as pieces; the rest fall back to bytes
    )
    max_sentence_chars: int = (
        2000  # documents are cut at line ends into training sentences of at most this size
    )
    max_piece_chars: int = 16  # longest piece, in characters
    split_digits: bool = True  # every digit its own piece (numbers read digit by digit)
    split_by_script: bool = False  # True: no piece mixes scripts (no '다.' or '요!'); measured worse
    split_by_whitespace: bool = False  # True: no piece crosses a space (no '▁수▁있다'); measured worse
    # Share of the vocabulary learned by a second BPE phase whose pieces may cross spaces (SuperBPE), after a
    # first phase of pieces within words (whatever split_by_whitespace says); 0: one phase. BPE only.
    superword_share: float = 0.0
    # documents kept out of training (by text hash) for `ondol tokenizer eval`; 1% costs training almost nothing
    # and leaves every source documents to measure on
    holdout_fraction: float = 0.01
    unk_token: str = "<|unk|>"
    bos_token: str = "<|bos|>"
    eos_token: str = "<|eos|>"
    pad_token: str = "<|pad|>"

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"tokenizer.model_type must be bpe or unigram, not {self.model_type!r}")
        if self.normalization not in ("nfc", "none"):
            raise ValueError(f"tokenizer.normalization must be nfc or none, not {self.normalization!r}")
        if self.hangul_syllables not in ("common", "all"):
            raise ValueError(
                f"tokenizer.hangul_syllables must be common or all, not {self.hangul_syllables!r}"
            )
        if not 0.98 <= self.character_coverage <= 1.0:
            raise ValueError("tokenizer.character_coverage must lie in [0.98, 1.0]")
        if self.max_chars < 0:
            raise ValueError("tokenizer.max_chars must be >= 0 (0: no cap)")
        if self.max_sentences < 1 or self.max_sentence_chars < 16 or self.max_piece_chars < 1:
            raise ValueError(
                "tokenizer.max_sentences, max_sentence_chars (>= 16) and max_piece_chars must be positive"
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("tokenizer.holdout_fraction must lie in [0, 1)")
        if not 0.0 <= self.superword_share <= 0.5:
            raise ValueError("tokenizer.superword_share must lie in [0, 0.5] (0: no superword phase)")
        if self.superword_share and (self.model_type != "bpe" or self.split_by_script):
            raise ValueError("tokenizer.superword_share needs model_type: bpe and split_by_script: false")
        if self.reserved_special_tokens < 0:
            raise ValueError("tokenizer.reserved_special_tokens must be >= 0")
        names = self.all_special_tokens()
        if len(set(names)) != len(names):
            raise ValueError(f"tokenizer.special_tokens repeat a name: {names}")
        coverage = [key for key, on in (("hangul_coverage", self.hangul_coverage),
                                        ("symbol_coverage", self.symbol_coverage)) if on]
        floor = (256 + len(names) + 512 + (self.required_hangul() if self.hangul_coverage else 0)
                 + (KSX1001_SYMBOLS if self.symbol_coverage else 0))
        if self.subword_vocab_size() < floor:
            raise ValueError(
                f"tokenizer.vocab_size {self.vocab_size}{' less the superword share' if self.superword_share else ''}"
                f" is too small: bytes, special tokens{' and the guaranteed characters' if coverage else ''}"
                f" need at least {floor}"
                + (f" (or set {' / '.join(f'tokenizer.{key}=false' for key in coverage)})" if coverage else "")
            )

    def rounded_vocab_size(self) -> int:
        """The vocabulary size actually trained: vocab_size rounded up to a multiple of 128."""
        return -(-self.vocab_size // 128) * 128

    def superword_pieces(self) -> int:
        """Pieces the superword phase adds after the subword phase."""
        return int(self.superword_share * self.rounded_vocab_size())

    def subword_vocab_size(self) -> int:
        """The first (subword) phase's vocabulary: all of it without a superword phase."""
        return self.rounded_vocab_size() - self.superword_pieces()

    def all_special_tokens(self) -> list[str]:
        """unk, bos, eos, pad, then the declared tokens, then the reserved slots, in id order."""
        reserved = [f"<|reserved_{i}|>" for i in range(self.reserved_special_tokens)]
        return [
            self.unk_token,
            self.bos_token,
            self.eos_token,
            self.pad_token,
            *self.special_tokens,
            *reserved,
        ]

    def required_hangul(self) -> int:
        """Pieces hangul_coverage guarantees: the syllables plus the 67 modern conjoining jamo."""
        return (2350 if self.hangul_syllables == "common" else 11172) + 67
