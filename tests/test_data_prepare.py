"""Data preparation on real text: round trip, cleaning counts, split stability, restart after a kill."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from ondol.data.config import CleaningConfig, DataConfig, SourceConfig
from ondol.data.preparation import prepare
from ondol.data.shards import first_documents, read_manifest, split_shards
from ondol.data.sources import BadInputError, SourceError
from ondol.tokenizer.config import TokenizerConfig
from ondol.tokenizer.tokenizer import Tokenizer
from ondol.tokenizer.train import train_tokenizer
from tests.conftest import CORPORA, ROOT, corpus_texts


def small_tokenizer(out_dir: Path) -> Tokenizer:
    """A real (small) Ondol tokenizer trained on the shared Korean corpora."""
    cfg = TokenizerConfig(vocab_size=2048, hangul_coverage=False, jamo_coverage=False, max_sentences=20_000,
                          character_coverage=0.995, normalization="nfc")
    sources = [SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"), max_docs=20_000),
               SourceConfig(name="ko_docs", path=str(CORPORA / "ko_docs.jsonl.gz"))]
    return train_tokenizer(cfg, sources, out_dir, seed=0)


def corpus_source(name: str, n: int | None, weight: float = 1.0) -> SourceConfig:
    return SourceConfig(name=name, path=str(CORPORA / f"{name}.jsonl.gz"), max_docs=n, weight=weight)


def decoded_split(data_dir, split, tokenizer) -> dict[str, list[str]]:
    """Every document of a split, decoded, per source; checks each is [bos] text eos with no other bos/eos."""
    bos = read_manifest(data_dir)["bos"]
    out = {}
    for name, shards in split_shards(data_dir, split).items():
        docs = []
        for shard in shards:
            for i in range(shard.docs):
                ids = shard.tokens[shard.starts[i]:shard.starts[i + 1]].tolist()
                text = ids[1:-1] if bos else ids[:-1]
                assert ids[-1] == tokenizer.eos_id and (ids[0] == tokenizer.bos_id) == bos
                assert tokenizer.eos_id not in text and tokenizer.bos_id not in text
                docs.append(tokenizer.decode(text))
        out[name] = docs
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def reference_strip_control(text: str) -> str:
    """Naive control-character removal: Cc but tab/newline (CR becomes newline) and the BOM."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\t\n" or (unicodedata.category(c) != "Cc" and c != "\ufeff"))


def reference_clean(text: str) -> str:
    return unicodedata.normalize("NFC", reference_strip_control(text))


def messy_reviews(path: Path) -> list[str]:
    """Real reviews with real-world damage: repeats, NFD-decomposed copies, control characters, CRLF."""
    texts = corpus_texts("ko_reviews", 400, skip=5000)
    messy = list(texts)
    messy += texts[:30]  # exact duplicates
    messy += [unicodedata.normalize("NFD", t) for t in texts[30:60]]  # duplicates once NFC'd
    messy += [t + "\r\n" + u + "\x07" for t, u in zip(texts[60:80], texts[80:100])]
    messy += ["\ufeff" + t for t in texts[100:110]]  # duplicates once the BOM is gone
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in messy), encoding="utf-8")
    return messy


def test_round_trip_shards_equal_cleaned_documents(tmp_path, tok):
    messy = messy_reviews(tmp_path / "messy.jsonl")
    sources = [SourceConfig(name="messy", path=str(tmp_path / "messy.jsonl"), weight=0.5),
               corpus_source("ko_docs", 40, weight=0.5)]
    cfg = DataConfig(sources=sources, val_fraction=0.1, shard_tokens=3000, num_proc=2)
    manifest = prepare(cfg, tok, tmp_path / "data", seed=7, progress=False)

    expected, seen = {"messy": [], "ko_docs": []}, set()
    for name, texts in (("messy", messy), ("ko_docs", corpus_texts("ko_docs", 40))):
        for t in map(reference_clean, texts):
            if t not in seen:
                seen.add(t)
                expected[name].append(t)
    train, val = decoded_split(tmp_path / "data", "train", tok), decoded_split(tmp_path / "data", "val", tok)
    val_set = set(val["messy"]) | set(val["ko_docs"])
    for name, texts in expected.items():
        assert train[name] == [t for t in texts if t not in val_set]
        assert val[name] == [t for t in texts if t in val_set]
    assert 10 <= len(val["messy"]) <= 80  # ~10% of 400 kept reviews
    assert first_documents(tmp_path / "data", "val", tok, 3) == val["messy"][:3]  # the pipeline's prompt source

    messy_stats = manifest["sources"][0]
    assert messy_stats["read"] == len(messy)
    assert messy_stats["dropped"] == {"duplicate": len(messy) - len(expected["messy"])} == {"duplicate": 70}
    stripped = [reference_strip_control(t) for t in messy]
    assert messy_stats["modified"] == {
        "control_chars_removed": sum(a != b for a, b in zip(messy, stripped)),
        "normalized": sum(t != unicodedata.normalize("NFC", t) for t in stripped)}
    assert 25 <= messy_stats["modified"]["normalized"] <= 30  # the NFD copies (a few have nothing to compose)
    tokens = sum(len(tok.encode(t)) + 2 for t in expected["messy"])  # bos and eos
    assert messy_stats["tokens"]["train"] + messy_stats["tokens"]["val"] == tokens
    assert manifest["totals"]["train_tokens"] == sum(s["tokens"]["train"] for s in manifest["sources"])
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert len(manifest["splits"]["train"]["messy"]) > 2  # several shards of ~3000 tokens
    assert read_manifest(tmp_path / "data") == manifest


