"""Korean character sets and Kiwi morpheme boundaries used by the trainer and the encoder."""

from __future__ import annotations

import functools

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


def compatibility_jamo() -> str:
    return "".join(chr(c) for c in range(COMPAT_JAMO_FIRST, COMPAT_JAMO_LAST + 1))


@functools.lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi(num_workers=-1)


def morpheme_segments(texts: list[str]) -> list[list[str]]:
    """Cut each text at Kiwi's morpheme starts inside words; each text's segments concatenate back to it exactly."""
    analysed = _kiwi().tokenize(iter(texts)) if any(texts) else [[] for _ in texts]
    return [_cut(text, tokens) for text, tokens in zip(texts, analysed)]


def _cut(text: str, tokens) -> list[str]:
    starts = sorted({t.start for t in tokens if 0 < t.start < len(text)})
    cuts = [s for s in starts if not text[s - 1].isspace()]  # a space already separates the pieces there
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
