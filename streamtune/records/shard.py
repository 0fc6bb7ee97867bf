"""The shard stage's side of record files: plan shards by records, and build a planned shard's raw rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtune import quarantine
from streamtune.quarantine import Reason
from streamtune.records import columnar, fields, read, split_ext


def plan_record_shards(manifest: pa.Table, max_shard_bytes: int, start_index: int) -> list[dict]:
    """Plans over the manifest's record rows, in manifest order, cut at about `max_shard_bytes`.

    A plan names its records by manifest row positions (`"records": [[start, stop], ...]`), so plans of
    files with millions of records stay small."""
    positions = pc.indices_nonzero(pc.equal(manifest["modality"], "record")).to_numpy()
    if not len(positions):
        return []
    sizes = manifest["size"].take(pa.array(positions)).to_numpy(zero_copy_only=False)
    ends = np.cumsum(sizes)  # a shard takes records while they fit (one at least): one search per shard
    plans: list[dict] = []
    start = 0
    while start < len(positions):
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + max_shard_bytes, side="right")))
        plans.append(_plan(start_index + len(plans), positions[start:stop], int(ends[stop - 1]) - base))
        start = stop
    return plans


def _plan(index: int, positions: np.ndarray, nbytes: int) -> dict:
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = [[int(p[0]), int(p[-1]) + 1] for p in np.split(positions, breaks)]
    return {"index": index, "sample_ids": [], "records": runs, "bytes": int(nbytes)}


READ_COLUMNS = ["key", "file", "row", "line", "offset", "length", "batch", "batch_row"]


def planned_records(manifest: pa.Table, plan: dict) -> pa.Table:
    runs = plan.get("records") or []
    return pa.concat_tables([manifest.slice(a, b - a) for a, b in runs]) if runs else manifest.slice(0, 0)


def record_rows(fs, root: str, table: pa.Table) -> tuple[pa.Table, list[dict], set[str]]:
    """Raw rows (a RAW_SCHEMA table, in `table` order) of the records in `table` (manifest rows), plus
    quarantine records and the keys of records that could not be read or parsed (left out of the shard's
    record sources, so the next incremental run tries them again). Each record goes into column lists as it is read: only the
    columns are held, not records or row dicts."""
    by_file: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(table.select(READ_COLUMNS).to_pylist()):
        r["position"] = i
        by_file[r["file"]].append(r)
    cols = Columns()
    problems: list[dict] = []
    unread: set[str] = set()
    for file_key, rows in by_file.items():
        fmt, compression = split_ext(file_key)
        path = f"{root}/{file_key}"
        refs: dict[int, dict[str, str]] = {}
        done: set[str] = set()
        try:
            kinds = None
            if fmt in ("parquet", "arrow"):
                schema = columnar.read_schema(fs, path, fmt)
                kinds = fields.media_kinds(schema.names, columnar.hf_features(schema))
            for r, record, error in read(fs, path, fmt, compression, rows):
                done.add(r["key"])
                if error:  # not held either: the next incremental run reads it again (fixed, or still broken)
                    problems.append(fields.problem(r["key"], r["row"], r["line"], error))
                    unread.add(r["key"])
                    continue
                media, wanted, rest = fields.split_media(record, kinds or fields.media_kinds(list(record)))
                at = cols.add(r["position"], fields.raw_row(r["key"], media, rest, []))
                if wanted:
                    refs[at] = wanted
        except (OSError, ValueError, pa.ArrowException) as e:
            for r in rows:
                if r["key"] not in done:
                    unread.add(r["key"])
                    problems.append(quarantine.record(r["key"], r["key"], "shard", Reason.UNREADABLE, str(e)))
        _fetch_refs(fs, root, file_key, refs, cols, problems)
    return cols.table(), problems, unread


class Columns:
    """Raw shard columns filled row by row; `table()` orders rows by the position they were added with.
    Text columns move into Arrow every CHUNK rows, so Python strings of a whole shard are never held."""

    CHUNK = 4096
    TEXT = ("sample_id", "text", "meta")

    def __init__(self) -> None:
        from streamtune.shards import RAW_SCHEMA

        self.schema = RAW_SCHEMA
        self.pending: dict[str, list] = {name: [] for name in self.TEXT}
        self.chunks: dict[str, list[pa.Array]] = {name: [] for name in self.TEXT}
        self.media: dict[str, list] = {"audio": [], "image": [], "video": []}
        self.refs: dict[int, list[dict]] = {}  # media left at the source (videos), by row
        self.keys: dict[int, str] = {}
        self.order: list[int] = []

    def add(self, position: int, row: dict) -> int:
        for name, values in self.pending.items():
            values.append(row[name])
        for name, values in self.media.items():
            values.append(row[name])
        self.order.append(position)
        if len(self.pending["sample_id"]) >= self.CHUNK:
            self._flush()
        at = len(self.order) - 1
        self.keys[at] = row["sample_id"]
        return at

    def _flush(self) -> None:
        for name, values in self.pending.items():
            if values:
                self.chunks[name].append(pa.array(values, self.schema.field(name).type))
                self.pending[name] = []

    def set(self, at: int, kind: str, value: bytes) -> None:
        self.media[kind][at] = value

    def add_ref(self, at: int, ref: dict) -> None:
        self.refs.setdefault(at, []).append(ref)

    def key(self, at: int) -> str:
        return self.keys[at]

    def table(self) -> pa.Table:
        self._flush()
        arrays = {
            name: pa.concat_arrays(chunks) if chunks else pa.array([], self.schema.field(name).type)
            for name, chunks in self.chunks.items()
        }
        arrays |= {name: pa.array(values, pa.binary()) for name, values in self.media.items()}
        ids = arrays["sample_id"]
        if self.refs:
            refs = [self.refs.get(i) for i in range(len(ids))]
            arrays["refs"] = pa.array(refs, self.schema.field("refs").type)
        arrays["sources"] = pa.ListArray.from_arrays(pa.array(np.arange(len(ids) + 1, dtype=np.int32)), ids)
        columns = [arrays[f.name] if f.name in arrays else pa.nulls(len(ids), f.type) for f in self.schema]
        table = pa.table(columns, schema=self.schema)
        order = np.asarray(self.order)
        if len(order) > 1 and (np.diff(order) < 0).any():
            table = table.take(pa.array(np.argsort(order, kind="stable")))
        return table


def _fetch_refs(fs, root: str, file_key: str, refs: dict, cols: Columns, problems: list[dict]) -> None:
    """Media that records name by relative path, fetched concurrently (a video becomes a reference: url,
    version, size, read by range at decode time); a bad path is quarantined and the record keeps its
    other fields."""
    targets: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for at, wanted in refs.items():
        key = cols.key(at)
        for kind, path in wanted.items():
            target = fields.resolve(file_key, path)
            if target is None:
                problems.append(_ref_problem(key, f"{kind} path {path!r} leaves the source"))
            elif kind == "video":
                _video_ref(fs, root, target, at, cols, problems)
            else:
                targets[f"{root}/{target}"].append((at, kind))
    if not targets:
        return
    fetched = fs.cat(list(targets), on_error="return")
    for path, users in targets.items():
        data = fetched.get(path)
        for at, kind in users:
            if isinstance(data, bytes | bytearray) and data:
                cols.set(at, kind, bytes(data))
            else:
                key = cols.key(at)
                problems.append(_ref_problem(key, f"{kind} {path[len(root) + 1 :]!r}: {data or 'empty'}"))


def _video_ref(fs, root: str, target: str, at: int, cols: Columns, problems: list[dict]) -> None:
    from streamtune.manifest import etag_of

    path = f"{root}/{target}"
    try:
        info = fs.info(path)
    except (OSError, ValueError) as e:
        problems.append(_ref_problem(cols.key(at), f"video {target!r}: {e or 'no such object'}"))
        return
    if info.get("type") == "directory" or not info.get("size"):
        problems.append(_ref_problem(cols.key(at), f"video {target!r}: not a non-empty object"))
        return
    url = fs.unstrip_protocol(path)
    ref = {
        "modality": "video",
        "key": target,
        "url": url,
        "version": etag_of(info),
        "size": int(info["size"]),
    }
    cols.add_ref(at, ref)


def _ref_problem(key: str, message: str) -> dict:
    return quarantine.record(key, key, "shard", Reason.MEDIA_REF, message)


# --- record versions: a Parquet file next to each shard, not index.json ------------------------------
# index.json is read by every loader; a version per record (millions) would make it huge. A shard entry
# holding records carries "record_sources": {"path", "rows", "files"} instead, and the (key, version)
# pairs live in `shard-NNNNN.records.parquet` beside the shard.

SOURCES_SCHEMA = pa.schema([("key", pa.string()), ("version", pa.string())])


def record_sources_name(index: int) -> str:
    return f"shard-{index:05d}.records.parquet"


def write_record_sources(
    prefix: str, index: int, table: pa.Table, storage_options: dict | None = None
) -> dict:
    """Write (key, version) of `table`'s records (columns key + etag, or key + version) next to shard
    `index`; returns the entry's "record_sources"."""
    import io

    import pyarrow.parquet as pq

    from streamtune import storage

    version = table["etag"] if "etag" in table.column_names else table["version"]
    pairs = pa.table([table["key"], version], schema=SOURCES_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(pairs, buf, compression="zstd")
    name = record_sources_name(index)
    storage.write_bytes(storage.join(prefix, name), buf.getvalue(), storage_options)
    return {"path": name, "rows": pairs.num_rows, "files": sorted(_files(table))}


def _files(table: pa.Table) -> set[str]:
    from streamtune.records import split_record_key

    if "file" in table.column_names:
        return set(pc.unique(table["file"]).to_pylist())
    return {(split_record_key(k) or (k,))[0] for k in table["key"].to_pylist()}


def read_record_sources(prefix: str, entry: dict, storage_options: dict | None = None) -> pa.Table:
    """(key, version) of the records a shard entry holds (empty when it holds none)."""
    import io

    import pyarrow.parquet as pq

    from streamtune import storage

    rs = entry.get("record_sources")
    if not rs:
        return SOURCES_SCHEMA.empty_table()
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(prefix, rs["path"]), storage_options)))


def stale_records(entry: dict, stale_by_file: dict[str, set[str]], held: pa.Table | None) -> set[str]:
    """The stale record keys a shard entry may hold: exactly (with `held`, its record sources) or every
    stale key of the files it holds records of (an over-estimate; dropping a key it lacks changes nothing)."""
    rs = entry.get("record_sources") or {}
    found = set().union(*(stale_by_file.get(f, set()) for f in rs.get("files") or []))
    if found and held is not None:
        found &= set(held["key"].to_pylist())
    return found


def record_holders(
    prefix: str, entries: list[dict], keys: set[str], storage_options: dict | None = None
) -> dict:
    """{record key: number of the newest shard holding it} for `keys` (reads only the record sources of
    shards holding records of the same files)."""
    from streamtune.records import split_record_key

    files = {found[0] for k in keys if (found := split_record_key(k)) is not None}
    out: dict[str, int] = {}
    for entry in entries:
        rs = entry.get("record_sources")
        if not rs or not files & set(rs["files"]):
            continue
        number = int(entry["path"].split("-")[1].split(".")[0])
        for key in set(read_record_sources(prefix, entry, storage_options)["key"].to_pylist()) & keys:
            out[key] = max(out.get(key, -1), number)
    return out