def test_split_is_stable_when_a_source_grows_and_num_proc_changes_nothing(tmp_path, tok):
    small = prepare(DataConfig(sources=[corpus_source("ko_reviews", 1500)], val_fraction=0.05, num_proc=1,
                               bos=False), tok, tmp_path / "small", seed=3, progress=False)
    large = prepare(DataConfig(sources=[corpus_source("ko_reviews", 3000)], val_fraction=0.05, num_proc=2,
                               bos=False), tok, tmp_path / "large", seed=3, progress=False)
    small_val = decoded_split(tmp_path / "small", "val", tok)["ko_reviews"]
    large_val = decoded_split(tmp_path / "large", "val", tok)["ko_reviews"]
    assert large_val[: len(small_val)] == small_val
    assert set(large_val[len(small_val):]).isdisjoint(decoded_split(tmp_path / "small", "train", tok)["ko_reviews"])
    assert 0.03 < large["totals"]["val_docs"] / (large["totals"]["val_docs"] + large["totals"]["train_docs"]) < 0.07
    one = prepare(DataConfig(sources=[corpus_source("ko_reviews", 1500)], val_fraction=0.05, num_proc=2,
                             bos=False), tok, tmp_path / "small2", seed=3, progress=False)
    assert one["totals"] == small["totals"]
    for split in ("train", "val"):
        for path in sorted((tmp_path / "small" / split).rglob("*.*")):
            assert path.read_bytes() == (tmp_path / "small2" / path.relative_to(tmp_path / "small")).read_bytes()


