"""`ondol tokenizer train|eval`: metrics against direct counts, lossy tokenizers caught, CLI end to end."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from ondol.tokenizer.evaluate import evaluate, load_encoder, measure
from tests.conftest import CORPORA, corpus_texts


def test_metrics_match_direct_counts_for_o200k():
    import tiktoken

    texts = corpus_texts("ko_reviews", 400)
    m = measure(load_encoder("o200k"), "ko_reviews", texts)
    enc = tiktoken.get_encoding("o200k_base")
    ids = [enc.encode_ordinary(t) for t in texts]
    tokens = sum(map(len, ids))
    fragments = 0
    for seq in ids:
        for i in seq:
            try:
                enc.decode_single_token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                fragments += 1
    assert m.tokens == tokens and m.docs == 400 and m.round_trip_failures == 0
    assert m.chars_per_token == pytest.approx(sum(map(len, texts)) / tokens)
    assert m.bytes_per_token == pytest.approx(sum(len(t.encode()) for t in texts) / tokens)
    assert m.tokens_per_eojeol == pytest.approx(tokens / sum(len(t.split()) for t in texts))
    assert m.byte_fallback_rate == pytest.approx(fragments / tokens) and fragments > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tokenizer trained through the CLI on a small real mix, with a 10% hold-out."""
    from ondol.tokenizer.cli import register

    root = tmp_path_factory.mktemp("cli")
    cfg = root / "run.yaml"
    cfg.write_text(
        f"""
run_dir: {root}/run
data:
  sources:
    - {{name: ko_reviews, path: {CORPORA}/ko_reviews.jsonl.gz, max_docs: 6000, weight: 0.7}}
    - {{name: ko_docs, path: {CORPORA}/ko_docs.jsonl.gz, max_docs: 200, weight: 0.3}}
tokenizer: {{vocab_size: 3000, hangul_coverage: false, holdout_fraction: 0.1}}
""",
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))

    def ondol(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert ondol("tokenizer", "train", str(cfg)) == 0
    root.joinpath("train.err").write_text(err.getvalue(), encoding="utf-8")
    return root, cfg, ondol


def test_cli_train_writes_the_folder(run):
    root, _, _ = run
    folder = root / "run" / "tokenizer"
    meta = json.loads((folder / "meta.json").read_text())
    assert {"tokenizer.model", "tokenizer.json", "meta.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert meta["vocab_size"] == 3072 and meta["normalization"] == "none"
    assert ("tokenizer: vocab_size 3000 rounded up to 3072 (a multiple of 128, for aligned embedding matmuls); "
            "set tokenizer.vocab_size=3072 to say so\n") in (root / "train.err").read_text(encoding="utf-8")
    assert meta["sample"]["ko_reviews"]["held_out"] + meta["sample"]["ko_reviews"]["documents"] == 6000
    assert 400 < meta["sample"]["ko_reviews"]["held_out"] < 800


def test_cli_eval_compares_on_held_out_documents(run, capsys):
    root, cfg, ondol = run
    out = root / "eval.json"
    folder = root / "run" / "tokenizer"
    assert (
        ondol(
            "tokenizer",
            "eval",
            str(cfg),
            "--compare",
            str(folder / "tokenizer.json"),
            "--compare",
            "o200k",
            "--json",
            str(out),
        )
        == 0
    )
    assert "ko_reviews" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["baseline"] == "o200k"
    rows = {(r["source"], r["tokenizer"].split(":")[0]): r for r in report["rows"]}
    for source in ("ko_reviews", "ko_docs"):
        ours, hf, o200k = rows[source, "ondol"], rows[source, "hf"], rows[source, "o200k"]
        assert ours["docs"] == hf["docs"] == o200k["docs"] > 0
        assert ours["tokens"] == hf["tokens"] and ours["round_trip_failures"] == 0
        assert o200k["ratio_vs_baseline"] == 1.0
        assert ours["ratio_vs_baseline"] == pytest.approx(ours["chars_per_token"] / o200k["chars_per_token"])
    from ondol.tokenizer.sample import is_held_out

    held = [t for t in corpus_texts("ko_reviews", 6000) if is_held_out(t, 0.1)]
    assert rows["ko_reviews", "ondol"]["docs"] == len(held)


def test_cli_eval_without_a_hold_out_measures_documents_training_never_read(run, capsys):
    from ondol.tokenizer.tokenizer import Tokenizer

    root, _, ondol = run
    folder = root / "run" / "tokenizer"
    cfg = root / "no-holdout.yaml"  # the same sources, the hold-out off: training read ko_reviews' first 6000
    cfg.write_text(f"""
run_dir: {root}/run2
data:
  sources:
    - {{name: ko_reviews, path: {CORPORA}/ko_reviews.jsonl.gz, max_docs: 6000}}
    - {{name: ko_docs, path: {CORPORA}/ko_docs.jsonl.gz}}
tokenizer: {{path: {folder}, vocab_size: 3000, hangul_coverage: false, holdout_fraction: 0}}
""", encoding="utf-8")
    out = root / "no-holdout.json"
    assert ondol("tokenizer", "eval", str(cfg), "--max-docs", "40", "--compare", str(folder / "tokenizer.json"),
                 "--json", str(out)) == 0
    assert capsys.readouterr().err == (
        "ondol tokenizer eval: source ko_docs trained the tokenizer with every document it has (no max_docs, "
        "tokenizer.holdout_fraction=0): not measured; set tokenizer.holdout_fraction=0.01 and retrain the "
        "tokenizer (tokenizer train CONFIG --overwrite) to keep documents out\n")
    rows = json.loads(out.read_text())["rows"]
    assert {r["source"] for r in rows} == {"ko_reviews"}
    unseen = corpus_texts("ko_reviews", 40, skip=6000)
    tok = Tokenizer.load(folder)
    assert rows[0]["docs"] == 40 and rows[0]["tokens"] == sum(len(tok.encode(t)) for t in unseen)


def test_round_trip_failures_are_counted(run):
    from tokenizers import normalizers

    root, _, _ = run
    lossy = load_encoder(str(root / "run" / "tokenizer" / "tokenizer.json"))
    lossy.tok.normalizer = normalizers.Lowercase()
    texts = corpus_texts("ko_reviews", 3000)
    expected = sum(t.lower() != t for t in texts)
    assert expected > 0
    report = evaluate([lossy], {"ko_reviews": texts})
    assert report["rows"][0]["round_trip_failures"] == expected


def test_unknown_comparison_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="o200k, an Ondol tokenizer folder"):
        load_encoder(str(tmp_path / "nothing-here"))
