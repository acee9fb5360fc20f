"""Korean personal data: a table of crafted hits and misses, the check digits against naive references, and real
text from the shared corpora (the personal data that real reviews and news hold, none in statute text)."""

import pytest

from ondol.data.pii import TAGS, find, luhn_ok, rrn_check_digit_ok, scrub
from tests.conftest import corpus_texts


def reference_rrn_digit(first12: str) -> str:
    """The check digit as the Ministry of the Interior publishes it: 11 - (sum of digit * 2,3,...,9,2,...,5
    mod 11), where 10 stands for 0 and 11 for 1."""
    weights = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5]
    check = 11 - sum(int(d) * w for d, w in zip(first12, weights)) % 11
    return str(check % 10)


def reference_luhn_digit(body: str) -> str:
    """The Luhn check digit appended to `body` (ISO/IEC 7812-1, Annex B)."""
    digits = [int(d) for d in body][::-1]
    total = sum(sum(divmod(d * 2, 10)) if i % 2 == 0 else d for i, d in enumerate(digits))
    return str((10 - total % 10) % 10)


RRN = "850317-1" + "23456"  # twelve digits; the thirteenth is its check digit
RRN += reference_rrn_digit(RRN.replace("-", ""))
RRN_WRONG = RRN[:-1] + str((int(RRN[-1]) + 1) % 10)
CARD = "4532-0151-1283-036"
CARD += reference_luhn_digit(CARD.replace("-", ""))
CARD_WRONG = CARD[:-1] + str((int(CARD[-1]) + 1) % 10)

CASES = [  # (text, the kinds found in it, in order)
    (f"주민번호 {RRN} 입니다", ["rrn"]),
    (f"주민등록번호는 {RRN.replace('-', '')}", ["rrn"]),
    (f"번호 {RRN_WRONG}", []),  # wrong check digit, no keyword: an ordinary number
    (f"주민등록번호: {RRN_WRONG}", ["rrn"]),  # numbers issued since 2020 have no check digit: the keyword counts
    ("생년월일 851317-1234567", []),  # month 13: not a date
    ("연락처 010-1234-5678로", ["phone"]),
    ("01012345678", ["phone"]),
    ("010.1234.5678", ["phone"]),
    ("(02) 312-4567", ["phone"]),
    ("사무실 031-8060-2560", ["phone"]),
    ("+82 10-9876-5432", ["phone"]),
    ("고객센터 1588-1234", ["phone"]),
    ("2023-01-15에 개봉", []),  # a date
    ("제3조제1항 및 2019. 12. 31.", []),
    ("가격 12,000원 3.141592653589", []),
    ("메일 someone.name+tag@example.co.kr 로", ["email"]),
    ("트위터 @handle 멘션", []),
    (f"카드 {CARD}", ["card"]),
    (f"카드 {CARD.replace('-', '')}", ["card"]),
    (f"카드 {CARD_WRONG}", []),
    ("일련번호 1122334455667788", []),  # 16 digits that do not start as a card does
    ("국민은행 계좌 123-45-678901 예금주 홍길동", ["account"]),
    ("입금: 3333-01-1234567", ["account"]),
    ("주문번호 123-45-678901", []),  # no account keyword before it
    (f"전화 010-1234-5678, 메일 a@b.com, 주민번호 {RRN}", ["phone", "email", "rrn"]),
]


@pytest.mark.parametrize(("text", "kinds"), CASES)
def test_pii_table_of_hits_and_misses(text, kinds):
    assert [kind for kind, _, _ in find(text)] == kinds


def test_check_digits_match_the_naive_references():
    for body in ("850317123456", "010101300000", "991231299999", "000229412345"):
        for last in "0123456789":
            assert rrn_check_digit_ok(body + last) == (last == reference_rrn_digit(body))
    for body in ("453201511283036", "9410123412341234", "37828224631000"):
        for last in "0123456789":
            assert luhn_ok(body + last) == (last == reference_luhn_digit(body))


def test_scrub_replaces_exactly_the_personal_data_in_real_text():
    review = corpus_texts("ko_reviews", 1, skip=23655)[0]  # a real review ending in a real e-mail address
    masked, hits = scrub(review)
    assert hits == {"email": 1} and masked == review.replace("love_cooll@naver.com", TAGS["email"])
    review = corpus_texts("ko_reviews", 1, skip=72471)[0]  # asks to be texted at a mobile number
    masked, hits = scrub(review)
    assert hits == {"phone": 1} and masked == review.replace("010 2318 2919", TAGS["phone"])
    news = corpus_texts("ko_mixed", 1, skip=18758)[0]  # a company's phone number in a news sentence
    assert scrub(news) == (news.replace("031-8060-2560", TAGS["phone"]), {"phone": 1})
    # crafted data planted into real prose: the prose around it stays as it was
    prose = corpus_texts("ko_docs", 1)[0][:300]
    planted = f"{prose} 문의: 010-2222-3333, 주민번호 {RRN}."
    assert scrub(planted)[0] == f"{prose} 문의: {TAGS['phone']}, 주민번호 {TAGS['rrn']}."


def test_no_hits_in_real_statutes_and_reviews_without_personal_data():
    # statutes are full of numbers (dates, articles, amounts, rates) and hold no personal data
    for text in corpus_texts("ko_law", 3000):
        assert find(text) == [], text
    for text in corpus_texts("ko_reviews", 3000, skip=30_000):
        assert find(text) == [], text
