"""Korean character sets and Kiwi morpheme boundaries used by the trainer and the encoder."""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata

HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3  # the 11,172 precomposed syllables
COMPAT_JAMO_FIRST, COMPAT_JAMO_LAST = 0x3131, 0x318E  # ㄱ..ㆎ, as typed in web text (ㅋㅋ, ㅠㅠ)


def hangul_syllables(which: str) -> str:
    """'all': every precomposed syllable; 'common': the 2,350 of KS X 1001 (those EUC-KR can encode)."""
    chars = (chr(c) for c in range(HANGUL_FIRST, HANGUL_LAST + 1))
    if which == "all":
        return "".join(chars)
    return "".join(c for c in chars if _in_ksx1001(c))


def _in_ksx1001(ch: str) -> bool:
    try:
        return len(ch.encode("euc_kr")) == 2
    except UnicodeEncodeError:
        return False


@functools.lru_cache(maxsize=1)
def ksx1001_symbols() -> str:
    """The symbols of KS X 1001, the charset of Korean text before Unicode: punctuation (「」 ※ ·), circled
    and parenthesized numbers and letters (① ㉠ ㈜ ⑴), Roman numerals, Greek, box drawing (│) and units (㎏).
    Statutes and forms number their paragraphs ①, ②, ...: without these pieces each costs three byte
    tokens. Rows 3, 4 and 10-12 (full-width ASCII, jamo, kana, Cyrillic) are left out, as are spaces and
    format characters (U+3000, the soft hyphen)."""
    rows = (0xA1, 0xA2, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9)
    chars = (bytes([row, cell]).decode("euc_kr", "ignore") for row in rows for cell in range(0xA1, 0xFF))
    return "".join(c for c in chars if c and unicodedata.category(c)[0] not in "ZC")


def conjoining_jamo() -> str:
    """The 67 modern conjoining jamo (19 leading, 21 vowels, 27 trailing): decomposed (NFD) Hangul."""
    ranges = ((0x1100, 0x1112), (0x1161, 0x1175), (0x11A8, 0x11C2))
    return "".join(chr(c) for first, last in ranges for c in range(first, last + 1))


def compatibility_jamo() -> str:
    return "".join(chr(c) for c in range(COMPAT_JAMO_FIRST, COMPAT_JAMO_LAST + 1))


@functools.lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi(num_workers=-1)


HANGUL = re.compile("[\uac00-\ud7a3\u3131-\u318e]")
JAMO_RUN = re.compile("[\u3131-\u318e]+")


def pretokenize(texts: list[str], morpheme_aware: bool, jamo_split: bool) -> list[list[str]]:
    """Each text cut into segments no piece may cross; the segments concatenate back to the text exactly."""
    segmented = morpheme_segments(texts) if morpheme_aware else [[t] for t in texts]
    if jamo_split:
        segmented = [[part for seg in segs for part in split_jamo_runs(seg)] for segs in segmented]
    return segmented


def split_jamo_runs(text: str) -> list[str]:
    """Cut around each run of compatibility jamo, so 'ㅋㅋㅋ' never merges into the word before it."""
    bounds = sorted({0, len(text), *(i for m in JAMO_RUN.finditer(text) for i in m.span())})
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def morpheme_segments(texts: list[str]) -> list[list[str]]:
    """Cut each text where Kiwi starts a morpheme between two Hangul characters (only texts with Hangul)."""
    korean = [i for i, t in enumerate(texts) if HANGUL.search(t)]
    out = [[t] if t else [] for t in texts]
    for i, tokens in zip(korean, _kiwi().tokenize(iter([texts[i] for i in korean]))):
        out[i] = _cut(texts[i], tokens)
    return out


def _cut(text: str, tokens) -> list[str]:
    starts = {t.start for t in tokens if 0 < t.start < len(text)}
    cuts = sorted(s for s in starts if HANGUL.match(text, s - 1) and HANGUL.match(text, s))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]
