"""From one record (a dict) to a raw shard row, and the checks on record ids and media references.

A record's media are its `audio`/`image`/`video` fields, or the columns a Hugging Face schema types
`Audio`/`Image`/`Video`: bytes, `{"bytes": ..., "path": ...}` (the `datasets` encoding), or a path relative to
the record file's folder that must stay inside the source (a video path becomes a reference, read by range
at decode time, like a large video file of a folder). `text` (a string) becomes the raw `text` column; every other
JSON-representable field goes to `meta` unchanged (so `messages`, `prompt`/`completion`, `instruction` ...
reach the trainer as written).
"""

from __future__ import annotations

import json
import posixpath

from streamtune import quarantine
from streamtune.quarantine import Reason

MEDIA = ("audio", "image", "video")


def problem(
    key: str,
    row: int,
    line: int | None,
    message: str,
    reason: Reason = Reason.BROKEN_RECORD,
    stage: str = "shard",
) -> dict:
    """A quarantine record for the record at `key` (row `row`); the message names its line (or row)."""
    where = f"line {line}" if line else f"row {row}"
    if not message.startswith(("line ", "element ", "row ")):
        message = f"{where}: {message}"
    return quarantine.record(key, key, stage, reason, message)


def record_id(
    record: dict | None, id_column: str, error: str | None, seen: set[str]
) -> tuple[str | None, str | None]:
    """(id, None) from the record's `id_column`, or (None, why not). Ids repeated in a file are refused."""
    if error:
        return None, error
    value = (record or {}).get(id_column)
    if value is None or value == "" or isinstance(value, dict | list | bytes):
        return None, f"no usable {id_column!r} field (the configured id column)"
    rid = str(value)
    if rid in seen:
        return None, f"{id_column} {rid!r} repeats an earlier record of this file"
    seen.add(rid)
    return rid, None


def media_kinds(columns: list[str], hf_features: dict | None = None) -> dict[str, str]:
    """{column: "audio" | "image" | "video"} from a Hugging Face features description, else by column
    name."""
    kinds = {}
    for name in columns:
        spec = (hf_features or {}).get(name)
        typ = spec.get("_type") if isinstance(spec, dict) else None
        if typ in ("Audio", "Image", "Video"):
            kinds[name] = typ.lower()
        elif name in MEDIA and not hf_features:
            kinds[name] = name
    return kinds


def split_media(record: dict, kinds: dict[str, str]) -> tuple[dict[str, bytes], dict[str, str], dict]:
    """(embedded media {kind: bytes}, referenced media {kind: path}, the other fields). The first column
    of a kind wins."""
    embedded: dict[str, bytes] = {}
    refs: dict[str, str] = {}
    rest = {}
    for name, value in record.items():
        kind = kinds.get(name)
        if kind is None:
            if not isinstance(value, bytes | bytearray | memoryview):
                rest[name] = value
            continue
        if kind in embedded or kind in refs or value is None:
            continue
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        else:
            data, path = (value, None) if isinstance(value, bytes | bytearray) else (None, value)
        if data:
            embedded[kind] = bytes(data)
        elif isinstance(path, str) and path:
            refs[kind] = path
    return embedded, refs, rest


def resolve(file_key: str, path: str) -> str | None:
    """The source key a record's relative media path names, or None when it leaves the source (absolute
    paths, URLs, `..` past the root): keys and paths from records are untrusted."""
    if "://" in path or path.startswith(("/", "\\")) or "\\" in path:
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(file_key), path))
    if target.startswith("../") or target in (".", "..") or posixpath.isabs(target):
        return None
    return target


def raw_row(sample_id: str, media: dict[str, bytes], rest: dict, sources: list[str]) -> dict:
    """A row of the raw shard schema."""
    text = rest.get("text") if isinstance(rest.get("text"), str) else None
    meta = json.dumps(rest, ensure_ascii=False, default=str) if rest else None
    return {
        "sample_id": sample_id,
        "audio": media.get("audio"),
        "image": media.get("image"),
        "video": media.get("video"),
        "text": text,
        "meta": meta,
        "sources": sources,
    }
