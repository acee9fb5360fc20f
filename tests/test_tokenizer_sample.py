"""Training sample: cuts lose nothing, reservoirs are bounded and uniform, weights hold by characters."""

from __future__ import annotations

import pytest

from ondol.data.config import SourceConfig
from ondol.tokenizer.sample import SourceSample, is_held_out, mix, sample_source, split_sentences
from tests.conftest import CORPORA, corpus_texts


def test_split_sentences_is_lossless_and_bounded():
    for text in corpus_texts("ko_docs", 50) + corpus_texts("code_python", 5):
        parts = list(split_sentences(text, 300))
        assert "".join(parts) == text
        assert all(0 < len(p) <= 300 for p in parts)
        # A cut falls at a line end whenever the window held one.
        for p in parts[:-1]:
            assert p.endswith("\n") or "\n" not in p


def test_held_out_share_and_stability():
    texts = corpus_texts("ko_reviews", 20000)
    picked = [t for t in texts if is_held_out(t, 0.1)]
    assert 0.09 < len(picked) / len(texts) < 0.11
    assert picked == [t for t in texts if is_held_out(t, 0.1)]
    assert not any(is_held_out(t, 0.0) for t in texts)


def reviews(n: int, holdout: float = 0.0, capacity: int = 10**9, seed: int = 0) -> SourceSample:
    source = SourceConfig(name="ko_reviews", path=str(CORPORA / "ko_reviews.jsonl.gz"), max_docs=n)
    return sample_source(
        source, capacity, max_chars=10_000, seed=seed, prepare=lambda t: t, holdout_fraction=holdout
    )


def test_reservoir_is_bounded_uniform_and_deterministic():
    texts = corpus_texts("ko_reviews", 20000)  # every review is shorter than max_chars: one sentence each
    s = reviews(20000, capacity=2000, seed=1)
    assert len(s.sentences) == 2000 and s.seen == 20000 and s.documents == 20000
    assert s.seen_chars == sum(map(len, texts))
    position = {t: i for i, t in enumerate(texts)}
    mean = sum(position[t] for t in s.sentences) / len(s.sentences)
    assert abs(mean - 10000) < 600  # uniform over the stream: not the first 2,000
    assert reviews(20000, capacity=2000, seed=1).sentences == s.sentences
    assert reviews(20000, capacity=2000, seed=2).sentences != s.sentences


def test_held_out_documents_never_reach_the_sample():
    s = reviews(5000, holdout=0.2)
    texts = corpus_texts("ko_reviews", 5000)
    held = {t for t in texts if is_held_out(t, 0.2)}
    assert s.held_out == sum(is_held_out(t, 0.2) for t in texts) and s.documents + s.held_out == 5000
    assert held and not held & set(s.sentences)


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 4.0)])
def test_mix_honours_character_weights_and_cap(weights):
    a = SourceSample("ko_reviews", weights[0], corpus_texts("ko_reviews", 8000))
    b = SourceSample(
        "ko_docs", weights[1], [p for t in corpus_texts("ko_docs", 100) for p in split_sentences(t, 500)]
    )
    mixed = mix([a, b], max_sentences=10**9, seed=0)
    from_a = set(a.sentences)
    chars_a = sum(len(s) for s in mixed if s in from_a)
    share = chars_a / sum(map(len, mixed))
    assert abs(share - weights[0] / sum(weights)) < 0.02
    assert mixed == mix([a, b], max_sentences=10**9, seed=0)
    capped = mix([a, b], max_sentences=3000, seed=0)
    assert len(capped) == 3000
    first = capped[:300]
    assert any(s in from_a for s in first) and any(s not in from_a for s in first)  # shuffled, not grouped
    rng_share = sum(len(s) for s in capped if s in from_a) / sum(map(len, capped))
    assert abs(rng_share - weights[0] / sum(weights)) < 0.06
    chars = sum(map(len, a.sentences)) + sum(map(len, b.sentences))
    by_chars = mix([a, b], max_sentences=10**9, seed=0, max_chars=chars // 4)
    assert abs(sum(map(len, by_chars)) - chars // 4) < 0.01 * chars
    share = sum(len(s) for s in by_chars if s in from_a) / sum(map(len, by_chars))
    assert abs(share - weights[0] / sum(weights)) < 0.02


def test_rare_characters_beyond_coverage_become_cuts():
    from collections import Counter

    from ondol.tokenizer.train import CUT, drop_rare_chars

    sentences = corpus_texts("ko_reviews", 5000)
    counts = Counter("".join(sentences))
    rarest = min(counts, key=lambda c: (counts[c], c))
    out, dropped = drop_rare_chars(sentences, 0.99, required=rarest)
    assert [len(s) for s in out] == [len(s) for s in sentences]
    kept = set("".join(out)) - {CUT}
    gone = set(counts) - kept
    assert len(gone) == dropped > 0 and rarest in kept
    assert sum(counts[c] for c in kept - {rarest}) >= 0.99 * sum(counts.values())
    assert max(counts[c] for c in gone) <= min(counts[c] for c in kept - {rarest})


def test_ko_64k_config_trains_on_every_shared_corpus():
    """configs/ko-64k.yaml (the README figures) mixes every pretraining source in ../shared/corpora, Korean ones
    included (ko_chat is question-answer pairs for chat fine-tuning, not pretraining text)."""
    from ondol.configs import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "ko-64k.yaml", [f"corpora_dir={CORPORA}"])
    paths = {s.path for s in cfg.data.sources if s.weight > 0}
    assert paths == {str(p) for p in CORPORA.glob("*.jsonl.gz") if p.name != "ko_chat.jsonl.gz"}
    korean = sum(s.weight for s in cfg.data.sources if s.name.startswith("ko_"))
    assert korean / sum(s.weight for s in cfg.data.sources) >= 0.7
    assert cfg.tokenizer.rounded_vocab_size() == 64000 and cfg.tokenizer.holdout_fraction == 0.1
    assert cfg.tokenizer.normalization == "none"
