"""Columnar record files: Parquet and Arrow IPC (file or stream format, as `datasets.save_to_disk` writes).

`scan` reads only metadata: the Parquet footer (row groups and their row counts), or the message headers of
an Arrow file (each record batch's byte range and row count, found by walking the messages and skipping
their bodies). Every row becomes a manifest row pointing at its row group / record batch; its version is
the file's etag, so a rewritten file is ingested again as a whole. `read` fetches the row groups (Parquet,
only their column chunks) or record batch messages (Arrow, one ranged GET each) that hold the wanted rows.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from streamtune.shards.index import decode_batch

BLOCK = 1 << 20
BATCH = 65536
_RECORD_BATCH, _DICTIONARY_BATCH, _SCHEMA = 3, 2, 1


def _u32(buf: bytes, at: int) -> int:
    return struct.unpack_from("<I", buf, at)[0]


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Absolute position of field `index` of the flatbuffer table at `table` (None when absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vt_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vt_size:
        return None
    off = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + off if off else None


def message_info(meta: bytes) -> tuple[int, int, int]:
    """(header type, body length, rows) of an Arrow IPC `Message` flatbuffer (rows only for record
    batches). Reading these few fields by hand lets a scan skip message bodies."""
    root = _u32(meta, 0)
    at = _field(meta, root, 1)
    kind = meta[at] if at is not None else 0
    at = _field(meta, root, 3)
    body = struct.unpack_from("<q", meta, at)[0] if at is not None else 0
    rows = 0
    at = _field(meta, root, 2)
    if kind == _RECORD_BATCH and at is not None:
        header = at + _u32(meta, at)
        at = _field(meta, header, 0)
        rows = struct.unpack_from("<q", meta, at)[0] if at is not None else 0
    return kind, body, rows


def ipc_messages(f) -> Iterator[tuple[int, int, int, int]]:
    """(offset, length, header type, rows) of every message of an Arrow IPC file or stream; `length` spans
    prefix, metadata and body, the unit `streamtune.shards.decode_batch` reads."""
    f.seek(0)
    start = 8 if f.read(6) == b"ARROW1" else 0
    pos = start
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 4:
            return
        (first,) = struct.unpack_from("<I", head, 0)
        if first == 0xFFFFFFFF:
            if len(head) < 8:
                return
            prefix, (meta_len,) = 8, struct.unpack_from("<i", head, 4)
        else:  # pre-1.0 streams: no continuation marker
            prefix, meta_len = 4, first
        if meta_len <= 0:
            return
        f.seek(pos + prefix)
        meta = f.read(meta_len)
        kind, body, rows = message_info(meta)
        yield pos, prefix + meta_len + body, kind, rows
        pos += prefix + meta_len + body


def _open(fs, path: str, block: int = BLOCK):
    return fs.open(path, "rb", block_size=block)


def hf_features(schema: pa.Schema) -> dict | None:
    """The `features` a Hugging Face dataset stores in its Arrow schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        return None
    features = (info.get("info") or {}).get("features")
    return features if isinstance(features, dict) else None


def read_schema(fs, path: str, fmt: str) -> pa.Schema:
    with _open(fs, path) as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow
        for offset, length, kind, _ in ipc_messages(f):
            if kind == _SCHEMA:
                f.seek(offset)
                return pa.ipc.read_schema(pa.py_buffer(f.read(length)))
    raise ValueError(f"{path}: no Arrow schema message")


def units(fs, path: str, fmt: str) -> list[dict]:
    """Row groups (Parquet) or record batches (Arrow) in file order: {rows, bytes, offset, length}.
    Arrow units carry the byte range of their message, except in files with dictionary batches (those are
    read with pyarrow's own reader, front to back)."""
    with _open(fs, path) as f:
        if fmt == "parquet":
            md = pq.ParquetFile(f).metadata
            return [
                {"rows": md.row_group(i).num_rows, "bytes": md.row_group(i).total_byte_size}
                for i in range(md.num_row_groups)
            ]
        out, dictionary = [], False
        for offset, length, kind, rows in ipc_messages(f):
            dictionary |= kind == _DICTIONARY_BATCH
            if kind == _RECORD_BATCH:
                out.append({"rows": rows, "bytes": length, "offset": offset, "length": length})
        if dictionary:  # batches need the dictionaries before them: no reading by range
            for u in out:
                u["offset"] = u["length"] = None
        return out


