"""Record files: JSONL, JSON arrays, CSV/TSV, Parquet, Arrow and Hugging Face dataset folders.

A record file holds many samples. The manifest lists one row per record (`scan`), keyed
`<file key>#<record id>` (record id: the 0-based row, or the value of a configured id column); the shard
stage reads the records of a planned shard back with ranged reads (`read`) and turns each into a raw row
(`streamtune.records.fields`). See README.md in this folder.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa

SEP = "#"
SIDECARS = frozenset({"metadata.jsonl", "metadata.csv"})
# Files of a `datasets.save_to_disk` folder that describe the dataset rather than hold samples.
HF_INFO = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
_TEXT_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_COLUMNAR_EXT = {".parquet": "parquet", ".arrow": "arrow"}
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow")

# Manifest columns a record row fills (object rows leave them null).
MANIFEST_FIELDS = [
    ("file", pa.string()),  # key of the record file
    ("row", pa.int64()),  # 0-based record index in the file
    ("line", pa.int64()),  # 1-based line where the record starts (text formats)
    ("offset", pa.int64()),  # byte range: the record (text formats) or its record batch (Arrow)
    ("length", pa.int64()),
    ("batch", pa.int64()),  # row group (Parquet) or record batch (Arrow) holding the record
    ("batch_row", pa.int64()),  # row inside that batch
]


def split_ext(key: str) -> tuple[str, str | None]:
    """(record format or "", compression) from a key's extensions: `a.jsonl.gz` -> ("jsonl", "gzip")."""
    name = posixpath.basename(key).lower()
    stem, ext = posixpath.splitext(name)
    compression = COMPRESSION.get(ext)
    if compression:
        stem, ext = posixpath.splitext(stem)
        return _TEXT_EXT.get(ext, ""), compression
    return _TEXT_EXT.get(ext) or _COLUMNAR_EXT.get(ext, ""), None


def record_format(key: str, head: bytes = b"") -> tuple[str, str | None] | None:
    """(format, compression) when `key` is a record file, else None.

    `metadata.jsonl`/`.csv` stay sidecars. A plain `.json` file is a record file only when it holds an
    array (`head`: its first bytes); a `.json` object stays one sample (existing behaviour)."""
    if posixpath.basename(key) in SIDECARS | HF_INFO:
        return None
    fmt, compression = split_ext(key)
    if not fmt:
        return None
    if fmt == "json" and compression is None and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return None
    return fmt, compression


def record_key(file: str, record_id: str | int) -> str:
    return f"{file}{SEP}{record_id}"


def split_record_key(key: str) -> tuple[str, str] | None:
    """(file key, record id) of a record key, or None for an object key. The file part is the shortest
    prefix before a `#` that names a record file, so ids may contain `#`."""
    at = key.find(SEP)
    while at > 0:
        if split_ext(key[:at])[0] and posixpath.basename(key[:at]) not in SIDECARS | HF_INFO:
            return key[:at], key[at + 1 :]
        at = key.find(SEP, at + 1)
    return None


def is_record_key(key: str) -> bool:
    return split_record_key(key) is not None


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise): scans free a lot of small objects."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def scan(
    fs, path: str, key: str, etag: str, fmt: str, compression: str | None, id_column: str | None = None
) -> Iterator[tuple[pa.Table, list[dict]]]:
    """Manifest rows of one record file, in chunks (bounded memory), with quarantine records.

    Rows have the manifest schema (`streamtune.manifest.SCHEMA`): `sample_id` = `key` = record key,
    `size` = record bytes (estimated for columnar formats), `etag` = the record's version (digest of its
    bytes for text formats, the file's etag for columnar ones), `modality` "record"."""
    if fmt in ("parquet", "arrow"):
        from streamtune.records import columnar

        yield from columnar.scan(fs, path, key, etag, fmt, id_column)
    else:
        from streamtune.records import text

        yield from text.scan(fs, path, key, fmt, compression, id_column)


def read(
    fs, path: str, fmt: str, compression: str | None, rows: list[dict]
) -> Iterator[tuple[dict, dict | None, str | None]]:
    """(manifest row, record or None, error or None) for `rows` (manifest rows of one file, any order)."""
    if fmt in ("parquet", "arrow"):
        from streamtune.records import columnar

        yield from columnar.read(fs, path, fmt, rows)
    else:
        from streamtune.records import text

        yield from text.read(fs, path, fmt, compression, rows)
