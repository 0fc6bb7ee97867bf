"""Text record files: JSONL (one object per line), JSON arrays, CSV and TSV; optionally .gz / .zst.

`scan` reads a file once, front to back, in 8 MiB pieces and notes where every record starts and ends
(byte offset and length in the uncompressed text, starting line) plus a digest of its bytes (its version).
`read` fetches records back by those byte ranges: one ranged GET per run of nearby records for plain files;
compressed files are decompressed from the start and the bytes before the wanted records skipped.
A CSV record may span lines (a quoted field with newlines): a record ends at the first newline after an
even number of quote characters.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator

import pyarrow as pa
import xxhash

CHUNK = 8 << 20
MAX_GAP = 1 << 20  # records closer than this are fetched with one ranged read
MAX_SPAN = 16 << 20
MAX_ELEMENT = 256 << 20  # a JSON array element larger than this is treated as broken
BATCH = 65536  # manifest rows per chunk
_WS = re.compile(r"[ \t\n\r]*")


class BrokenFile(ValueError):
    """The rest of a JSON array cannot be read (an element does not parse)."""


def open_text(fs, path: str, compression: str | None):
    """A readable binary stream of the file's uncompressed bytes."""
    f = fs.open(path, "rb", block_size=CHUNK)
    return pa.CompressedInputStream(f, compression) if compression else f


def lines(stream) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, line without its newline) of every line."""
    offset, number, rest = 0, 0, b""
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            yield offset, number, part
            offset += len(part) + 1
    if rest:
        yield offset, number + 1, rest


def records(stream, fmt: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(offset, line, length, bytes) of every record; CSV/TSV skip the header record."""
    if fmt == "json":
        for _, offset, length, data in array_elements(stream):
            yield offset, 0, length, data
        return
    pending: list[bytes] = []
    start = first = quotes = 0
    header = fmt in ("csv", "tsv")
    for offset, number, line in lines(stream):
        if not pending:
            if not line.strip():
                continue
            start, first, quotes = offset, number, 0
        pending.append(line)
        if fmt == "csv":
            quotes += line.count(b'"')
            if quotes % 2:
                continue  # a quoted field goes on on the next line
        data = b"\n".join(pending) if len(pending) > 1 else pending[0]
        pending = []
        if header:
            header = False
            continue
        yield start, first, len(data), data
    if pending:
        data = b"\n".join(pending)
        if not header:
            yield start, first, len(data), data


