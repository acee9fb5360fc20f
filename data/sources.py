"""Reading documents from every supported source, counting (never hiding) bad input.

One entry point, `iter_documents(source)`, shared by the tokenizer trainer and data preparation. It reads
JSON Lines, CSV and TSV (a header row, then one document a row) and plain text (each plain, .gz or .zst), and Parquet,
from a file, a glob or a folder, or a Hugging Face dataset through `datasets`. Each document carries the file and line it came from, so every later
error can point at the input. Lines that cannot be documents (malformed JSON, invalid UTF-8, a missing text
field, an empty text) are counted per reason in a `BadInputLog` and the first few are logged with file:line;
with `strict=True` the first one raises `BadInputError` instead. A compressed file that breaks off (truncated or
corrupt) keeps the lines before the break and counts as one `broken_file` at the line and byte where it broke. JSON Lines are parsed a block at a time by
Arrow's JSON reader; a block holding any bad line goes through the exact line-by-line parser instead.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ondol.data.chat import MESSAGES, check_messages
from ondol.data.config import SourceConfig
from ondol.errors import DataError

log = logging.getLogger("ondol.data")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv"}
TABLE_DIALECTS = {"csv": csv.excel, "tsv": csv.excel_tab}  # quoted fields may hold delimiters and newlines
COMPRESSED_SUFFIXES = ("", ".gz", ".zst", ".zstd")
PARQUET_SUFFIXES = (".parquet",)
JSONL_BLOCK_BYTES = 4 << 20  # JSON Lines are parsed a block of whole lines at a time


class BadInputError(DataError):
    """A bad input line met with `strict` on; the message names file:line and the fix."""


class SourceError(DataError):
    """A source that cannot be read at all: missing files, unknown format, no documents."""


@dataclass(slots=True)
class Document:
    text: str
    source: str  # the SourceConfig name
    file: str  # file path (or "hf:NAME[split]")
    line: int  # 1-based line in the file (row for Parquet and Hugging Face datasets)
    messages: list[tuple[str, str]] | None = None  # a chat source's conversation as (role, content); text: the
    # contents one a line (what a tokenizer trains on)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class BadInputLog:
    """Counts of skipped input per reason, with the first few locations of each kept for the report."""

    strict: bool = False
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        message = f"{where}: {reason.replace('_', ' ')}: {detail}"
        if self.strict:
            raise BadInputError(f"{message} (data.strict is on: fix this line, or set data.strict=false "
                                f"to count and skip bad lines)")
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)
            log.warning("skipped %s", message)

    def summary(self) -> str:
        if not self.counts:
            return "no bad input"
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))


def detect_format(path: str) -> str:
    """The reader for a file, from its suffix (compression suffixes allowed after .jsonl, .csv, .tsv and .txt)."""
    name = path.lower()
    kinds = [(JSONL_SUFFIXES, "jsonl"), (TEXT_SUFFIXES, "text"), *(((b,), k) for b, k in TABLE_SUFFIXES.items())]
    for base, kind in kinds:
        if any(name.endswith(b + c) for b in base for c in COMPRESSED_SUFFIXES):
            return kind
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return ""


def resolve_files(source: SourceConfig) -> list[str]:
    """The sorted files of a source: a file, a glob (** allowed) or every supported file under a folder."""
    path = os.path.expanduser(source.path)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and detect_format(str(p)))
        what = f"folder '{path}' has no .jsonl/.json, .csv, .tsv, .txt (each also .gz/.zst) or .parquet files"
    elif os.path.isfile(path):
        files = [path]
    else:
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        what = (f"path '{path}' matches no file (give a file, glob or folder; for a Hugging Face dataset "
                f"set format: hf)")
    if not files:
        raise SourceError(f"data source '{source.name}': {what}")
    return files


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a .gz or .zst file (concatenated members or frames too), a chunk at a time.

    A stream that is cut short (a truncated download) or corrupt ends the bytes where it breaks instead of
    raising, and `broken` says what happened at which compressed byte: the reader keeps every whole line before
    the break and reports the rest (compression libraries either raise without saying where, or, for zstd,
    end silently)."""

    def __init__(self, file: IO[bytes], decompressor: Callable[[], Any]) -> None:
        self.file = file
        self.new_decompressor = decompressor
        self.decompressor = decompressor()
        self.size = os.fstat(self.file.fileno()).st_size
        self.input = b""  # compressed bytes not yet given to the decompressor
        self.output, self.position = b"", 0  # decompressed bytes not yet handed out
        self.offset = 0  # compressed bytes consumed
        self.in_stream = False  # inside a member/frame whose end has not been seen
        self.broken: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.position == len(self.output):
            self._fill()
        n = min(len(buffer), len(self.output) - self.position)
        buffer[:n] = memoryview(self.output)[self.position:self.position + n]
        self.position += n
        return n

    def _fill(self) -> None:
        import zstandard

        self.output, self.position = b"", 0
        while not self.output and self.broken is None:
            if not self.input:
                self.input = self.file.read(JSONL_BLOCK_BYTES)
                if not self.input:
                    if self.in_stream:
                        self.broken = (f"the compressed stream ends early at byte {self.offset:,} of {self.size:,} "
                                       f"(truncated file?)")
                    return
            if not self.in_stream and not self.input.strip(b"\0"):  # zero padding after the last member
                self.offset += len(self.input)
                self.input = b""
                continue
            self.in_stream = True
            try:
                self.output = self.decompressor.decompress(self.input)
            except (zlib.error, zstandard.ZstdError) as e:
                self.broken = f"corrupt compressed data after byte {self.offset:,} of {self.size:,} ({e})"
                return
            if self.decompressor.eof:  # one member/frame done; what follows starts the next
                rest = self.decompressor.unused_data
                self.offset += len(self.input) - len(rest)
                self.input, self.in_stream = rest, False
                self.decompressor = self.new_decompressor()
            else:
                self.offset += len(self.input)
                self.input = b""

    def close(self) -> None:
        self.file.close()
        super().close()


