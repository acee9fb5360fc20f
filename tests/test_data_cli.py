"""`ondol data prepare` and `ondol data inspect` from a run config, on real text."""

import ast

import pytest

from ondol.data.shards import read_manifest
from ondol.launch.cli import main
from tests.conftest import CORPORA, corpus_texts
from tests.test_data_prepare import small_tokenizer


def ondol(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    small_tokenizer(path)
    return path


@pytest.fixture
def config(tmp_path, tokenizer_dir):
    path = tmp_path / "run.yaml"
    path.write_text(f"""
run_dir: {tmp_path / 'run'}
tokenizer:
  path: {tokenizer_dir}
data:
  sources:
    - name: ko_docs
      path: {CORPORA / 'ko_docs.jsonl.gz'}
      max_docs: 30
    - name: ko_reviews
      path: {CORPORA / 'ko_reviews.jsonl.gz'}
      max_docs: 300
  val_fraction: 0.1
""")
    return path


def test_prepare_then_inspect(config, tmp_path, capsys):
    assert ondol("data", "prepare", str(config), "--no-progress") == 0
    manifest = read_manifest(tmp_path / "run" / "data")
    assert [s["read"] for s in manifest["sources"]] == [30, 300]
    out = capsys.readouterr().out
    assert f"{manifest['totals']['train_tokens']:,} train" in out

    assert ondol("data", "inspect", str(config), "--samples", "2", "--chars", "20") == 0
    out = capsys.readouterr().out
    assert "document length (tokens)" in out and out.count("sample: ") == 4
    texts = corpus_texts("ko_docs", 30) + corpus_texts("ko_reviews", 300)
    for line in out.splitlines():
        if line.strip().startswith("sample: "):
            sample = ast.literal_eval(line.strip()[len("sample: "):])  # a decoded document's start
            assert any(t.startswith(sample) for t in texts)


def test_errors_are_one_line_with_exit_code_3(config, tmp_path, capsys):
    assert ondol("data", "inspect", str(config)) == 3
    assert "ondol: data error: no manifest.json in" in capsys.readouterr().err
    assert ondol("data", "prepare", str(config), "--no-progress") == 0
    assert ondol("data", "prepare", str(config), "data.cleaning.min_chars=10", "--no-progress") == 3
    err = capsys.readouterr().err
    assert "ondol: data error: " in err and "refusing to mix" in err and len(err.splitlines()) == 1


def test_a_failed_or_empty_prepare_does_not_block_the_corrected_one(config, tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(config.read_text().replace("max_docs: 30\n", "max_docs: 30\n      text_field: body\n"))
    assert ondol("data", "prepare", str(wrong), "--no-progress") == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ondol: data error: data source 'ko_docs': no documents in ")
    assert err[0].endswith(f"text_field 'body' (fields seen in {CORPORA / 'ko_docs.jsonl.gz'}: id, source, text)")
    assert ondol("data", "prepare", str(config), "data.cleaning.min_chars=1000000", "--no-progress") == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no training document is left of 330 read (" in err[0]
    assert "loosen data.cleaning" in err[0]
    assert ondol("data", "prepare", str(config), "--no-progress") == 0
    assert [s["read"] for s in read_manifest(tmp_path / "run" / "data")["sources"]] == [30, 300]
    assert not list(tmp_path.glob("run/data.*"))  # nothing was left to move aside


def test_the_table_shows_weight_expected_share_and_epochs_as_training_draws_them(config, tmp_path, capsys):
    from ondol.data.loader import TokenLoader

    weighted = tmp_path / "weighted.yaml"
    weighted.write_text(config.read_text().replace("max_docs: 30\n", "max_docs: 30\n      weight: 0.7\n")
                        .replace("max_docs: 300\n", "max_docs: 300\n      weight: 0.3\n"))
    steps, micro = 50, 4
    assert ondol("data", "prepare", str(weighted), f"train.steps={steps}", f"train.micro_batch_size={micro}",
                 "--no-progress") == 0
    rows = {cells[0]: cells[1:] for line in capsys.readouterr().out.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 11}
    # the reference: the sequences the training loader actually draws in `steps` steps, per source
    loader = TokenLoader(tmp_path / "run" / "data", "train", 256, micro, weights={"ko_docs": 0.7, "ko_reviews": 0.3})
    drawn = {s.name: 0 for s in loader.sources}
    for _ in range(steps):
        next(loader)
        for name in loader.last_sources:
            drawn[name] += 1
    for source in loader.sources:
        weight, share, epochs = rows[source.name][-3:]
        assert float(weight) == {"ko_docs": 0.7, "ko_reviews": 0.3}[source.name]
        assert float(share.rstrip("%")) / 100 == pytest.approx(drawn[source.name] / (steps * micro), abs=1 / 200)
        assert float(epochs) == pytest.approx(drawn[source.name] / source.count, abs=1 / source.count + 0.005)
    assert rows["ko_docs"][-2:] != rows["ko_reviews"][-2:]
