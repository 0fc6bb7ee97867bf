"""Write Arrow IPC shard files whose record batches can each be fetched with one ranged GET."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtune import storage
from streamtune.shards import ipc
from streamtune.shards.format import INDEX_NAME, MEDIA_COLUMNS, ShardError, checksum, shard_name
from streamtune.shards.index import commit_index, read_index

CODECS = ("zstd", "lz4")


def row_nbytes(table: pa.Table) -> np.ndarray:
    """Approximate encoded size of every row: exact for binary/string columns, average for the rest."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    if table.num_rows == 0:
        return sizes
    for col in table.columns:
        t = col.type
        if (
            pa.types.is_binary(t)
            or pa.types.is_string(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_large_string(t))
        ):
            lengths = pc.fill_null(pc.binary_length(col), 0).to_numpy()
            sizes += lengths.astype(np.int64) + 8
        else:
            sizes += max(1, col.nbytes // table.num_rows)
    return sizes


def split_rows(sizes: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Cut rows into consecutive [start, stop) runs of about `limit` bytes (at least one row each)."""
    runs, start, acc = [], 0, 0
    for i, s in enumerate(sizes.tolist()):
        if i > start and acc + s > limit:
            runs.append((start, i))
            start, acc = i, 0
        acc += s
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


def compression_plan(
    table: pa.Table, compression: dict[str, str | None] | str | None
) -> tuple[str | None, list[str]]:
    """(codec of the file, columns stored uncompressed) for a compression setting.

    "auto" asks zstd for text/JSON/list/numeric columns and nothing for media columns (already-compressed
    audio/images). A dict maps column -> codec or None (unlisted columns: None). Arrow compresses with
    one codec per record batch, but single buffers may opt out, so "no codec" columns are honoured exactly
    when they are binary/string; otherwise wishes are resolved by byte share.
    """
    if compression is None or isinstance(compression, str) and compression != "auto":
        if compression is not None and compression not in CODECS:
            raise ValueError(f"compression must be 'auto', None, {CODECS} or a dict, not {compression!r}")
        return compression, []
    if compression == "auto":
        wishes = {f.name: None if _is_media(f) else "zstd" for f in table.schema}
    else:
        unknown = set(compression) - set(table.schema.names)
        if unknown:
            raise ValueError(f"compression names unknown columns: {sorted(unknown)}")
        bad = {c for c in compression.values() if c is not None and c not in CODECS}
        if bad:
            raise ValueError(f"unknown codecs {sorted(bad)}; use {CODECS} or None")
        wishes = {name: compression.get(name) for name in table.schema.names}
    share: dict[str | None, int] = {}
    for name, codec in wishes.items():
        share[codec] = share.get(codec, 0) + table.column(name).nbytes
    codecs = {c: n for c, n in share.items() if c is not None}
    if not codecs:
        return None, []
    codec = max(codecs, key=codecs.__getitem__)
    raw = [name for name, c in wishes.items() if c is None]
    # an all-null non-binary column (no references in this shard) has nothing to keep raw
    raw = [
        n
        for n in raw
        if _is_varlen(table.schema.field(n).type) or table.column(n).null_count < table.num_rows
    ]
    raw_ok = all(_is_varlen(table.schema.field(name).type) for name in raw) and ipc.supported(table.schema)
    if raw and raw_ok:
        return codec, raw
    return max(share.items(), key=lambda kv: (kv[1], kv[0] is not None))[0], []


def _is_varlen(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_string(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_large_string(t)
    )


def _is_media(field: pa.Field) -> bool:
    t = field.type
    return field.name in MEDIA_COLUMNS or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _plain_types(table: pa.Table) -> pa.Table:
    """Dictionary columns are stored decoded: a batch must be decodable without earlier messages."""
    if not any(pa.types.is_dictionary(f.type) for f in table.schema):
        return table
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names)


def encode_shard(
    table: pa.Table, *, batch_bytes: int = 8 << 20, compression: dict[str, str | None] | str | None = "auto"
) -> tuple[bytes, dict]:
    """Serialize `table` as one Arrow IPC file; return (file bytes, index entry without "path")."""
    table = _plain_types(table)
    codec, raw = compression_plan(table, compression)
    runs = split_rows(row_nbytes(table), batch_bytes)
    record_batches = [_one_batch(table.slice(start, stop - start)) for start, stop in runs]
    nbytes = [b.nbytes for b in record_batches]
    if raw and record_batches:
        data = pa.py_buffer(ipc.write_mixed_file(record_batches, set(raw), codec))
    else:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
            for batch in record_batches:
                writer.write_batch(batch)
        data = sink.getvalue()
    batches = list(_batch_messages(data))
    if len(batches) != len(runs):
        raise ShardError(f"expected {len(runs)} record batches in the shard, found {len(batches)}")
    for b, (start, stop), size in zip(batches, runs, nbytes, strict=True):
        b["rows"] = stop - start
        b["nbytes"] = size  # decoded size: what a reader holds in memory
        b["checksum"] = checksum(memoryview(data)[b["offset"] : b["offset"] + b["length"]])
    entry = {
        "bytes": data.size,
        "rows": table.num_rows,
        "checksum": checksum(memoryview(data)),
        "compression": codec,
        "uncompressed_columns": raw,
        "batches": batches,
    }
    return data.to_pybytes(), entry


def _batch_messages(data: pa.Buffer):
    """Byte offset, length and rows of every record batch message in an IPC file buffer."""
    magic = 8  # "ARROW1" + 2 bytes padding; the stream format follows
    source = pa.BufferReader(data.slice(magic))
    reader = pa.ipc.MessageReader.open_stream(source)
    while True:
        start = source.tell()
        try:
            message = reader.read_next_message()
        except StopIteration:
            return
        if message.type == "dictionary batch":
            raise ShardError("dictionary batches are not supported in shards")
        if message.type == "record batch":
            yield {"offset": magic + start, "length": source.tell() - start}


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def write_shard(
    table: pa.Table,
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    batch_bytes: int = 8 << 20,
    compression: dict[str, str | None] | str | None = "auto",
) -> dict:
    """Write `table` as one Arrow IPC file object at `url`; return its index entry."""
    data, entry = encode_shard(table, batch_bytes=batch_bytes, compression=compression)
    storage.write_bytes(url, data, storage_options)
    return {"path": url.rstrip("/").rsplit("/", 1)[-1], **entry}


class ShardSetWriter:
    """Stream rows or tables in; shards roll over at `max_shard_bytes` / `max_shard_rows`.

    `close()` writes index.json last (the commit point) and returns it. With `append=True` the shards
    already listed in an existing index are kept and numbering continues after `start_index`.
    """

    def __init__(
        self,
        prefix_url: str,
        schema: pa.Schema,
        storage_options: dict[str, Any] | None = None,
        *,
        max_shard_bytes: int = 64 << 20,
        max_shard_rows: int | None = None,
        start_index: int = 0,
        append: bool = False,
        **write_kwargs: Any,
    ):
        self.prefix_url = prefix_url
        self.schema = schema
        self.storage_options = storage_options
        self.max_shard_bytes = max_shard_bytes
        self.max_shard_rows = max_shard_rows
        self.next_index = start_index
        self.write_kwargs = write_kwargs
        self.entries: list[dict] = []
        if append and storage.exists(storage.join(prefix_url, INDEX_NAME), storage_options):
            self.entries = list(read_index(prefix_url, storage_options)["shards"])
        self._pending: list[pa.Table] = []
        self._pending_rows: list[dict] = []
        self._pending_bytes = 0
        self._pending_count = 0
        self._closed = False

    def write(self, table_or_row: pa.Table | pa.RecordBatch | dict | list[dict]) -> None:
        if self._closed:
            raise ShardError("ShardSetWriter is closed")
        if isinstance(table_or_row, dict):
            table_or_row = [table_or_row]
        if isinstance(table_or_row, list):
            self._pending_rows.extend(table_or_row)
            self._pending_count += len(table_or_row)
            self._pending_bytes += sum(_row_size(r) for r in table_or_row)
        else:
            table = table_or_row
            if isinstance(table, pa.RecordBatch):
                table = pa.Table.from_batches([table])
            self._flush_rows()
            self._pending.append(self._conform(table))
            self._pending_count += table.num_rows
            self._pending_bytes += table.nbytes
        if self._pending_bytes >= self.max_shard_bytes or (
            self.max_shard_rows and self._pending_count >= self.max_shard_rows
        ):
            self._roll(final=False)

    def close(self, extra: dict | None = None) -> dict:
        self._roll(final=True)
        self._closed = True
        return commit_index(self.prefix_url, self.entries, self.schema, self.storage_options, extra=extra)

    def _conform(self, table: pa.Table) -> pa.Table:
        missing = set(self.schema.names) - set(table.column_names)
        if missing:
            raise ValueError(f"table is missing columns {sorted(missing)}")
        table = table.select(self.schema.names)
        return table if table.schema.equals(self.schema) else table.cast(self.schema)

    def _flush_rows(self) -> None:
        if self._pending_rows:
            self._pending.append(pa.Table.from_pylist(self._pending_rows, schema=self.schema))
            self._pending_rows = []

    def _roll(self, final: bool) -> None:
        self._flush_rows()
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending = []
        sizes = row_nbytes(table)
        runs = split_rows(sizes, self.max_shard_bytes)
        if self.max_shard_rows:
            runs = [(a, min(b, c)) for s, e in runs for a, b, c in _cap(s, e, self.max_shard_rows)]
        keep_last = not final and len(runs) > 0
        for start, stop in runs[:-1] if keep_last else runs:
            self._write(table.slice(start, stop - start))
        if keep_last:
            start, stop = runs[-1]
            rest = table.slice(start, stop - start)
            full = int(sizes[start:stop].sum()) >= self.max_shard_bytes or (
                self.max_shard_rows and rest.num_rows >= self.max_shard_rows
            )
            if full:
                self._write(rest)
                rest = table.slice(stop, 0)
            self._pending = [rest] if rest.num_rows else []
        self._pending_count = sum(t.num_rows for t in self._pending)
        self._pending_bytes = sum(t.nbytes for t in self._pending)

    def _write(self, table: pa.Table) -> None:
        name = shard_name(self.next_index)
        self.next_index += 1
        if any(e["path"] == name for e in self.entries):
            raise ShardError(f"{name} is already in the index; pass a larger start_index")
        self.entries.append(
            write_shard(table, storage.join(self.prefix_url, name), self.storage_options, **self.write_kwargs)
        )


def _cap(start: int, stop: int, rows: int):
    for a in range(start, stop, rows):
        yield a, min(a + rows, stop), stop


def _row_size(row: dict) -> int:
    return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in row.values())
