"""index.json: the commit point of a shard set, and whole-shard / single-batch reads."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from streamtune import storage
from streamtune.shards.format import (
    FORMAT,
    INDEX_NAME,
    VERSION,
    ShardError,
    checksum,
    checksum_matches,
    schema_from_json,
    schema_to_json,
)

_CORE_KEYS = ("format", "version", "schema", "shards", "rows", "bytes")


def commit_index(
    prefix_url: str,
    entries: list[dict],
    schema: pa.Schema,
    storage_options: dict[str, Any] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write prefix/index.json (after every shard it lists exists) and return it."""
    entries = sorted(entries, key=lambda e: e["path"])
    paths = [e["path"] for e in entries]
    if len(set(paths)) != len(paths):
        raise ShardError("duplicate shard paths in index entries")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "schema": schema_to_json(schema),
        "shards": entries,
        "rows": sum(int(e["rows"]) for e in entries),
        "bytes": sum(int(e["bytes"]) for e in entries),
    }
    for key, value in (extra or {}).items():
        if key in _CORE_KEYS:
            raise ValueError(f"extra may not override index key {key!r}")
        index[key] = value
    storage.write_json(storage.join(prefix_url, INDEX_NAME), index, storage_options)
    return index


def parse_index(raw: bytes, where: str) -> dict:
    """Validate index.json bytes; `where` names the location in errors."""
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{where} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ShardError(f"{where} has version {index.get('version')!r}; this reader knows {VERSION}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{where} has no shard list")
    for e in shards:
        try:
            rows = sum(int(b["rows"]) for b in e["batches"])
            size = int(e["bytes"])
            spans = [(int(b["offset"]), int(b["length"])) for b in e["batches"]]
            ok = rows == int(e["rows"]) and all(0 <= o and o + n <= size for o, n in spans)
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"{where}: malformed shard entry {e!r:.200}: {err}") from err
        if not ok:
            raise ShardError(f"{where}: shard {e.get('path')} has inconsistent batch offsets or row counts")
    index["schema"] = schema_from_json(index.get("schema") or {})
    return index


def read_index(prefix_url: str, storage_options: dict[str, Any] | None = None) -> dict:
    """Read and validate prefix/index.json; the returned "schema" is a pyarrow.Schema."""
    url = storage.join(prefix_url, INDEX_NAME)
    try:
        raw = storage.read_bytes(url, storage_options)
    except FileNotFoundError as e:
        raise ShardError(f"no shard index at {url} (shard set missing or not committed)") from e
    return parse_index(raw, url)


def decode_batch(data: bytes | memoryview | pa.Buffer, schema: pa.Schema) -> pa.RecordBatch:
    """Decode one record batch message (as cut out by an index entry's offset/length) without the footer.

    A batch written before columns were appended to the schema (raw shards gained `video` and `refs`; an
    incremental run appends new shards to an older set) decodes with those columns as nulls: the message's
    buffer count says which leading fields it holds."""
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    message = pa.ipc.read_message(buf)
    try:
        return pa.ipc.read_record_batch(message, schema)
    except pa.ArrowInvalid:
        fields = _leading_fields(message, schema)
        if fields is None:
            raise
    prefix = pa.schema(list(schema)[:fields], metadata=schema.metadata)
    batch = pa.ipc.read_record_batch(message, prefix)
    missing = [pa.nulls(batch.num_rows, f.type) for f in list(schema)[fields:]]
    return pa.RecordBatch.from_arrays([*batch.columns, *missing], schema=schema)


def _leading_fields(message: pa.ipc.Message, schema: pa.Schema) -> int | None:
    """How many leading fields of `schema` a record batch message holds (by its buffer count), if fewer."""
    from streamtune.shards import ipc

    _, buffers, _ = ipc._message_parts(memoryview(message.metadata))
    total = 0
    for i, field in enumerate(schema):
        if total == len(buffers):
            return i
        count = ipc._buffer_counts(field.type)
        if count is None:
            return None
        total += count
    return None


def read_shard_table(
    prefix_url: str,
    entry: dict,
    storage_options: dict[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read one whole shard, verify its size and checksum, and return it as a table."""
    url = storage.join(prefix_url, entry["path"])
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError as e:
        raise ShardError(f"shard {entry['path']} listed in the index is missing at {url}") from e
    if len(data) != entry["bytes"] or not checksum_matches(data, entry["checksum"]):
        raise ShardError(
            f"shard {entry['path']} is corrupt: {len(data)} bytes with checksum "
            f"{checksum(data, entry['checksum'].partition(':')[0])}, "
            f"index says {entry['bytes']} bytes with {entry['checksum']}"
        )
    table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    return table.select(columns) if columns is not None else table