def test_cleaning_filters_are_counted(tmp_path, tok):
    cleaning = CleaningConfig(min_chars=20, max_chars=100_000, min_hangul_ratio=0.5,
                              hangul_ratio_sources=["ko_reviews", "en_docs"], dedup=False)
    sources = [corpus_source("ko_reviews", 3000), corpus_source("en_docs", 20), corpus_source("ko_docs", 20)]
    cfg = DataConfig(sources=sources, cleaning=cleaning, val_fraction=0.0)
    manifest = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    by_name = {s["name"]: s for s in manifest["sources"]}

    def reason(text, ratio_applies):
        if len(text.strip()) < 20:
            return "too_short"
        if len(text) > 100_000:
            return "too_long"
        visible = [c for c in text if not c.isspace()]
        hangul = [c for c in visible if "가" <= c <= "힣" or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f"]
        return "low_hangul" if ratio_applies and len(hangul) < 0.5 * len(visible) else ""

    for name, applies in (("ko_reviews", True), ("en_docs", True), ("ko_docs", False)):
        texts = corpus_texts(name, by_name[name]["read"])
        reasons = [reason(reference_clean(t), applies) for t in texts]
        assert by_name[name]["dropped"] == {r: reasons.count(r) for r in set(reasons) if r}
        assert by_name[name]["kept"]["train"] == reasons.count("")
    assert by_name["en_docs"]["kept"]["train"] == 0  # Python documentation is English
    assert by_name["ko_reviews"]["dropped"]["too_short"] > 100
    assert by_name["ko_reviews"]["kept"]["train"] > 1000


def test_rerun_reuses_refuses_mixing_and_follows_weights(tmp_path, tok):
    cfg = DataConfig(sources=[corpus_source("ko_reviews", 500, weight=1.0), corpus_source("ko_docs", 10)])
    first = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    shard = tmp_path / "data" / first["splits"]["train"]["ko_reviews"][0]["path"]
    mtime = shard.with_suffix(".bin").stat().st_mtime_ns
    again = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    assert again == first and shard.with_suffix(".bin").stat().st_mtime_ns == mtime

    cfg.sources[0].weight = 3.0  # weights only steer the loader: no re-preparation
    reweighted = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    assert reweighted["weights"] == {"ko_reviews": 3.0, "ko_docs": 1.0} == read_manifest(tmp_path / "data")["weights"]
    assert [s["weight"] for s in reweighted["config"]["sources"]] == [3.0, 1.0]
    assert shard.with_suffix(".bin").stat().st_mtime_ns == mtime
    assert first["sources"][1]["files"] == [[str(CORPORA / "ko_docs.jsonl.gz"),
                                             (CORPORA / "ko_docs.jsonl.gz").stat().st_size]]
    cfg.cleaning.min_chars = 5
    with pytest.raises(ValueError, match=r"different cleaning .*refusing to mix; delete .*data"):
        prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    cfg.cleaning.min_chars = 1
    with pytest.raises(ValueError, match=r"different seed"):
        prepare(cfg, tok, tmp_path / "data", seed=1, progress=False)


def test_a_damaged_shard_is_named_by_the_loader_and_rebuilt_by_a_rerun(tmp_path, tok):
    from ondol.data.loader import TokenLoader

    cfg = DataConfig(sources=[corpus_source("ko_reviews", 2000)], shard_tokens=5000, val_fraction=0.0)
    manifest = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    records = manifest["splits"]["train"]["ko_reviews"]
    assert len(records) > 4
    before = {p: p.read_bytes() for p in (tmp_path / "data" / "train").rglob("*.*")}
    damaged = tmp_path / "data" / f"{records[2]['path']}.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])  # one token short
    with pytest.raises(ValueError, match=f"{damaged}: missing, or not the {records[2]['tokens']} tokens"):
        TokenLoader(tmp_path / "data", "train", 64, 2)
    assert prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)["splits"] == manifest["splits"]
    assert {p: p.read_bytes() for p in (tmp_path / "data" / "train").rglob("*.*")} == before


def test_a_changed_tokenizer_is_refused(tmp_path, tok):
    cfg = DataConfig(sources=[corpus_source("ko_docs", 10)])
    prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    retrained = train_tokenizer(TokenizerConfig(vocab_size=1024, hangul_coverage=False, jamo_coverage=False,
                                                character_coverage=0.98, max_sentences=5000),
                                [corpus_source("ko_reviews", 5000)], tmp_path / "tok2", seed=0)
    with pytest.raises(ValueError, match=r"different tokenizer .*refusing to mix"):
        prepare(cfg, retrained, tmp_path / "data", seed=0, progress=False)


def test_bad_input_is_counted_in_the_manifest_and_strict_raises(tmp_path, tok):
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in corpus_texts("ko_reviews", 20, skip=300)]
    lines = good[:10] + ['{"text": "unterminated', '{"body": "x"}', '{"text": ""}'] + good[10:]
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n'))
    cfg = DataConfig(sources=[SourceConfig(name="bad", path=str(path))], val_fraction=0.0)
    manifest = prepare(cfg, tok, tmp_path / "data", seed=0, progress=False)
    stats = manifest["sources"][0]
    assert stats["bad_input"] == {"malformed_json": 1, "missing_text_field": 1, "empty_doc": 1, "invalid_utf8": 1}
    assert stats["bad_input_examples"]["malformed_json"][0].startswith(f"{path}:11: malformed json")
    assert stats["bad_input_examples"]["invalid_utf8"][0].startswith(f"{path}:24: invalid utf8")
    assert stats["kept"]["train"] == 20 and manifest["totals"]["bad_input"] == 4
    cfg.strict = True
    with pytest.raises(BadInputError, match=f"{path}:11: malformed json"):
        prepare(cfg, tok, tmp_path / "strict", seed=0, progress=False)


