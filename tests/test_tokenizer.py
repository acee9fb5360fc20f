"""Tokenizer contract: strictly lossless round trip, special tokens, Korean coverage, reuse, HF export ids."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import stat
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondol.data.config import SourceConfig
from ondol.errors import TokenizerError
from ondol.tokenizer.config import KSX1001_SYMBOLS, TokenizerConfig
from ondol.tokenizer.korean import compatibility_jamo, conjoining_jamo, hangul_syllables, ksx1001_symbols
from ondol.tokenizer.sample import is_held_out
from ondol.tokenizer.tokenizer import Tokenizer
from ondol.tokenizer.train import train_tokenizer
from tests.conftest import CORPORA, corpus_texts

SOURCES = [
    SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"), weight=0.5, max_docs=20000),
    SourceConfig(name="ko_docs", path=str(CORPORA / "ko_docs.jsonl.gz"), weight=0.3, max_docs=300),
    SourceConfig(name="code_python", path=str(CORPORA / "code_python.jsonl.gz"), weight=0.2, max_docs=40),
]


def small_config(**changes) -> TokenizerConfig:
    return dataclasses.replace(TokenizerConfig(vocab_size=4000, max_sentences=60000), **changes)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(small_config(), SOURCES, tmp_path_factory.mktemp("tok"), seed=7)


def held_out_texts() -> list[str]:
    """Documents the fixture never read (past its max_docs), from every corpus."""
    return (
        corpus_texts("ko_reviews", 3000, skip=100_000)
        + corpus_texts("ko_docs", 200, skip=600)
        + corpus_texts("en_docs", 15, skip=100)
        + corpus_texts("code_python", 15, skip=400)
    )


def test_vocab_rounded_and_special_ids(tok):
    cfg = small_config()
    assert tok.vocab_size == 4096 and tok.vocab_size % 128 == 0
    names = cfg.all_special_tokens()
    assert [tok.token_to_id(n) for n in names] == list(range(len(names)))
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.token_to_id("<|user|>") == 5 and tok.token_to_id("<|reserved_7|>") == len(names) - 1
    assert tok.special_tokens == {n: i for i, n in enumerate(names)}
    # Special tokens are ids only: the same characters in user text are ordinary text.
    ids = tok.encode("<|user|><|bos|>")
    assert not set(ids) & set(range(len(names))) and tok.decode(ids) == "<|user|><|bos|>"
    with pytest.raises(KeyError):
        tok.token_to_id("<|not-a-token|>")


def test_round_trip_on_held_out_real_documents(tok):
    texts = held_out_texts()
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert ids == tok.encode(text) == tok.sentencepiece.encode(text)  # no U+2581 in these texts


# Arbitrary Unicode, with extra weight on what NFC would change or what SentencePiece treats specially:
# CJK compatibility ideographs (NFC maps each to another code point, U+F91F to U+862D), conjoining Hangul
# jamo (NFC composes them), combining marks, U+2581 and whitespace runs.
SPECIAL_CHARS = st.one_of(
    st.characters(min_codepoint=0xF900, max_codepoint=0xFAFF),
    st.characters(min_codepoint=0x1100, max_codepoint=0x11FF),
    st.characters(min_codepoint=0x0300, max_codepoint=0x036F),
    st.sampled_from("\u2581 \t\n\r\u3000\u00a0가ㅋA1\u212b\u1e9b"),
)
UNICODE_TEXT = st.text(alphabet=st.one_of(st.characters(codec="utf-8"), SPECIAL_CHARS), max_size=200)


@pytest.fixture(scope="module")
def hf(tok):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tok.directory / "tokenizer.json"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(UNICODE_TEXT)
def test_round_trip_arbitrary_unicode_is_strict(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]
    assert hf.decode(ids, skip_special_tokens=False) == text
    theirs = hf.encode(text, add_special_tokens=False).ids
    assert hf.decode(theirs, skip_special_tokens=False) == text
    if not any(name in text for name in tok.special_tokens):  # the HF file reads those as special tokens
        assert theirs == ids


def test_compatibility_ideographs_survive(tok, hf):
    """The reviews that NFC would change (U+F933, U+F91B, ...) come back exactly, through both files."""
    texts = [t for t in corpus_texts("ko_reviews") if not unicodedata.is_normalized("NFC", t)]
    assert len(texts) >= 40 and any("\uf933" in t for t in texts)
    ids = tok.encode_batch(texts)
    assert [tok.decode(i) for i in ids] == texts
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == ids
    assert hf.decode_batch(ids, skip_special_tokens=False) == texts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(" \t\n\r\u3000\u2581\u00a0ab가ㅋ1"), max_size=60))
def test_round_trip_whitespace_runs(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def nfc_tok(tmp_path_factory) -> Tokenizer:
    """normalization: nfc (composed and decomposed text read alike; decode gives NFC(x)), digits not split."""
    cfg = small_config(normalization="nfc", vocab_size=3200, hangul_coverage=False, split_digits=False)
    return train_tokenizer(cfg, SOURCES[:1], tmp_path_factory.mktemp("nfc"), seed=7)


def test_normalization_nfc_reads_decomposed_text_as_composed(nfc_tok, tok):
    decomposed = unicodedata.normalize("NFD", corpus_texts("ko_reviews", 1, skip=123)[0])
    composed = unicodedata.normalize("NFC", decomposed)
    assert decomposed != composed
    assert nfc_tok.encode(decomposed) == nfc_tok.encode(composed)
    assert nfc_tok.decode(nfc_tok.encode(decomposed)) == composed
    # The default keeps decomposed text as it is.
    assert tok.decode(tok.encode(decomposed)) == decomposed and tok.encode(decomposed) != tok.encode(composed)
    assert nfc_tok.fingerprint != tok.fingerprint


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(UNICODE_TEXT)
def test_round_trip_arbitrary_unicode_with_nfc(nfc_tok, text):
    assert nfc_tok.decode(nfc_tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_digits_split_and_unseen_chars_fall_back_to_bytes(tok):
    for i in range(tok.vocab_size):
        piece = tok.id_to_token(i)
        assert sum(c.isdigit() for c in piece) <= 1 or tok.is_byte(i) or piece in tok.special_tokens, piece
    ids = tok.encode("20240517")
    assert len(ids) == 8 and tok.decode(ids) == "20240517"
    rare = "\U0001f9ec\u4e7e"  # a DNA emoji and a rare CJK ideograph, unseen in the sample
    ids = tok.encode(rare)
    assert all(tok.is_byte(i) for i in ids) and len(ids) == len(rare.encode()) and tok.decode(ids) == rare
    assert tok.encode("\u2581") == [tok.token_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]


def test_split_digits_off_learns_number_pieces(nfc_tok):
    numbers = [nfc_tok.id_to_token(i) for i in range(nfc_tok.vocab_size) if nfc_tok.id_to_token(i).isdigit()]
    assert any(len(piece) >= 2 for piece in numbers), numbers
    assert nfc_tok.decode(nfc_tok.encode("20240517")) == "20240517"


def test_hangul_and_jamo_coverage(tok):
    for ch in hangul_syllables("common") + compatibility_jamo() + conjoining_jamo():
        ids = tok.encode(ch)
        assert len(ids) == 1 and not tok.is_byte(ids[0]), ch
    assert len(hangul_syllables("all")) == 11172 and len(hangul_syllables("common")) == 2350
    # conjoining_jamo is exactly what NFD decomposes the 11,172 syllables into
    nfd = {j for s in hangul_syllables("all") for j in unicodedata.normalize("NFD", s)}
    assert nfd == set(conjoining_jamo()) and len(conjoining_jamo()) == 67
    # Decomposed Korean is kept as it is, at no more than 3 tokens a syllable
    texts = corpus_texts("ko_reviews", 300, skip=7000)
    syllables = sum(len(hangul_syllables_in(t)) for t in texts)
    nfd_ids = tok.encode_batch([unicodedata.normalize("NFD", t) for t in texts])
    assert [tok.decode(ids) for ids in nfd_ids] == [unicodedata.normalize("NFD", t) for t in texts]
    extra = sum(map(len, nfd_ids)) - sum(map(len, tok.encode_batch(texts)))
    assert extra <= 2 * syllables


def test_symbol_coverage_makes_every_ksx1001_symbol_a_piece(tmp_path):
    """Reviews alone hardly use ①, so without symbol_coverage it is three byte tokens (the reference)."""
    law = corpus_texts("ko_law", 200, skip=3000)
    cfg = small_config(vocab_size=3200, hangul_coverage=False, max_sentences=5000)
    plain = train_tokenizer(cfg, SOURCES[:1], tmp_path / "plain", seed=3)
    covered = train_tokenizer(dataclasses.replace(cfg, symbol_coverage=True), SOURCES[:1], tmp_path / "sym", 3)
    assert [plain.is_byte(i) for i in plain.encode("①")] == [True] * 3
    symbols = ksx1001_symbols()
    assert len(symbols) == KSX1001_SYMBOLS and {"①", "「", "※", "│", "㎏", "㈜", "ⅳ"} <= set(symbols)
    assert not set(symbols) & set(compatibility_jamo() + "\u3000\u00ad")
    for ch in symbols:
        ids = covered.encode(ch)
        assert len(ids) == 1 and not covered.is_byte(ids[0]), ch
        assert ch.encode("euc_kr").decode("euc_kr") == ch  # in KS X 1001
    assert sum(map(len, covered.encode_batch(law))) < sum(map(len, plain.encode_batch(law)))


def hangul_syllables_in(text: str) -> str:
    return "".join(c for c in text if "\uac00" <= c <= "\ud7a3")


def test_rerun_reuses_and_changed_config_refuses(tmp_path):
    cfg = small_config(vocab_size=3200, hangul_coverage=False, max_sentences=5000)
    first = train_tokenizer(cfg, SOURCES[:1], tmp_path, seed=3)
    stamp = (tmp_path / "tokenizer.model").stat().st_mtime_ns
    again = train_tokenizer(cfg, SOURCES[:1], tmp_path, seed=3)
    assert (
        again.fingerprint == first.fingerprint and (tmp_path / "tokenizer.model").stat().st_mtime_ns == stamp
    )
    with pytest.raises(TokenizerError, match="another config, sources or seed: add --overwrite to move it aside"):
        train_tokenizer(cfg, SOURCES[:1], tmp_path, seed=4)
    # Same inputs in a fresh folder give the same model bit for bit.
    assert train_tokenizer(cfg, SOURCES[:1], tmp_path / "other", seed=3).fingerprint == first.fingerprint


def test_cli_overwrite_moves_a_tokenizer_of_another_config_aside_and_eval_works_by_default(tmp_path, capsys):
    from ondol.launch.cli import main

    config = tmp_path / "run.yaml"  # no tokenizer.holdout_fraction: the default keeps documents out for eval
    config.write_text(f"run_dir: {tmp_path}/run\n"
                      f"data: {{sources: [{{name: ko_reviews, path: {CORPORA}/ko_reviews.jsonl.gz, max_docs: 3000}}]}}\n"
                      "tokenizer: {vocab_size: 3200, hangul_coverage: false}\n", encoding="utf-8")
    folder = tmp_path / "run" / "tokenizer"
    assert main(["tokenizer", "train", str(config)]) == 0
    first = json.loads((folder / "meta.json").read_text())
    assert main(["tokenizer", "eval", str(config), "--compare", str(folder / "tokenizer.json"), "--max-docs", "20"]) == 0
    held_out = [t for t in corpus_texts("ko_reviews", 3000) if is_held_out(t, 0.01)]
    assert len(held_out) >= 20 and json.loads((folder / "eval.json").read_text())["rows"][0]["docs"] == 20
    capsys.readouterr()
    assert main(["tokenizer", "train", str(config), "seed=5"]) == 4
    assert capsys.readouterr().err == (f"ondol: tokenizer error: {folder} holds a tokenizer trained with another "
                                       "config, sources or seed: add --overwrite to move it aside and train a new "
                                       "one, or choose another run_dir / tokenizer.path\n")
    assert main(["tokenizer", "train", str(config), "seed=5", "--overwrite"]) == 0
    (aside,) = (tmp_path / "run").glob("tokenizer.replaced-*")
    assert f"moved the tokenizer trained with another config to {aside}" in capsys.readouterr().err
    assert json.loads((aside / "meta.json").read_text()) == first
    assert json.loads((folder / "meta.json").read_text())["recipe"]["seed"] == 5


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=2048)  # too small for the 2,350 guaranteed syllables
    with pytest.raises(ValueError, match="tokenizer.normalization"):
        TokenizerConfig(normalization="nfkc")
    with pytest.raises(ValueError, match="tokenizer.model_type"):
        TokenizerConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="tokenizer.superword_share must lie"):
        TokenizerConfig(superword_share=0.6)
    with pytest.raises(ValueError, match="tokenizer.superword_share needs model_type: bpe"):
        TokenizerConfig(superword_share=0.2, model_type="unigram")
    with pytest.raises(ValueError, match="less the superword share is too small"):
        TokenizerConfig(vocab_size=4096, superword_share=0.5)
    with pytest.raises(ValueError, match=r"need at least 1347 \(or set tokenizer.symbol_coverage=false\)$"):
        TokenizerConfig(vocab_size=1024, hangul_coverage=False, symbol_coverage=True)


def test_hf_export_gives_identical_ids(tok, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tok.directory
    texts = held_out_texts()
    ours = tok.encode_batch(texts)
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == ours
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(auto, PreTrainedTokenizerFast)
    assert auto(texts[:200], add_special_tokens=False)["input_ids"] == ours[:200]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert [auto.decode(i) for i in ours[:200]] == [tok.decode(i) for i in ours[:200]]


@pytest.fixture(scope="module")
def korean_tok(tmp_path_factory) -> Tokenizer:
    cfg = small_config(vocab_size=3200, hangul_coverage=False, morpheme_aware=True, jamo_split=True)
    return train_tokenizer(
        cfg, [dataclasses.replace(SOURCES[0], max_docs=2000)], tmp_path_factory.mktemp("ko"), 7
    )


def token_boundaries(tok: Tokenizer, text: str) -> set[int]:
    """Character offsets where one token ends and the next begins (where the decoded prefix is whole text)."""
    ids, out = tok.encode(text), set()
    for k in range(1, len(ids)):
        prefix = tok.decode(ids[:k])
        if text.startswith(prefix):
            out.add(len(prefix))
    return out


def test_morpheme_aware_and_jamo_split_pieces_never_cross_cuts(korean_tok):
    from kiwipiepy import Kiwi

    from ondol.tokenizer.korean import HANGUL, JAMO_RUN

    assert not any("\u241f" in korean_tok.id_to_token(i) for i in range(korean_tok.vocab_size))
    kiwi = Kiwi()
    texts = [t for t in corpus_texts("ko_reviews", 150, skip=50_000) if HANGUL.search(t)]
    for text in texts:
        assert korean_tok.decode(korean_tok.encode(text)) == text
        morpheme_starts = {
            m.start
            for m in kiwi.tokenize(text)
            if 0 < m.start < len(text) and HANGUL.match(text, m.start - 1) and HANGUL.match(text, m.start)
        }
        jamo_edges = {i for m in JAMO_RUN.finditer(text) for i in m.span() if 0 < i < len(text)}
        assert morpheme_starts | jamo_edges <= token_boundaries(korean_tok, text), text


def test_a_full_disk_while_writing_tokenizer_json_is_an_os_error(tok, tmp_path):
    """tokenizers' own save() reports ENOSPC as a plain Exception, which the tokenizer's space check cannot
    name; the files are written by Python, so a full disk (here /dev/full) is an OSError with its errno."""
    from ondol.tokenizer.hf_export import write_hf_files

    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("/dev/full is not the full device here")
    meta = json.loads((tok.directory / "meta.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").symlink_to("/dev/full")
    with pytest.raises(OSError) as raised:
        write_hf_files((tok.directory / "tokenizer.model").read_bytes(), meta, tmp_path)
    assert raised.value.errno == errno.ENOSPC


def test_jamo_split_hf_export_gives_identical_ids(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    cfg = small_config(vocab_size=3200, hangul_coverage=False, jamo_split=True)
    tok = train_tokenizer(cfg, SOURCES[:1], tmp_path, seed=7)
    texts = corpus_texts("ko_reviews", 3000, skip=200_000)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == tok.encode_batch(texts)


CORPUS_NAMES = ("ko_reviews", "ko_docs", "en_docs", "code_python", "ko_law", "ko_mixed")


def corpus_slice(full: bool) -> dict[str, list[str]]:
    """Every shared corpus document (full), or a slice of each: 30k reviews, all Korean docs, some English,
    code, law and ko_mixed."""
    if full:
        return {name: corpus_texts(name) for name in CORPUS_NAMES}
    return {
        "ko_reviews": corpus_texts("ko_reviews", 30000, skip=300_000),
        "ko_docs": corpus_texts("ko_docs"),
        "en_docs": corpus_texts("en_docs", 40, skip=200),
        "code_python": corpus_texts("code_python", 60, skip=500),
        "ko_law": corpus_texts("ko_law", 3000, skip=5000),
        "ko_mixed": corpus_texts("ko_mixed", 10000, skip=20000),
    }


def check_corpus(tok: Tokenizer, texts_by_source: dict[str, list[str]]) -> None:
    """Strict round trip (Ondol and tokenizer.json) and HF ids on each document; failures are listed by
    source and index, not just counted."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tok.directory / "tokenizer.json"))
    for source, texts in texts_by_source.items():
        for start in range(0, len(texts), 5000):
            batch = texts[start : start + 5000]
            ours = tok.encode_batch(batch)
            theirs = [e.ids for e in hf.encode_batch(batch, add_special_tokens=False)]
            back = zip(batch, ours, hf.decode_batch(ours, skip_special_tokens=False))
            lossy = [start + i for i, (t, ids, h) in enumerate(back) if not tok.decode(ids) == h == t]
            differ = [start + i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
            assert not lossy and not differ, (source, lossy[:10], differ[:10])


def test_round_trip_and_hf_ids_on_a_large_corpus_slice(tok):
    check_corpus(tok, corpus_slice(full=False))


@pytest.mark.slow
def test_round_trip_and_hf_ids_on_every_corpus_document(tok):
    check_corpus(tok, corpus_slice(full=True))


def test_pickles_for_worker_processes(tok):
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    texts = corpus_texts("ko_docs", 20, skip=900)
    assert copy.fingerprint == tok.fingerprint and copy.encode_batch(texts) == tok.encode_batch(texts)


def test_sentencepiece_minimum_version_is_declared_and_installed():
    """0.2.2 aborts in C++ while training ("bpe_model_trainer.cc(45) Check failed: freq > 0"); 0.2.3 trains."""
    from importlib.metadata import version

    from tests.conftest import ROOT

    assert '"sentencepiece>=0.2.3"' in (ROOT / "pyproject.toml").read_text()
    assert tuple(int(x) for x in version("sentencepiece").split(".")[:3]) >= (0, 2, 3)


def test_a_trainer_abort_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A C++ abort in SentencePiece's trainer ends a child process; the caller gets one line naming it."""
    import os

    import sentencepiece as spm

    from ondol.launch.cli import main
    from ondol.tokenizer.train import TrainerAbort

    def abort(**options):  # what a failed CHECK does: a line on file descriptor 2, then abort()
        os.write(2, b"bpe_model_trainer.cc(45) [freq > 0]\n")
        os.abort()

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", abort)
    cfg = small_config(vocab_size=3200, hangul_coverage=False, max_sentences=2000)
    with pytest.raises(TrainerAbort, match=r"aborted training \(bpe_model_trainer.cc\(45\) \[freq > 0\]\)$"):
        train_tokenizer(cfg, SOURCES[:1], tmp_path / "tok", seed=0)
    assert not (tmp_path / "tok" / "meta.json").exists()

    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path}/run\n"
        f"data: {{sources: [{{name: ko_docs, path: {CORPORA}/ko_docs.jsonl.gz, max_docs: 50}}]}}\n"
        "tokenizer: {vocab_size: 3200, hangul_coverage: false}\n",
        encoding="utf-8",
    )
    capsys.readouterr()
    assert main(["tokenizer", "train", str(config)]) == 4
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the sampling progress lines
    assert last.startswith("ondol: tokenizer error: tokenizer: SentencePiece") and last.endswith("[freq > 0])")


