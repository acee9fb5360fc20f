"""Reading every supported format, and counting each kind of bad input with its file:line."""

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from ondol.data.config import SourceConfig
from ondol.data.sources import BadInputError, BadInputLog, SourceError, iter_documents
from tests.conftest import CORPORA, corpus_texts

TEXTS = corpus_texts("ko_reviews", 40, skip=1000)


def _jsonl_bytes(texts, field="text"):
    return b"".join(json.dumps({"id": i, field: t}, ensure_ascii=False).encode() + b"\n"
                    for i, t in enumerate(texts))


def _texts(source, **kw):
    return [d.text for d in iter_documents(source, **kw)]


@pytest.mark.parametrize("suffix,pack", [
    (".jsonl", lambda b: b), (".jsonl.gz", gzip.compress), (".jsonl.zst", zstandard.compress)])
def test_jsonl_plain_gzip_zstd(tmp_path, suffix, pack):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(pack(_jsonl_bytes(TEXTS)))
    docs = list(iter_documents(SourceConfig(name="a", path=str(path))))
    assert [d.text for d in docs] == TEXTS
    assert [d.line for d in docs] == list(range(1, len(TEXTS) + 1))
    assert docs[3].where == f"{path}:4" and docs[3].source == "a"


def test_parquet_folder_glob_and_max_docs(tmp_path):
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"body": TEXTS[:25]}), tmp_path / "sub" / "b.parquet")
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes(TEXTS[25:], field="body"))
    (tmp_path / "notes.md").write_text("not a data file")
    folder = SourceConfig(name="f", path=str(tmp_path), text_field="body")
    assert _texts(folder) == TEXTS[25:] + TEXTS[:25]  # files in sorted path order: a.jsonl, sub/b.parquet
    glob = SourceConfig(name="g", path=str(tmp_path / "**" / "*.parquet"), text_field="body", max_docs=7)
    assert _texts(glob) == TEXTS[:7]


def test_parquet_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match=r"b.parquet: no column 'text' \(columns: body\)"):
        list(iter_documents(SourceConfig(name="b", path=str(tmp_path / "b.parquet"))))


def test_plain_text_units(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"{TEXTS[0]}\n{TEXTS[1]}\n\n\n{TEXTS[2]}\n", encoding="utf-8")
    assert _texts(SourceConfig(name="t", path=str(path))) == TEXTS[:3]
    paragraphs = list(iter_documents(SourceConfig(name="t", path=str(path), text_unit="paragraph")))
    assert [d.text for d in paragraphs] == [f"{TEXTS[0]}\n{TEXTS[1]}", TEXTS[2]]
    assert [d.line for d in paragraphs] == [1, 5]
    whole = _texts(SourceConfig(name="t", path=str(path), text_unit="document"))
    assert whole == [path.read_text(encoding="utf-8")]