def scan(
    fs, path: str, key: str, etag: str, fmt: str, id_column: str | None
) -> Iterator[tuple[dict, list[dict]]]:
    """Manifest columns of a columnar record file (see streamtune.records.scan)."""
    from streamtune.records import fields, record_key

    cols = _empty()
    problems: list[dict] = []
    seen: set[str] = set()
    row = 0
    for b, unit in enumerate(units(fs, path, fmt)):
        ids = None
        if id_column:
            ids = _column(fs, path, fmt, b, unit, id_column)
        per_row = max(1, unit["bytes"] // max(unit["rows"], 1))
        for j in range(unit["rows"]):
            rid = str(row)
            if ids is not None:
                rid, error = fields.record_id({id_column: ids[j]}, id_column, None, seen)
                if error:
                    problems.append(fields.problem(record_key(key, row), row, None, error, stage="manifest"))
                    row += 1
                    continue
            for name, value in (
                ("id", rid), ("row", row), ("batch", b), ("batch_row", j), ("size", per_row), ("etag", etag),
                ("offset", unit.get("offset")), ("length", unit.get("length")),
            ):  # fmt: skip
                cols[name].append(value)
            row += 1
            if len(cols["id"]) >= BATCH:
                yield cols, problems
                cols, problems = _empty(), []
    yield cols, problems


def _empty() -> dict[str, list]:
    return {n: [] for n in ("id", "row", "batch", "batch_row", "size", "etag", "offset", "length")}


def _column(fs, path: str, fmt: str, b: int, unit: dict, name: str) -> list:
    table = _unit_table(fs, path, fmt, b, unit, None, columns=[name])
    if name not in table.column_names:
        return [None] * unit["rows"]
    return table.column(name).to_pylist()


def _unit_table(fs, path, fmt, b, unit, schema, columns=None) -> pa.Table:
    if fmt == "parquet":
        with _open(fs, path, 8 << 20) as f:
            pf = pq.ParquetFile(f)
            names = [c for c in columns or pf.schema_arrow.names if c in pf.schema_arrow.names]
            return pf.read_row_group(b, columns=names)
    if unit.get("offset") is None:
        with _open(fs, path, 8 << 20) as f:
            reader = _ipc_reader(f)
            for i, batch in enumerate(reader):
                if i == b:
                    return pa.Table.from_batches([batch])
        raise ValueError(f"{path}: record batch {b} is gone")
    schema = schema or read_schema(fs, path, fmt)
    data = fs.cat_file(path, start=unit["offset"], end=unit["offset"] + unit["length"])
    table = pa.Table.from_batches([decode_batch(data, schema)])
    return table.select([c for c in columns if c in table.column_names]) if columns else table


def _ipc_reader(f):
    f.seek(0)
    if f.read(6) == b"ARROW1":
        f.seek(0)
        reader = pa.ipc.open_file(f)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    f.seek(0)
    return iter(pa.ipc.open_stream(f))


def read(fs, path: str, fmt: str, rows: list[dict]) -> Iterator[tuple[dict, dict | None, str | None]]:
    """(manifest row, record, None) for `rows`, one row group / record batch in memory at a time."""
    schema = read_schema(fs, path, fmt)
    by_unit: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_unit[r["batch"]].append(r)
    for b in sorted(by_unit):
        group = by_unit[b]
        unit = {"offset": group[0]["offset"], "length": group[0]["length"], "rows": None}
        table = _unit_table(fs, path, fmt, b, unit, schema)
        picked = table.take(pa.array([r["batch_row"] for r in group], pa.int64())).to_pylist()
        for r, record in zip(group, picked, strict=True):
            yield r, record, None
