"""Quarantine records: inputs a stage could not use, with the reason. Stored as Parquet next to outputs."""

from __future__ import annotations

import io
from enum import StrEnum

import pyarrow as pa
import pyarrow.parquet as pq

from streamtune import storage


class Reason(StrEnum):
    """Why an input was set aside. The value is the stable code stored in a record's `error` field;
    `sentence` says it for people. The table in streamtune/QUARANTINE.md documents them (a test keeps the
    two in step)."""

    EMPTY = "empty"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    UNSUPPORTED = "unsupported"
    WRONG_CONTENT = "wrong_content"
    BOMB = "bomb"
    TOO_LONG = "too_long"
    ENCODING = "encoding"
    BROKEN_SIDECAR = "broken_sidecar"
    SIDECAR_ROW = "sidecar_row"
    DUPLICATE = "duplicate"
    UNREADABLE = "unreadable"
    BAD_ROW = "bad_row"
    CORRUPT_SHARD = "corrupt_shard"
    BROKEN_RECORD = "broken_record"
    MEDIA_REF = "media_ref"
    VIDEO_TRUNCATED = "video_truncated"
    SOURCE_CHANGED = "source_changed"
    EXTRA_MEDIA = "extra_media"

    @property
    def sentence(self) -> str:
        return SENTENCES[self]


SENTENCES = {
    Reason.EMPTY: "The file or sample has no content.",
    Reason.TRUNCATED: "The file ends before its header says it should (cut off while copied or written).",
    Reason.CORRUPT: "The data is damaged and does not decode.",
    Reason.UNSUPPORTED: "The bytes are not in a format the pipeline can read.",
    Reason.WRONG_CONTENT: "The bytes are another kind of media than the file name says (a JPEG named .wav).",
    Reason.BOMB: "The media decodes to more than the configured limit (image pixels, or decoded bytes per input byte).",
    Reason.TOO_LONG: "The audio is longer than the configured limit for whole-clip encoding.",
    Reason.ENCODING: "The text is not valid UTF-8.",
    Reason.BROKEN_SIDECAR: "The metadata (a sidecar line or .json file) is not a valid JSON object.",
    Reason.SIDECAR_ROW: "A sidecar row has no usable file_name (none, outside its folder, or no such file).",
    Reason.DUPLICATE: "The sample already has a file of this modality; this one is skipped.",
    Reason.UNREADABLE: "The object could not be read from the source.",
    Reason.BAD_ROW: "The raw row has no sample_id.",
    Reason.CORRUPT_SHARD: "The raw shard is missing or fails its checksum; the next run retries it.",
    Reason.BROKEN_RECORD: "A record of a record file (JSONL line, CSV row, array element) does not parse, is not an object, or has no usable id.",
    Reason.MEDIA_REF: "A record's media path leaves the source or names no readable object.",
    Reason.VIDEO_TRUNCATED: "The video breaks off (cut off or damaged); the segments before the damage are kept and the message names the second where decoding stopped.",
    Reason.SOURCE_CHANGED: "A referenced object changed or vanished at the source after the manifest listed it; nothing of it is kept (the next incremental run picks up the new version).",
    Reason.EXTRA_MEDIA: (
        "A sample with a video also has a separate audio or image file; the video is decoded, this file is not."
    ),
}

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
    sample_id: str | None, key: str | None, stage: str, reason: Reason, message: str = "", **extra
) -> dict:
    """One quarantine record: `error` holds the reason's code, `message` the detail; `extra` adds
    modality or shard."""
    if not isinstance(reason, Reason):
        raise TypeError(f"quarantine reason must be a Reason, not {reason!r}")
    return {
        "sample_id": sample_id,
        "key": key,
        "stage": stage,
        "error": reason.value,
        "message": message[:2000],
        **extra,
    }


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