def file_digest(path: str, sample: int = 1 << 20) -> str:
    """A content identity of a file, independent of how its path is spelled: SHA-256 of its size and its first
    and last `sample` bytes (a whole-file hash of a multi-GB corpus on every run would cost minutes)."""
    h = hashlib.sha256()
    with _open_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(size - sample)
        h.update(f.read(sample))
    return h.hexdigest()[:16]


def source_identity(source: SourceConfig) -> dict:
    """What a source's documents depend on: its settings and its files' sizes and content digests in order,
    not the spelling of its path (the same files by a relative, absolute or linked path are the same run)."""
    entry = asdict(source)
    if source.format == "hf":
        if os.path.exists(os.path.expanduser(source.path)):  # a saved dataset folder
            entry["path"] = os.path.realpath(os.path.expanduser(source.path))
        return entry
    del entry["path"]
    entry["content"] = [[os.path.getsize(f), file_digest(f)] for f in resolve_files(source)]
    return entry


def _open_file(path: str) -> IO[bytes]:
    """The file opened for reading; one that cannot be is a SourceError naming it and the fix."""
    try:
        return open(path, "rb")
    except OSError as e:
        fix = "give a file, not a folder" if isinstance(e, IsADirectoryError) else "fix its permissions or path"
        raise SourceError(f"{path}: cannot read it ({e.strerror or e}): {fix}") from None


def _open_binary(path: str) -> IO[bytes]:
    """The file's bytes, decompressed for .gz and .zst."""
    if path.endswith(".gz"):
        raw = _Decompressed(_open_file(path), lambda: zlib.decompressobj(wbits=31))
    elif path.endswith((".zst", ".zstd")):
        import zstandard

        raw = _Decompressed(_open_file(path), lambda: zstandard.ZstdDecompressor().decompressobj())
    else:
        return _open_file(path)
    return io.BufferedReader(raw, buffer_size=JSONL_BLOCK_BYTES)


def _check_complete(f: IO[bytes], path: str, line: int, bad: BadInputLog) -> bool:
    """Count (or with strict, raise) a compressed stream that broke before its end; whether it was whole. `line`:
    the first line not read."""
    broken = getattr(f.raw, "broken", None) if isinstance(f, io.BufferedReader) else None
    if broken:
        bad.add("broken_file", f"{path}:{line}", f"{broken}; the lines before it are kept (re-download or "
                "recompress the file to read the rest)")
    return broken is None