@pytest.fixture(scope="module")
def superword_tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(small_config(superword_share=0.2), SOURCES, tmp_path_factory.mktemp("superword"), 7)


def subword_phase(tok: Tokenizer):
    """The first phase alone: the model without the pieces the superword phase appended, and their first id."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    first = tok.vocab_size - TokenizerConfig(**tok.meta["config"] | {"sources": []}).superword_pieces()
    proto = sp_pb.ModelProto()
    proto.ParseFromString(tok.sentencepiece.serialized_model_proto())
    del proto.pieces[first:]
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), first


def two_phase_reference(subword, vocab: dict[str, int], text: str) -> list[int]:
    """SuperBPE's encoding written out: the subword phase's tokens, then, while any adjacent pair joins into a
    piece, the pair whose piece ranks first (lowest id; the leftmost on a tie) is merged."""
    pieces = subword.encode(text, out_type=str)
    while True:
        ranked = [(vocab[a + b], k) for k, (a, b) in enumerate(itertools.pairwise(pieces)) if a + b in vocab]
        if not ranked:
            return [vocab[p] if p in vocab else subword.piece_to_id(p) for p in pieces]
        _, k = min(ranked)
        pieces[k : k + 2] = [pieces[k] + pieces[k + 1]]


def test_superword_phase_encodes_as_subwords_then_superword_merges(superword_tok):
    subword, first = subword_phase(superword_tok)
    sp = superword_tok.sentencepiece
    normal = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_byte(i)
                                                                                or sp.is_unknown(i))}
    texts = (corpus_texts("ko_reviews", 300, skip=150_000) + corpus_texts("ko_law", 20, skip=9000)
             + [t[:3000] for t in corpus_texts("code_python", 10, skip=600)])
    for text in texts:
        assert superword_tok.encode(text) == two_phase_reference(subword, normal, text), text
    # The first phase's pieces stay within words; the second phase's cross spaces, never joining digits.
    pieces = [superword_tok.id_to_token(i) for i in range(superword_tok.vocab_size)]
    assert not any("\u2581" in p.lstrip("\u2581") for p in pieces[:first])
    crossing = [p for p in pieces[first:] if "\u2581" in p.strip("\u2581")]  # '할▁수▁있는', not '의▁'
    assert len(crossing) >= 50 and "할▁수▁있는" in crossing
    assert not any(c.isdigit() for p in pieces[first:] for c in p)


def test_superword_phase_is_lossless_exported_and_shorter_than_subwords(superword_tok, tmp_path):
    check_corpus(superword_tok, {"held_out": held_out_texts()})
    # Same inputs, same model: the second phase (HF tokenizers' trainer) is deterministic too.
    again = train_tokenizer(small_config(superword_share=0.2), SOURCES, tmp_path / "again", 7)
    assert again.fingerprint == superword_tok.fingerprint
    subwords = train_tokenizer(small_config(split_by_whitespace=True), SOURCES, tmp_path / "subword", 7)
    texts = held_out_texts()
    assert subwords.vocab_size == superword_tok.vocab_size
    assert sum(map(len, superword_tok.encode_batch(texts))) < 0.99 * sum(map(len, subwords.encode_batch(texts)))


def test_a_superword_phase_short_of_pairs_is_a_one_line_error(tmp_path):

    cfg = small_config(vocab_size=3200, hangul_coverage=False, max_sentences=300, superword_share=0.5)
    with pytest.raises(TokenizerError, match=r"^tokenizer: the superword phase found [\d,]+ of the 1,600 pieces asked for "
                                             r"\(pairs seen at least twice\); lower tokenizer.superword_share"):
        train_tokenizer(cfg, [dataclasses.replace(SOURCES[0], max_docs=300)], tmp_path / "tok", 0)
    assert not (tmp_path / "tok" / "meta.json").exists()


def test_ctrl_c_stops_a_trainer_child_at_once():
    """A trainer in this process (SentencePiece's C++, tokenizers' Rust) would run to its end before Python saw
    Ctrl-C; in its child it is stopped at once and leaves no process behind."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from ondol.tokenizer.train import run_in_child

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even in background
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run_in_child(lambda: time.sleep(600) or b"", "sleeping")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 30 and multiprocessing.active_children() == []