def test_hugging_face_dataset_saved_and_by_path(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    assert _texts(SourceConfig(name="h", path=str(tmp_path / "saved"), format="hf")) == TEXTS
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.jsonl").write_bytes(_jsonl_bytes(TEXTS))
    assert _texts(SourceConfig(name="h", path=str(tmp_path / "raw"), format="hf")) == TEXTS


def test_hugging_face_errors_name_the_fix(tmp_path):
    import datasets

    with pytest.raises(SourceError, match="cannot load Hugging Face dataset 'no-such/dataset' .*offline"):
        list(iter_documents(SourceConfig(name="h", path="no-such/dataset", format="hf")))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(SourceError, match="has no split 'test' \\(set hf_split\\)"):
        list(iter_documents(SourceConfig(name="h", path=str(tmp_path / "d"), format="hf", hf_split="test")))
    with pytest.raises(SourceError, match="has no column 'body' \\(columns: text\\); set text_field"):
        list(iter_documents(SourceConfig(name="h", path=str(tmp_path / "d"), format="hf", text_field="body")))


def _good(text):
    return json.dumps({"text": text}, ensure_ascii=False).encode()


BAD_LINES = {  # one bad line of each kind, built from real text
    "malformed json": b'{"text": "unterminated',
    "invalid utf8": _good(TEXTS[6])[:-3] + b'\xff"}',
    "missing text field": json.dumps({"body": TEXTS[7]}, ensure_ascii=False).encode(),
    "empty doc": b'{"text": "  \\n "}',
}


def test_each_kind_of_bad_input_is_counted_with_file_and_line(tmp_path, caplog):
    lines = [_good(t) for t in TEXTS[:6]]
    for i, raw in enumerate(BAD_LINES.values()):
        lines.insert(2 * i + 1, raw)  # bad lines land on lines 2, 4, 6, 8
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = BadInputLog()
    docs = list(iter_documents(SourceConfig(name="b", path=str(path)), bad=bad))
    assert [d.text for d in docs] == TEXTS[:6]
    assert [d.line for d in docs] == [1, 3, 5, 7, 9, 10]
    assert dict(bad.counts) == {"malformed_json": 1, "invalid_utf8": 1, "missing_text_field": 1, "empty_doc": 1}
    assert bad.examples["malformed_json"] == [f"{path}:2: malformed json: Unterminated string starting at (column 10)"]
    assert bad.examples["invalid_utf8"][0].startswith(f"{path}:4: invalid utf8: byte ")
    assert bad.examples["missing_text_field"] == [
        f"{path}:6: missing text field: no field 'text' (set text_field in the source config)"]
    assert bad.examples["empty_doc"] == [f"{path}:8: empty doc: field 'text' is empty"]
    assert f"{path}:2" in caplog.text and "skipped 1 empty_doc" in caplog.text


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_strict_mode_raises_on_each_kind(tmp_path, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([_good(TEXTS[0]), _good(TEXTS[1]), BAD_LINES[reason], _good(TEXTS[2])]))
    with pytest.raises(BadInputError, match=f"bad.jsonl:3: {reason}: .*data.strict is on"):
        list(iter_documents(SourceConfig(name="b", path=str(path)), strict=True))


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="data source 'x': path '.*nope.jsonl' matches no file"):
        list(iter_documents(SourceConfig(name="x", path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(SourceError, match="folder '.*' has no"):
        list(iter_documents(SourceConfig(name="x", path=str(tmp_path))))
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n{"id": 2, "body": "y"}\n')
    with pytest.raises(SourceError, match=r"no documents in .*\(2 missing_text_field\); check the path and "
                       r"text_field 'text' \(fields seen in .*e.jsonl: body, id\)$"):
        list(iter_documents(SourceConfig(name="x", path=str(tmp_path / "e.jsonl"))))
    (tmp_path / "e.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"e.csv: no column 'text' in the header row \(columns: a, b\); set "
                       "text_field in data source 'x'"):
        list(iter_documents(SourceConfig(name="x", path=str(tmp_path / "e.csv"))))
    (tmp_path / "e.bin").write_text("a,b\n")
    with pytest.raises(SourceError, match="cannot tell the format of .*e.bin"):
        list(iter_documents(SourceConfig(name="x", path=str(tmp_path / "e.bin"))))


def _table_bytes(texts: list[str], delimiter: str) -> bytes:
    """texts as the 'review' column of a table with other columns around it, written by Python's csv module."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, dialect=csv.excel if delimiter == "," else csv.excel_tab)
    writer.writerow(["id", "review", "label"])
    writer.writerows([i, t, i % 2] for i, t in enumerate(texts))
    return out.getvalue().encode("utf-8")


@pytest.mark.parametrize("suffix,delimiter,pack", [
    (".csv", ",", lambda b: b), (".tsv.gz", "\t", gzip.compress), (".csv.zst", ",", zstandard.compress)])
def test_csv_and_tsv_read_the_text_column(tmp_path, suffix, delimiter, pack):
    texts = corpus_texts("ko_docs", 12)  # real documents with commas, quotes, tabs and newlines inside
    assert any("\n" in t for t in texts) and any("," in t for t in texts) and any('"' in t for t in texts)
    raw = _table_bytes(texts, delimiter)
    path = tmp_path / f"t{suffix}"
    path.write_bytes(pack(raw))
    docs = list(iter_documents(SourceConfig(name="t", path=str(path), text_field="review")))
    assert [d.text for d in docs] == texts
    lines = raw.decode("utf-8").split("\n")  # each row numbered by the line it starts on
    assert all(lines[d.line - 1].startswith(f"{i}{delimiter}") for i, d in enumerate(docs))


def test_text_read_from_a_csv_warns_once(tmp_path, caplog):
    path = tmp_path / "t.csv"
    path.write_bytes(_table_bytes(TEXTS[:5], ","))
    docs = _texts(SourceConfig(name="t", path=str(path), format="text"))
    assert docs[1].startswith("0,") and TEXTS[0] in docs[1]  # every column glued to the text, as asked
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [(f"{path}: read as plain text, one document a line with every column in it (format: "
                         "text); set format: csv and text_field: COLUMN to read one column")]
    assert _texts(SourceConfig(name="t", path=str(path), format="csv", text_field="review")) == TEXTS[:5]


def test_block_reader_matches_line_by_line_at_every_block_size(tmp_path, monkeypatch):
    """Arrow's fast path and the exact parser agree, whatever the block boundaries and wherever bad lines sit."""
    from ondol.data import sources

    lines = [_good(t) for t in corpus_texts("ko_docs", 3) + TEXTS[:20]]  # documents longer than small blocks
    for i, raw in enumerate([*BAD_LINES.values(), b"", b'{"text": "a\\ud800b"}']):
        lines.insert(3 + 4 * i, raw)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    reference = None
    for block in (64, 1000, 7777, 1 << 22):
        monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", block)
        bad = BadInputLog()
        docs = [(d.line, d.text) for d in iter_documents(SourceConfig(name="m", path=str(path)), bad=bad)]
        reference = reference or (docs, dict(bad.counts), bad.examples)
        assert (docs, dict(bad.counts), bad.examples) == reference
    docs, counts, examples = reference
    assert [t for _, t in docs] == corpus_texts("ko_docs", 3) + TEXTS[:20]
    assert counts == {"malformed_json": 2, "invalid_utf8": 2, "missing_text_field": 1, "empty_doc": 1}
    assert examples["malformed_json"][1] == f"{path}:20: malformed json: blank line"
    assert examples["invalid_utf8"][1] == (f"{path}:24: invalid utf8: character 1: an escaped lone surrogate "
                                           f"is not text")


def test_clean_files_take_the_fast_path(tmp_path, monkeypatch):
    from ondol.data import sources

    def refuse(*args):
        raise AssertionError("a clean block went through the line-by-line parser")

    monkeypatch.setattr(sources, "_parsed_lines", refuse)
    docs = list(iter_documents(SourceConfig(name="r", path=str(CORPORA / "ko_reviews.jsonl.gz"), max_docs=30000)))
    assert [d.text for d in docs] == corpus_texts("ko_reviews", 30000)
    assert [d.line for d in docs] == list(range(1, 30001))


def test_real_corpus_reads_every_line():
    docs = list(iter_documents(SourceConfig(name="ko_docs", path="../shared/corpora/ko_docs.jsonl.gz")))
    assert [d.text for d in docs] == corpus_texts("ko_docs")


def test_reading_from_a_documents_start_gives_the_rest_of_the_documents(tmp_path, monkeypatch):
    """iter_documents(start=(file number, line)) gives exactly the documents a full reading gives from that one
    on, in every format, across files, bad lines and small blocks (the line skip crosses block edges)."""
    from ondol.data import sources

    monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", 1000)
    lines = [_good(t) for t in TEXTS[:20]]
    for i, raw in enumerate(BAD_LINES.values()):
        lines.insert(2 + 3 * i, raw)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    (tmp_path / "j" / "b.jsonl.zst").write_bytes(zstandard.compress(_jsonl_bytes(TEXTS[20:])))
    (tmp_path / "p.txt").write_text(f"{TEXTS[0]}\n{TEXTS[1]}\n\n\n{TEXTS[2]}\n\n{TEXTS[3]}\n", encoding="utf-8")
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "t.parquet", row_group_size=7)
    (tmp_path / "t.csv").write_bytes(_table_bytes(corpus_texts("ko_docs", 6), ","))
    cases = [SourceConfig(name="j", path=str(tmp_path / "j")),
             SourceConfig(name="l", path=str(tmp_path / "p.txt")),
             SourceConfig(name="p", path=str(tmp_path / "p.txt"), text_unit="paragraph"),
             SourceConfig(name="q", path=str(tmp_path / "t.parquet")),
             SourceConfig(name="c", path=str(tmp_path / "t.csv"), text_field="review")]
    for source in cases:
        files = {path: i for i, path in enumerate(sources.resolve_files(source))}
        docs = list(iter_documents(source, bad=BadInputLog()))
        assert len(docs) >= 3
        for i, doc in enumerate(docs):
            rest = list(iter_documents(source, bad=BadInputLog(), start=(files[doc.file], doc.line)))
            assert rest == docs[i:], (source.name, i)
