"""Stream Parquet and Arrow files in place: no copy into shards.

`CloudStreamingDataset("s3://bucket/data/train.parquet")` (a file, or a folder of `.parquet` / `.arrow`
files without an `index.json`) reads the files where they are. `build_index` makes, from the files' own
metadata, the index a shard set would have: every Parquet row group (the byte span of its column chunks)
or Arrow record batch (its IPC message) is a batch, so the loader's ranges, shuffle, partitions and exact
resume work unchanged. Differences from a shard set: batches carry no checksums (the order key uses the
files' etags and sizes instead, so a changed file refuses an old resume state), and Arrow files with
dictionary batches cannot be read by range (convert them with the shard stage).
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from streamtune import storage
from streamtune.records import columnar, split_ext

EXTENSIONS = (".parquet", ".arrow")


def file_url(url: str) -> tuple[str, str] | None:
    """(folder, file name) when `url` names one Parquet/Arrow file, else None."""
    folder, name = posixpath.split(url.rstrip("/"))
    return (folder, name) if name.lower().endswith(EXTENSIONS) else None


def build_index(root: str, storage_options: dict | None = None, only: str | None = None) -> dict:
    """An in-memory index (the shape `streamtune.shards.index.parse_index` returns) over the Parquet/Arrow
    files under `root` (or just `only`)."""
    from streamtune.manifest import list_objects

    fs, _ = storage.get_fs(root, storage_options)
    objects = [
        o
        for o in list_objects(root, storage_options)
        if split_ext(o["key"])[0] in ("parquet", "arrow") and (only is None or o["key"] == only)
    ]
    if not objects:
        raise FileNotFoundError(f"no index.json and no Parquet/Arrow files at {root}")
    entries, schema = [], None
    for o in objects:
        fmt = split_ext(o["key"])[0]
        entry, file_schema = (_parquet_entry if fmt == "parquet" else _arrow_entry)(fs, o)
        if schema is None:
            schema = file_schema
        elif not schema.equals(file_schema, check_metadata=False):
            raise ValueError(
                f"{o['key']} has another schema than {objects[0]['key']}: stream them separately"
            )
        entries.append(entry)
    return {
        "format": "streamtune-in-place",
        "schema": schema,
        "shards": entries,
        "rows": sum(e["rows"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
    }


def _parquet_entry(fs, obj: dict) -> tuple[dict, pa.Schema]:
    with fs.open(obj["path"], "rb", block_size=1 << 20) as f:
        pf = pq.ParquetFile(f)
        md, schema = pf.metadata, pf.schema_arrow
    batches = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        starts, ends = [], []
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                start = min(start, col.dictionary_page_offset)
            starts.append(start)
            ends.append(start + col.total_compressed_size)
        offset = min(starts)
        batches.append(
            {"offset": offset, "length": max(ends) - offset, "rows": rg.num_rows, "nbytes": rg.total_byte_size,
             "checksum": None, "row_group": i}
        )  # fmt: skip
    entry = _entry(obj, "parquet", batches)
    entry["metadata"] = md
    return entry, schema


def _arrow_entry(fs, obj: dict) -> tuple[dict, pa.Schema]:
    units = columnar.units(fs, obj["path"], "arrow")
    if any(u["offset"] is None for u in units):
        raise ValueError(
            f"{obj['key']} has dictionary batches, which cannot be read by range: shard it instead"
        )
    schema = columnar.read_schema(fs, obj["path"], "arrow")
    batches = [
        {
            "offset": u["offset"],
            "length": u["length"],
            "rows": u["rows"],
            "nbytes": u["length"],
            "checksum": None,
        }
        for u in units
    ]
    return _entry(obj, "arrow", batches), schema


def _entry(obj: dict, fmt: str, batches: list[dict]) -> dict:
    return {
        "path": obj["key"],
        "bytes": obj["size"],
        "rows": sum(b["rows"] for b in batches),
        "checksum": f"{obj['etag']}:{obj['size']}",
        "format": fmt,
        "batches": batches,
    }


class _RangeFile(io.RawIOBase):
    """A read-only file of `size` bytes of which only [base, base + len(data)) is present."""

    def __init__(self, data, base: int, size: int):
        self.data, self.base, self.size, self.pos = memoryview(data), base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, out) -> int:
        start = self.pos - self.base
        if start < 0 or start > len(self.data):
            raise OSError(f"read at {self.pos} outside the fetched range")
        n = min(len(out), len(self.data) - start)
        out[:n] = self.data[start : start + n]
        self.pos += n
        return n


def decode_parquet(entry: dict, data, base: int, batches: list[dict]) -> list[pa.RecordBatch]:
    """The row groups `batches` of a fetched range (`data` = bytes from file offset `base`)."""
    pf = pq.ParquetFile(_RangeFile(data, base, entry["bytes"]), metadata=entry["metadata"], pre_buffer=False)
    tables = [pf.read_row_group(b["row_group"]) for b in batches]
    table = pa.concat_tables(tables).combine_chunks()  # one batch: rows are found without a search
    return table.to_batches(max_chunksize=table.num_rows or None) or [
        pa.RecordBatch.from_pylist([], schema=table.schema)
    ]
