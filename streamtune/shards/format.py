"""Names, schema encoding and checksums shared by the shard writer and readers."""

from __future__ import annotations

import base64

import pyarrow as pa
import xxhash

FORMAT = "streamtune-shards"
VERSION = 1
INDEX_NAME = "index.json"

# A media object left at its source (larger than `shard.inline_max_bytes`): read by range at decode time.
REF_TYPE = pa.struct(
    [
        pa.field("modality", pa.string()),
        pa.field("key", pa.string()),
        pa.field("url", pa.string()),
        pa.field("version", pa.string()),
        pa.field("size", pa.int64()),
    ]
)

RAW_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("audio", pa.binary()),
        pa.field("image", pa.binary()),
        pa.field("text", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("sources", pa.list_(pa.string())),
        pa.field("video", pa.binary()),
        pa.field("refs", pa.list_(REF_TYPE)),
    ]
)

# Columns holding already-compressed media; "auto" compression leaves them alone.
MEDIA_COLUMNS = frozenset({"audio", "image", "video"})


class ShardError(RuntimeError):
    """A shard set or one of its shards is missing, corrupt or inconsistent with its index."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


_HASHES = {"xxh3": xxhash.xxh3_64_hexdigest, "xxh64": xxhash.xxh64_hexdigest}
_HASHERS = {"xxh3": xxhash.xxh3_64, "xxh64": xxhash.xxh64}
CHECKSUM_ALGORITHM = "xxh3"  # 3x faster than xxh64 to verify; xxh64 sets written earlier still read


def checksum(data, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    return f"{algorithm}:" + _HASHES[algorithm](data)


def hasher(expected: str):
    """An incremental hash (`update`, `hexdigest`) of the algorithm named by checksum `expected`."""
    algorithm = expected.partition(":")[0]
    if algorithm not in _HASHERS:
        raise ShardError(f"unknown checksum algorithm in {expected!r} (known: {', '.join(_HASHERS)})")
    return _HASHERS[algorithm]()


def checksum_matches(data, expected: str) -> bool:
    """Whether `data` has the checksum `expected` ("<algorithm>:<hex>")."""
    algorithm = expected.partition(":")[0]
    if algorithm not in _HASHES:
        raise ShardError(f"unknown checksum algorithm in {expected!r} (known: {', '.join(_HASHES)})")
    return checksum(data, algorithm) == expected


def schema_to_json(schema: pa.Schema) -> dict:
    """The schema as base64 IPC (exact, what readers use) plus a readable field list."""
    return {
        "ipc": base64.b64encode(schema.serialize().to_pybytes()).decode(),
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def schema_from_json(obj: dict) -> pa.Schema:
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(obj["ipc"])))
    except (KeyError, TypeError, ValueError, pa.ArrowInvalid) as e:
        raise ShardError(f"index.json has an unreadable schema: {e}") from e