def array_elements(stream) -> Iterator[tuple[int, int, int, bytes]]:
    """(index, byte offset, byte length, bytes) of every element of a JSON array, read incrementally.
    Raises BrokenFile (with the element's index and offset) when the array stops parsing."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, byte_at, eof = "", 0, 0, False
    index, state = 0, "start"

    def more() -> None:
        nonlocal buf, pos, eof
        chunk = stream.read(CHUNK)
        eof = not chunk
        try:
            buf = buf[pos:] + utf8.decode(chunk, final=eof)
        except UnicodeDecodeError as e:
            raise BrokenFile(f"element {index} at byte {byte_at}: not UTF-8 ({e.reason})") from e
        pos = 0

    def skip_ws() -> None:
        nonlocal pos, byte_at
        while True:
            end = _WS.match(buf, pos).end()
            byte_at += end - pos  # whitespace is ASCII
            pos = end
            if pos < len(buf) or eof:
                return
            more()

    more()
    if buf.startswith("\ufeff"):
        pos, byte_at = 1, 3
    while True:
        skip_ws()
        if pos >= len(buf):
            raise BrokenFile(f"element {index} at byte {byte_at}: the array is not closed")
        ch = buf[pos]
        if state == "start":
            if ch != "[":
                raise BrokenFile("not a JSON array")
            pos, byte_at, state = pos + 1, byte_at + 1, "first"
            continue
        if state in ("first", "next") and ch == "]":
            return
        if state == "after":
            if ch == "]":
                return
            if ch != ",":
                raise BrokenFile(f"element {index} at byte {byte_at}: expected ',' or ']', found {ch!r}")
            pos, byte_at, state = pos + 1, byte_at + 1, "next"
            continue
        try:
            _, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a number may go on in the next piece
                raise json.JSONDecodeError("incomplete", buf, end)
        except json.JSONDecodeError as e:
            if not eof and len(buf) - pos < MAX_ELEMENT:
                more()
                continue
            raise BrokenFile(f"element {index} at byte {byte_at}: {e.msg}") from e
        data = buf[pos:end].encode()
        yield index, byte_at, len(data), data
        index, pos, byte_at, state = index + 1, end, byte_at + len(data), "after"


def scan(
    fs, path: str, key: str, fmt: str, compression: str | None, id_column: str | None
) -> Iterator[tuple[dict, list[dict]]]:
    """Manifest columns of a text record file, BATCH records at a time (see streamtune.records.scan)."""
    from streamtune.records import fields, record_key

    stream = open_text(fs, path, compression)
    header = read_header(fs, path, fmt, compression) if id_column and fmt in ("csv", "tsv") else None
    cols = _empty()
    problems: list[dict] = []
    ids: set[str] = set()
    row = 0
    try:
        for offset, line, length, data in records(stream, fmt):
            rid = str(row)
            if id_column:
                record, error = parse(fmt, data, line, row, header)
                rid, error = fields.record_id(record, id_column, error, ids)
                if error:
                    problems.append(fields.problem(record_key(key, row), row, line, error, stage="manifest"))
                    row += 1
                    continue
            for name, value in (
                ("id", rid), ("row", row), ("line", line or None), ("offset", offset), ("length", length),
                ("etag", xxhash.xxh3_64_hexdigest(data)),
            ):  # fmt: skip
                cols[name].append(value)
            row += 1
            if len(cols["id"]) >= BATCH:
                yield cols, problems
                cols, problems = _empty(), []
    except BrokenFile as e:
        problems.append(
            fields.problem(
                record_key(key, row), row, None, f"{e}; the rest of the file is left out", stage="manifest"
            )
        )
    finally:
        stream.close()
    yield cols, problems


def _empty() -> dict[str, list]:
    return {name: [] for name in ("id", "row", "line", "offset", "length", "etag")}


def read_header(fs, path: str, fmt: str, compression: str | None) -> list[str]:
    """Column names of a CSV/TSV file (its first record)."""
    stream = open_text(fs, path, compression)
    try:
        pending: list[bytes] = []
        quotes = 0
        for _, _, line in lines(stream):
            if not pending and not line.strip():
                continue
            pending.append(line)
            quotes += line.count(b'"') if fmt == "csv" else 0
            if quotes % 2 == 0:
                break
    finally:
        stream.close()
    text = b"\n".join(pending).decode("utf-8-sig").rstrip("\r")
    return next(csv.reader(io.StringIO(text), **_dialect(fmt)), [])


def _dialect(fmt: str) -> dict:
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}


def parse(
    fmt: str, data: bytes, line: int, row: int, header: list[str] | None
) -> tuple[dict | None, str | None]:
    """(record, None) or (None, error with the line or element number)."""
    where = f"line {line}" if line else f"element {row}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 ({e.reason} at byte {e.start})"
    if fmt in ("jsonl", "json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"{where}, column {e.colno}: {e.msg}" if e.lineno == 1 else f"{where}: {e}"
        if not isinstance(value, dict):
            return None, f"{where}: a JSON {type(value).__name__}, not an object"
        return value, None
    cells = next(csv.reader(io.StringIO(text.rstrip("\r")), **_dialect(fmt)), [])
    if header is None or len(cells) != len(header):
        return None, f"{where}: {len(cells)} fields, the header has {len(header or [])}"
    return dict(zip(header, cells, strict=True)), None


def _spans(rows: list[dict]) -> list[tuple[int, int, list[dict]]]:
    """Rows sorted by offset, cut into runs read with one ranged GET each: (start, end, rows)."""
    spans: list[tuple[int, int, list[dict]]] = []
    for r in sorted(rows, key=lambda r: r["offset"]):
        end = r["offset"] + r["length"]
        if spans and r["offset"] - spans[-1][1] <= MAX_GAP and end - spans[-1][0] <= MAX_SPAN:
            start, stop, group = spans[-1]
            group.append(r)
            spans[-1] = (start, max(end, stop), group)
        else:
            spans.append((r["offset"], end, [r]))
    return spans


def read(
    fs, path: str, fmt: str, compression: str | None, rows: list[dict]
) -> Iterator[tuple[dict, dict | None, str | None]]:
    header = read_header(fs, path, fmt, compression) if fmt in ("csv", "tsv") else None
    stream = open_text(fs, path, compression) if compression else None
    at = 0  # position of `stream` in the uncompressed bytes
    try:
        for start, end, group in _spans(rows):
            if stream is None:
                data = fs.cat_file(path, start=start, end=end)
            else:  # no random access: decompress forward, skipping the bytes before the span
                _skip(stream, start - at)
                data = stream.read(end - start)
                at = end
            for r in group:
                piece = data[r["offset"] - start : r["offset"] - start + r["length"]]
                if len(piece) != r["length"]:
                    where = f"line {r['line']}" if r["line"] else f"element {r['row']}"
                    yield r, None, f"{where}: the file is shorter than when it was listed"
                    continue
                record, error = parse(fmt, piece, r["line"] or 0, r["row"], header)
                yield r, record, error
    finally:
        if stream is not None:
            stream.close()


def _skip(stream, n: int) -> None:
    while n > 0:
        got = len(stream.read(min(n, CHUNK)))
        if not got:
            return
        n -= got