def _decoded_lines(path: str, bad: BadInputLog, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line from first_line on decoding as UTF-8; the others are counted as
    invalid_utf8."""
    number = 0
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n") and getattr(f.raw, "broken", None):
                number -= 1  # the line the stream broke in is part of what is lost
                break
            if number < first_line:
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.add("invalid_utf8", f"{path}:{number}", f"byte {e.start}: {e.reason}")
        _check_complete(f, path, number + 1, bad)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value) and not value.isspace()


def _count_not_text(value: object, text_field: str, where: str, bad: BadInputLog) -> None:
    """Count why a record's text field is not a document (missing, not a string, or empty)."""
    if isinstance(value, str):
        bad.add("empty_doc", where, f"field '{text_field}' is empty")
        return
    detail = (f"no field '{text_field}'" if value is None
              else f"field '{text_field}' is {type(value).__name__}, not a string")
    bad.add("missing_text_field", where, f"{detail} (set text_field in the source config)")


def _skip_lines(f: IO[bytes], lines: int) -> bytes:
    """Reads past the first `lines` lines of f without parsing them; the bytes read after them."""
    while chunk := f.read(JSONL_BLOCK_BYTES):
        count = chunk.count(b"\n")
        if count >= lines:
            cut = -1
            for _ in range(lines):
                cut = chunk.index(b"\n", cut + 1)
            return chunk[cut + 1:] or f.read(JSONL_BLOCK_BYTES)
        lines -= count
    return b""


def _line_blocks(path: str, bad: BadInputLog, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, whole lines) for consecutive blocks of about JSONL_BLOCK_BYTES, from
    first_line on (the lines before it are only counted, which costs a small part of parsing them)."""
    first, tail = first_line, b""
    with _open_binary(path) as f:
        chunk = _skip_lines(f, first_line - 1)
        while chunk:
            block = tail + chunk
            cut = block.rfind(b"\n") + 1
            block, tail = block[:cut], block[cut:]
            if block:
                yield first, block
                first += block.count(b"\n")
            chunk = f.read(JSONL_BLOCK_BYTES)
        if not _check_complete(f, path, first, bad):
            return  # the unfinished line the stream broke in is part of what is lost
    if tail:
        yield first, tail


def _arrow_column(block: bytes, text_field: str) -> list | None:
    """The text field of each line of a block through Arrow's JSON reader, or None when a line needs the
    exact parser to name it (Arrow rejects it, or a blank line that Arrow would skip silently)."""
    import pyarrow as pa
    import pyarrow.json as pj

    options = pj.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]),
                              unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(io.BytesIO(block), parse_options=options,
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1))
        lines = block.count(b"\n") + (not block.endswith(b"\n"))
        return table.column(0).to_pylist() if table.num_rows == lines else None
    except (pa.ArrowException, ValueError):  # a line Arrow cannot take (bad UTF-8 shows on conversion)
        return None


def _parsed_lines(block: bytes, first: int, path: str, text_field: str, bad: BadInputLog
                  ) -> Iterator[tuple[int, object]]:
    """(line number, text field value) of each JSON object line; other lines are counted as bad input."""
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    for number, raw in enumerate(lines, first):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add("invalid_utf8", where, f"byte {e.start}: {e.reason}")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add("malformed_json", where, "blank line" if not line.strip() else f"{e.msg} (column {e.colno})")
            continue
        if not isinstance(record, dict):
            bad.add("malformed_json", where, f"a JSON {type(record).__name__}, not an object")
            continue
        value = record.get(text_field)
        if isinstance(value, str) and "\\u" in line:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                bad.add("invalid_utf8", where, f"character {e.start}: an escaped lone surrogate is not text")
                continue
        yield number, value


def _read_jsonl(path: str, source: SourceConfig, bad: BadInputLog, first_line: int) -> Iterator[Document]:
    """JSON Lines a block at a time: Arrow's fast reader for blocks that parse cleanly, the exact
    line-by-line parser (which names each bad line) for the others. Both give the same documents."""
    key = source.text_field
    for first, block in _line_blocks(path, bad, first_line):
        values = _arrow_column(block, key)
        numbered = enumerate(values, first) if values is not None else _parsed_lines(block, first, path, key, bad)
        for number, value in numbered:
            if _is_text(value):
                yield Document(value, source.name, path, number)
            else:
                _count_not_text(value, key, f"{path}:{number}", bad)


def is_chat(source: SourceConfig) -> bool:
    """Whether a source is read as conversations: format chat, or auto with a first JSON Lines file whose first
    object has a `messages` list and no text_field."""
    if source.format != "auto":
        return source.format == "chat"
    first = resolve_files(source)[0]
    if detect_format(first) != "jsonl":
        return False
    record = next(_first_objects(first), {})
    return isinstance(record.get(MESSAGES), list) and source.text_field not in record


def _read_chat(path: str, source: SourceConfig, bad: BadInputLog, first_line: int) -> Iterator[Document]:
    """JSON Lines of conversations (data/chat.py): a line without a list of {role, content} messages, with an
    unknown role or a content that is not a string is counted (or with strict, raised) by file and line."""
    for first, block in _line_blocks(path, bad, first_line):
        for number, value in _parsed_lines(block, first, path, MESSAGES, bad):
            reason, detail = check_messages(value)
            if reason:
                bad.add(reason, f"{path}:{number}", detail)
                continue
            messages = [(m["role"], m["content"]) for m in value]
            yield Document("\n".join(content for _, content in messages), source.name, path, number, messages)


def _read_text(path: str, source: SourceConfig, bad: BadInputLog, first_line: int) -> Iterator[Document]:
    """Plain text: one document per line, per blank-line-separated paragraph, or per file (text_unit)."""
    unit = source.text_unit
    if unit == "line":
        for number, line in _decoded_lines(path, bad, first_line):
            text = line.rstrip("\r\n")
            if text.strip():
                yield Document(text, source.name, path, number)
        return
    lines: list[str] = []
    start = first_line
    for number, line in _decoded_lines(path, bad, first_line):
        if unit == "paragraph" and not line.strip():
            if lines:
                yield Document("".join(lines).rstrip("\r\n"), source.name, path, start)
            lines = []
            continue
        if not lines:
            start = number
        lines.append(line)
    text = "".join(lines)
    if unit == "paragraph" and lines:
        yield Document(text.rstrip("\r\n"), source.name, path, start)
    elif unit == "document":
        if text.strip():
            yield Document(text, source.name, path, 1)
        else:
            bad.add("empty_doc", f"{path}:1", "the file has no text")


def _read_table(path: str, source: SourceConfig, bad: BadInputLog, first_line: int, kind: str
                ) -> Iterator[Document]:
    """CSV or TSV: a header row naming the columns, then one document a row from column `text_field` (a quoted
    field may span lines; a row is numbered by the line it starts on)."""
    read_to = [0]  # the last line the csv reader has taken

    def lines() -> Iterator[str]:
        for number, line in _decoded_lines(path, bad):
            read_to[0] = number
            yield line

    csv.field_size_limit(1 << 30)  # a document may be longer than the module's default 128 KiB field
    rows = csv.reader(lines(), dialect=TABLE_DIALECTS[kind])
    try:
        header = next(rows, [])
        if source.text_field not in header:
            raise SourceError(f"{path}: no column '{source.text_field}' in the header row (columns: "
                              f"{', '.join(header) or 'none'}); set text_field in data source '{source.name}'")
        column = header.index(source.text_field)
        start = read_to[0] + 1
        for row in rows:
            number, start = start, read_to[0] + 1
            if number < first_line or not row:  # before the resume point, or a blank line
                continue
            where = f"{path}:{number}"
            if len(row) <= column:
                bad.add("missing_text_field", where, f"{len(row)} fields, no column '{source.text_field}' "
                        f"(column {column + 1} of the header)")
            elif _is_text(row[column]):
                yield Document(row[column], source.name, path, number)
            else:
                _count_not_text(row[column], source.text_field, where, bad)
    except csv.Error as e:
        raise SourceError(f"{path}:{read_to[0]}: not valid {kind.upper()} ({e}); fix the file or set the "
                          f"format of data source '{source.name}'") from None


def _first_objects(path: str, lines: int = 100) -> Iterator[dict]:
    """The JSON objects among the first lines of a JSON Lines file."""
    for _, line in itertools.islice(_decoded_lines(path, BadInputLog()), lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def _fields_seen(path: str) -> list[str]:
    """The keys of the first JSON objects of a JSON Lines file (for an error naming what text_field could be)."""
    seen: dict[str, None] = {}
    for record in _first_objects(path):
        seen.update(dict.fromkeys(record))
    return list(seen)


def _read_rows(rows: Iterator[object], label: str, source: SourceConfig, bad: BadInputLog, first_row: int
               ) -> Iterator[Document]:
    """The documents of rows numbered from first_row."""
    for number, value in enumerate(rows, first_row):
        if _is_text(value):
            yield Document(value, source.name, label, number)
        else:
            _count_not_text(value, source.text_field, f"{label}:{number}", bad)


def _parquet_column(path: str, source: SourceConfig, first_row: int) -> Iterator[object]:
    """The text column from first_row on (row groups before it are not read)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if source.text_field not in names:
        raise SourceError(f"{path}: no column '{source.text_field}' (columns: {', '.join(names)}); "
                          f"set text_field in data source '{source.name}'")
    groups, skip = list(range(pf.num_row_groups)), first_row - 1
    while groups and skip >= (rows := pf.metadata.row_group(groups[0]).num_rows):
        skip -= rows
        groups.pop(0)
    for batch in pf.iter_batches(batch_size=8192, columns=[source.text_field], row_groups=groups):
        column = batch.column(0)[skip:]
        skip = max(0, skip - batch.num_rows)
        yield from column.to_pylist()


def _hf_column(source: SourceConfig) -> Iterator[object]:
    import datasets

    path = os.path.expanduser(source.path)
    is_saved = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json"))
    try:
        if is_saved:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.hf_split]
        else:
            ds = datasets.load_dataset(path, source.hf_config, split=source.hf_split, streaming=True)
    except KeyError:
        raise SourceError(f"data source '{source.name}': Hugging Face dataset '{path}' has no split "
                          f"'{source.hf_split}' (set hf_split)") from None
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise SourceError(f"data source '{source.name}': cannot load Hugging Face dataset '{path}' "
                          f"(offline: give a local folder or a cached name): {str(e).splitlines()[0]}") from None
    columns = ds.column_names or []
    if columns and source.text_field not in columns:
        raise SourceError(f"data source '{source.name}': Hugging Face dataset '{path}' has no column "
                          f"'{source.text_field}' (columns: {', '.join(columns)}); set text_field")
    for row in ds:
        yield row.get(source.text_field)


