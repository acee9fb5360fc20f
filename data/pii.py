"""Korean personal data in text: resident registration numbers, phone numbers, e-mail addresses, card and
bank account numbers, found by regular expressions and, where the number carries one, its check digit.

- resident registration number (주민등록번호): YYMMDD-GNNNNNN with a real date, a gender/century digit 1-8
  (5-8: foreign registration numbers) and the check digit of the government's weighted sum; numbers issued
  since October 2020 carry no check digit and are only caught when written with the hyphen and a keyword
  (주민, 외국인등록) in front;
- phone number: mobile 010/011/016-019, Seoul 02, the area codes 031-064, 070 and 050x, 15xx/16xx/18xx
  business numbers, with hyphens, dots or spaces (mobile numbers also bare), and +82 forms;
- e-mail address;
- card number: 13 to 19 digits in groups of four (or 16 bare) that start as card numbers do (3-6: international
  brands, 9: Korean domestic cards) and pass the Luhn check;
- bank account number: digit groups joined by hyphens (10 to 16 digits) after a keyword such as 계좌, 입금,
  예금주 or a bank's name, since account numbers have no common format or check digit.

`scrub(text)` returns the text with every hit replaced by its tag ("[전화번호]", ...) and the hits per kind.
"""

from __future__ import annotations

import re
from collections import Counter

TAGS = {"rrn": "[주민등록번호]", "phone": "[전화번호]", "email": "[이메일]", "card": "[카드번호]", "account": "[계좌번호]"}
_D = r"(?<![\d.-])"  # not inside a longer number or a decimal fraction
_E = r"(?!\.?\d)"
_RRN = re.compile(_D + r"(\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])\s?[-–]?\s?([1-8])(\d{6})" + _E)
_RRN_KEYWORD = re.compile(r"(주민|외국인\s?등록)[^\n\d]{0,12}$")
_PHONE = re.compile(
    r"(?<![\w+-])(?:"
    r"(?:\+82[-.\s]?|\(\+82\)\s?)(?:0?1[016789]|0?2|0?[3-6][1-5])[-.\s)]?\d{3,4}[-.\s]\d{4}"  # +82 ...
    r"|\(?01[016789]\)?[-.\s]?\d{3,4}[-.\s]?\d{4}"  # mobile, separators optional
    r"|\(?0(?:2|[3-6][1-5]|70|50[2-8])\)?[-.\s)]\s?\d{3,4}[-.\s]\d{4}"  # landline: separators required
    r"|1[568]\d{2}-\d{4}"  # business numbers 15xx-xxxx
    r")" + _E)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
                    r"(?![\w-])")
_CARD = re.compile(_D + r"[3-69]\d{3}(?:[- ]\d{4}){2}[- ]\d{1,7}" + _E + r"|" + _D + r"[3-69]\d{15}" + _E)
_ACCOUNT = re.compile(_D + r"\d{2,6}(?:-\d{1,8}){1,4}" + _E)
_ACCOUNT_KEYWORD = re.compile(r"(계좌|입금|송금|예금주|무통장|은행|뱅크|농협|신협|수협|새마을금고|우체국|account)"
                              r"[^\n]{0,20}$", re.IGNORECASE)
_DIGITS = re.compile(r"\d{4}")  # every kind but e-mail holds four digits in a row somewhere
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)


def rrn_check_digit_ok(digits: str) -> bool:
    """The check digit of a 13-digit resident registration number: (11 - sum(d_i * w_i) mod 11) mod 10."""
    total = sum(int(d) * w for d, w in zip(digits[:12], _RRN_WEIGHTS))
    return (11 - total % 11) % 10 == int(digits[12])


def luhn_ok(digits: str) -> bool:
    """The Luhn check of card numbers: doubling every second digit from the right, the sum ends in 0."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _is_rrn(match: re.Match, text: str) -> bool:
    digits = re.sub(r"\D", "", match.group())
    if rrn_check_digit_ok(digits):
        return True
    return "-" in match.group() and bool(_RRN_KEYWORD.search(text[max(0, match.start() - 20):match.start()]))


def _is_card(match: re.Match, text: str) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _is_account(match: re.Match, text: str) -> bool:
    digits = sum(c.isdigit() for c in match.group())
    return 10 <= digits <= 16 and bool(_ACCOUNT_KEYWORD.search(text[max(0, match.start() - 30):match.start()]))


# In this order: a 13-digit RRN is not also taken for a card, a phone number not for an account.
_KINDS = (("email", _EMAIL, None), ("rrn", _RRN, _is_rrn), ("card", _CARD, _is_card),
          ("phone", _PHONE, None), ("account", _ACCOUNT, _is_account))


def find(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every piece of personal data in the text, in text order, not overlapping."""
    hits: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, valid in _KINDS:
        for m in pattern.finditer(text):
            if valid is not None and not valid(m, text):
                continue
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            hits.append((kind, m.start(), m.end()))
            taken.append((m.start(), m.end()))
    return sorted(hits, key=lambda h: h[1])


def scrub(text: str) -> tuple[str, Counter]:
    """The text with each piece of personal data replaced by its kind's tag, and the count per kind."""
    hits = find(text) if "@" in text or _DIGITS.search(text) else []
    if not hits:
        return text, Counter()
    parts, last = [], 0
    for kind, start, end in hits:
        parts += [text[last:start], TAGS[kind]]
        last = end
    parts.append(text[last:])
    return "".join(parts), Counter(kind for kind, _, _ in hits)