def test_clear_errors(tmp_path, tok):
    with pytest.raises(SourceError, match="data source 'gone': path '.*gone.jsonl' matches no file"):
        prepare(DataConfig(sources=[SourceConfig(name="gone", path=str(tmp_path / "gone.jsonl"))]), tok,
                tmp_path / "d", seed=0, progress=False)
    with pytest.raises(ValueError, match="data.sources is empty"):
        prepare(DataConfig(), tok, tmp_path / "d", seed=0, progress=False)
    with pytest.raises(ValueError, match="data.cleaning.normalize is 'none' but the tokenizer applies NFC"):
        prepare(DataConfig(sources=[corpus_source("ko_docs", 5)], cleaning=CleaningConfig(normalize="none")),
                tok, tmp_path / "d", seed=0, progress=False)
    with pytest.raises(ValueError, match=r"data.val_fraction must lie in \[0, 1\)"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"hangul_ratio_sources names unknown sources \['ko_doc'\]"):
        DataConfig(sources=[corpus_source("ko_docs", 5)], cleaning=CleaningConfig(hangul_ratio_sources=["ko_doc"]))
    with pytest.raises(ValueError, match=r"data.cleaning.min_chars \(10\) must be >= 0 and <= data.cleaning.max_chars"):
        CleaningConfig(min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="format must be auto | jsonl"):
        SourceConfig(name="x", path="y", format="xml")
    with pytest.raises(ValueError, match="names must be unique"):
        prepare(DataConfig(sources=[corpus_source("ko_docs", 5), corpus_source("ko_docs", 5)]), tok,
                tmp_path / "d", seed=0, progress=False)


class _DyingWorkers:
    """The small tokenizer, except that a worker process dies when asked to encode."""

    def __init__(self, tok):
        self.tok, self.parent = tok, os.getpid()

    def encode_batch(self, texts):
        if os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.tok.encode_batch(texts)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_dead_worker_fails_the_run_instead_of_hanging_it(tmp_path, tok):
    cfg = DataConfig(sources=[corpus_source("ko_docs", 20)], num_proc=2)
    with pytest.raises(RuntimeError, match="a tokenizing worker process died .*lower data.num_proc"):
        prepare(cfg, _DyingWorkers(tok), tmp_path / "data", seed=0, progress=False)
    assert not (tmp_path / "data" / "manifest.json").exists()


KILLED_RUN = """
import sys
from ondol.data.preparation import prepare
from ondol.data.config import DataConfig, SourceConfig
from ondol.tokenizer.tokenizer import Tokenizer
cfg = DataConfig(sources=[SourceConfig(name="ko_reviews", path=sys.argv[3], max_docs=30000)],
                 shard_tokens=4000, val_fraction=0.05, num_proc=2)
prepare(cfg, Tokenizer.load(sys.argv[1]), sys.argv[2], seed=5, progress=False)
"""


def test_killed_prepare_resumes_to_the_same_shards(tmp_path, tok):
    cfg = DataConfig(sources=[SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"),
                                           max_docs=30000)], shard_tokens=4000, val_fraction=0.05, num_proc=2)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tok.directory), str(killed),
                             str(CORPORA / "ko_reviews.jsonl.gz")], cwd=ROOT, start_new_session=True)
    shard_dir = killed / "train" / "ko_reviews"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shard_dir.glob("*.json"))) < 20:
        assert proc.poll() is None, "the preparation finished before it could be interrupted"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.json")}
    assert len(finished) >= 20
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(killed)

    resumed = prepare(cfg, tok, killed, seed=5, progress=False)
    whole = prepare(cfg, tok, tmp_path / "whole", seed=5, progress=False)
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.*"))
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*.*"))  # no leftovers
    for rel in files:
        if rel.suffix in (".bin", ".idx"):
            assert (killed / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes(), rel
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.json") if p.name in finished} == finished


class _LargeVocabulary:
    """The small tokenizer presented as one with 100,000 ids, to exercise uint32 shards end to end."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size, self.fingerprint = 100_000, tok.fingerprint + "-large"

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_vocabularies_over_65536_ids_get_uint32_shards_with_the_same_tokens(tmp_path, tok):
    from ondol.data.loader import TokenLoader
    from ondol.data.shards import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    cfg = DataConfig(sources=[corpus_source("ko_docs", 20)], val_fraction=0.0)
    small = prepare(cfg, tok, tmp_path / "u16", seed=0, progress=False)
    large = prepare(cfg, _LargeVocabulary(tok), tmp_path / "u32", seed=0, progress=False)
    assert (small["dtype"], large["dtype"]) == ("uint16", "uint32")
    (record,) = large["splits"]["train"]["ko_docs"]
    assert (tmp_path / "u32" / f"{record['path']}.bin").stat().st_size == 4 * record["tokens"]
    a, b = (next(TokenLoader(tmp_path / d, "train", 128, 4, seed=1)) for d in ("u16", "u32"))
    assert all(torch.equal(a[k], b[k]) for k in a)