def _file_documents(path: str, source: SourceConfig, bad: BadInputLog, first_line: int, chat: bool
                    ) -> Iterator[Document]:
    kind = source.format if source.format != "auto" else detect_format(path)
    if chat:
        return _read_chat(path, source, bad, first_line)
    if kind == "jsonl":
        return _read_jsonl(path, source, bad, first_line)
    if kind in TABLE_DIALECTS:
        return _read_table(path, source, bad, first_line, kind)
    if kind == "text":
        if (table := detect_format(path)) in TABLE_DIALECTS:
            log.warning("%s: read as plain text, one document a line with every column in it (format: text); "
                        "set format: %s and text_field: COLUMN to read one column", path, table)
        return _read_text(path, source, bad, first_line)
    if kind == "parquet":
        return _read_rows(_parquet_column(path, source, first_line), path, source, bad, first_line)
    raise SourceError(f"data source '{source.name}': cannot tell the format of '{path}' from its suffix "
                      f"(set format: jsonl | csv | tsv | text | parquet | hf)")


def iter_documents(source: SourceConfig, strict: bool = False, bad: BadInputLog | None = None,
                   start: tuple[int, int] = (0, 1)) -> Iterator[Document]:
    """Every document of a source in a fixed order (files sorted), at most `source.max_docs` of them.

    Bad lines are counted in `bad` (a fresh log when None) and skipped, or raise with `strict`. A source
    that exists but yields no document at all is an error, as is a missing file. `start` (file number in
    that order, its line or row number) begins the reading at a document an earlier reading gave as (the
    number of doc.file in resolve_files(source), doc.line): the files before it are not opened, the lines before
    it are not parsed, and max_docs counts from it.
    """
    bad = bad if bad is not None else BadInputLog(strict=strict)
    bad.strict = bad.strict or strict
    if source.max_docs is not None and source.max_docs <= 0:
        return
    if source.format == "hf":
        rows = itertools.islice(_hf_column(source), start[1] - 1, None)
        streams: Iterator[Iterator[Document]] = iter(
            [_read_rows(rows, f"hf:{source.path}[{source.hf_split}]", source, bad, start[1])])
    else:
        files, chat = resolve_files(source)[start[0]:], is_chat(source)
        streams = (_file_documents(path, source, bad, start[1] if i == 0 else 1, chat)
                   for i, path in enumerate(files))
    count = 0
    for stream in streams:
        for doc in stream:
            yield doc
            count += 1
            if source.max_docs is not None and count >= source.max_docs:
                return
    if count == 0:
        fields = ""
        if bad.counts["missing_text_field"] and source.format != "hf":
            first = resolve_files(source)[start[0]]
            if (source.format if source.format != "auto" else detect_format(first)) == "jsonl":
                fields = f" (fields seen in {first}: {', '.join(_fields_seen(first)) or 'none'})"
        raise SourceError(f"data source '{source.name}': no documents in '{source.path}' "
                          f"({bad.summary()}); check the path and text_field '{source.text_field}'{fields}")
    if bad.counts:
        log.warning("data source '%s': skipped %s", source.name, bad.summary())
