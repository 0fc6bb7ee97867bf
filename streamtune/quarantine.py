"""Quarantine records: inputs a stage could not use, with the reason. Stored as Parquet next to outputs."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from streamtune import storage

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("key", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
        ("modality", pa.string()),  # where known: audio | image | text | meta
        ("shard", pa.string()),  # where known: the shard the record came from
    ]
)


def record(
    sample_id: str | None, key: str | None, stage: str, error: str | BaseException, message: str = ""
) -> dict:
    if isinstance(error, BaseException):
        message = message or str(error)
        error = type(error).__name__
    return {"sample_id": sample_id, "key": key, "stage": stage, "error": error, "message": message[:2000]}


def to_table(records: list[dict]) -> pa.Table:
    rows = [{f: None if r.get(f) is None else str(r[f]) for f in SCHEMA.names} for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_quarantine(url: str, records: list[dict], storage_options: dict | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(to_table(records), buf)
    storage.write_bytes(url, buf.getvalue(), storage_options)


def read_quarantine(url: str, storage_options: dict | None = None) -> pa.Table:
    if not storage.exists(url, storage_options):
        return to_table([])
    return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
