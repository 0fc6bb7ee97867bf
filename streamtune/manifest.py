"""Manifest: list a source prefix, classify every object, join sidecar metadata.

One row per object. A sample is every object sharing a key stem (`a01.wav`, `a01.jpg`, `a01.txt` → `a01`).
Sidecars follow the AudioFolder/ImageFolder convention: `metadata.jsonl` / `metadata.csv` in a folder, one
row per file with a `file_name` column; their fields attach to that file's sample. Rows a sidecar cannot
provide (bad JSON, missing `file_name`, pointing outside its folder) become quarantine records.

Incremental runs pass what the shard set already holds ({key: version}, see `source_version`). The diff is
per sample: a sample whose files all match is skipped; one with a file added, changed (content or sidecar
fields) or removed is listed whole, and every sample the shard set holds in an older form, or that is gone
from the source, gets `superseded` rows (its old keys) telling the shard stage to drop its old row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamtune import quarantine, storage
from streamtune import records as record_files
from streamtune.quarantine import Reason
from streamtune.sniff import MORE_BYTES, SNIFF_BYTES, detect_modality, more_bytes_at

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("key", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        (
            "modality",
            pa.string(),
        ),  # audio | image | text | json | record | sidecar | dataset_info | unknown | superseded
        ("detected_by", pa.string()),  # content | extension | unknown | record:<format>
        ("sidecar", pa.string()),  # JSON object of sidecar fields for this file, or null
        *record_files.MANIFEST_FIELDS,  # where a record lives in its record file (null for other objects)
    ]
)
SAMPLE_MODALITIES = ("audio", "image", "video", "text", "json", "record")


def etag_of(info: dict) -> str:
    """The version of an object as the manifest records it: its ETag, else a digest of size and mtime."""
    for field in ("ETag", "etag", "md5"):
        if info.get(field):
            return str(info[field]).strip('"')
    stamp = f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('created')}"
    return "local-" + hashlib.sha1(stamp.encode()).hexdigest()[:16]


SIDECAR_NAMES = ("metadata.jsonl", "metadata.csv")
SOURCE_KEY = "streamtune.source"


def source_version(etag: str, sidecar: str | None) -> str:
    """What incremental runs compare for one object: its etag, plus a digest of its sidecar fields if any."""
    if not sidecar:
        return etag
    return f"{etag}+{hashlib.sha256(sidecar.encode()).hexdigest()[:16]}"


def versions(table: pa.Table) -> dict[str, str]:
    """{key: source_version} of a manifest's objects (superseded rows left out)."""
    return {
        r["key"]: source_version(r["etag"], r["sidecar"])
        for r in table.select(["key", "etag", "sidecar", "modality"]).to_pylist()
        if r["modality"] != "superseded"
    }


def _sidecar_json(fields: dict | None) -> str | None:
    return json.dumps(fields, sort_keys=True, default=str) if fields is not None else None


def _by_sample(keyed: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, version in keyed.items():
        out.setdefault(sample_id_of(key), {})[key] = version
    return out


def _diff(
    objects: list[dict], current: dict[str, str], held: dict[str, str]
) -> tuple[list[dict], list[dict]]:
    """(objects to list, superseded rows) for an incremental run against `held` ({key: version})."""
    if not held:
        return objects, []
    now = _by_sample(current)
    before = _by_sample({k: v for k, v in held.items() if posixpath.basename(k) not in SIDECAR_NAMES})

    def wanted(obj: dict) -> bool:
        if posixpath.basename(obj["key"]) in SIDECAR_NAMES:
            return held.get(obj["key"]) != obj["etag"]
        sample_id = sample_id_of(obj["key"])
        return now[sample_id] != before.get(sample_id)

    todo = [o for o in objects if wanted(o)]
    superseded = [
        {
            "sample_id": sample_id,
            "key": key,
            "size": 0,
            "etag": version,
            "modality": "superseded",
            "detected_by": "incremental",
            "sidecar": None,
        }
        for sample_id, old in sorted(before.items())
        if now.get(sample_id) != old
        for key, version in sorted(old.items())
    ]
    return todo, superseded


def sample_id_of(key: str) -> str:
    """The sample a key belongs to: its stem for objects, the key itself for a record (`file#row`)."""
    if record_files.SEP in key and record_files.is_record_key(key):
        return key
    stem, _ = posixpath.splitext(key)
    return stem


def list_objects(source_url: str, storage_options: dict | None = None) -> list[dict]:
    """Every object under the prefix: [{key (relative, '/'-separated), path, size, etag}], sorted by key."""
    fs, root = storage.get_fs(source_url, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"source not found: {source_url}")
    found = fs.find(root, detail=True)
    objects = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        key = path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        if not key or posixpath.basename(key).startswith("."):
            continue
        objects.append({"key": key, "path": path, "size": int(info.get("size") or 0), "etag": etag_of(info)})
    return sorted(objects, key=lambda o: o["key"])


def _read_heads(fs, objects: list[dict], max_workers: int = 16) -> list[bytes]:
    def head(obj: dict) -> bytes:
        if obj["size"] == 0:
            return b""
        try:
            return fs.cat_file(obj["path"], start=0, end=min(SNIFF_BYTES, obj["size"]))
        except (OSError, ValueError):
            return b""

    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(head, objects))


def _read_more(fs, objects: list[dict], heads: list[bytes], max_workers: int = 16) -> list[tuple[bytes, int]]:
    """For MP4s whose index (moov) follows the media data: (bytes where it starts, their offset)."""

    def more(obj: dict, head: bytes) -> tuple[bytes, int]:
        at = more_bytes_at(head, obj["size"])
        if at is None:
            return b"", 0
        try:
            return fs.cat_file(obj["path"], start=at, end=min(at + MORE_BYTES, obj["size"])), at
        except (OSError, ValueError):
            return b"", 0

    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(more, objects, heads))


def _parse_sidecar(key: str, data: bytes) -> tuple[dict[str, dict], list[dict]]:
    """Rows of one sidecar file, keyed by the full key of the file they describe."""
    folder = posixpath.dirname(key)
    rows: dict[str, dict] = {}
    bad: list[dict] = []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return {}, [quarantine.record(None, key, "manifest", Reason.ENCODING, f"sidecar: {e}")]
    if key.endswith(".csv"):
        entries = [(i + 2, row) for i, row in enumerate(csv.DictReader(io.StringIO(text)))]
    else:
        entries = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                entries.append((i + 1, json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(
                    quarantine.record(None, key, "manifest", Reason.BROKEN_SIDECAR, f"line {i + 1}: {e}")
                )
    for line_no, row in entries:
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            bad.append(
                quarantine.record(None, key, "manifest", Reason.SIDECAR_ROW, f"line {line_no}: no file_name")
            )
            continue
        target = posixpath.normpath(posixpath.join(folder, name))
        inside = not folder or target.startswith(folder + "/")
        if not inside or target.startswith("../") or posixpath.isabs(name):
            bad.append(
                quarantine.record(
                    None, key, "manifest", Reason.SIDECAR_ROW, f"line {line_no}: {name!r} leaves folder"
                )
            )
            continue
        rows[target] = {k: v for k, v in row.items() if k != "file_name"}
    return rows, bad


def _record_files(fs, objects: list[dict]) -> dict[str, tuple[str, str | None]]:
    """{key: (format, compression)} of the record files among `objects` (streamtune.records)."""
    maybe = [o for o in objects if record_files.record_format(o["key"], b"[")]
    arrays = [o for o in maybe if record_files.split_ext(o["key"]) == ("json", None)]
    heads = dict(zip([o["key"] for o in arrays], _read_heads(fs, arrays), strict=True))
    found = {}
    for o in maybe:
        fmt = record_files.record_format(o["key"], heads.get(o["key"], b"["))
        if fmt:
            found[o["key"]] = fmt
    return found


def _dataset_info_keys(objects: list[dict], found: dict) -> set[str]:
    """Files that describe a dataset folder instead of holding samples: `dataset_info.json`, `state.json`,
    `dataset_dict.json` and a `README.md` dataset card, in a folder holding Parquet/Arrow record files."""
    folders = {posixpath.dirname(k) for k, (fmt, _) in found.items() if fmt in ("parquet", "arrow")}
    out = set()
    for o in objects:
        folder, name = posixpath.split(o["key"])
        if name not in record_files.HF_INFO and name != "README.md":
            continue
        prefix = folder + "/" if folder else ""
        if any(f == folder or f.startswith(prefix) for f in folders):
            out.add(o["key"])
    return out


def _scan_record_file(fs, obj: dict, fmt: tuple[str, str | None], id_column: str | None):
    """(manifest table of the file's records, quarantine records)."""
    tables, problems = [], []
    name = fmt[0] + (f"+{fmt[1]}" if fmt[1] else "")
    scan = record_files.scan(fs, obj["path"], obj["key"], obj["etag"], *fmt, id_column=id_column)
    while True:
        try:
            cols, bad = next(scan)
        except StopIteration:
            break
        except (OSError, ValueError, EOFError, pa.ArrowException) as e:  # chunks listed before it stay
            listed = sum(t.num_rows for t in tables)
            problems.append(
                quarantine.record(
                    None, obj["key"], "manifest", Reason.CORRUPT, f"after {listed} records: {e}"
                )
            )
            break
        problems += bad
        n = len(cols["id"])
        if not n:
            continue
        # sample_id and key are one array, and so are size and length (text formats): millions of rows
        keys = pa.array([record_files.record_key(obj["key"], rid) for rid in cols.pop("id")], pa.string())
        data = {c: pa.array(v, SCHEMA.field(c).type) for c, v in cols.items()}
        data |= {"sample_id": keys, "key": keys, "size": data.pop("size", None) or data["length"]}
        data |= {"modality": ["record"] * n, "detected_by": [f"record:{name}"] * n, "file": [obj["key"]] * n}
        tables.append(pa.Table.from_pydict(data, schema=pa.schema([SCHEMA.field(c) for c in data])))
    return tables, problems


def build_manifest(
    source_url: str,
    storage_options: dict | None = None,
    *,
    exclude: dict[str, str] | None = None,
    id_column: str | None = None,
) -> tuple[pa.Table, list[dict]]:
    """List and classify `source_url`. `exclude` ({key: version}) is what the shard set already holds: samples
    that match it are skipped and changed or removed ones superseded (module docstring), which makes
    incremental runs cheap and keeps them in step with the source. Record files (streamtune.records) are
    read and listed one row per record, keyed `file#row` (or `file#<id_column value>`).
    Returns (manifest table, quarantine records).
    """
    fs, _ = storage.get_fs(source_url, storage_options)
    objects = list_objects(source_url, storage_options)
    problems: list[dict] = []
    found = _record_files(fs, objects)
    info_keys = _dataset_info_keys(objects, found)
    record_tables: list[pa.Table] = []
    with ThreadPoolExecutor(4) as pool:
        scans = pool.map(
            lambda o: _scan_record_file(fs, o, found[o["key"]], id_column),
            [o for o in objects if o["key"] in found],
        )
        for tables, bad in scans:
            record_tables += tables
            problems += bad
    if found:
        record_files.trim_heap()  # the scans' Python garbage goes back to the OS
    objects = [o for o in objects if o["key"] not in found]

    sidecar_rows: dict[str, dict] = {}
    for obj in objects:
        if posixpath.basename(obj["key"]) in SIDECAR_NAMES:
            rows, bad = _parse_sidecar(obj["key"], fs.cat_file(obj["path"]))
            sidecar_rows.update(rows)
            problems.extend(bad)

    current = {
        o["key"]: source_version(o["etag"], _sidecar_json(sidecar_rows.get(o["key"])))
        for o in objects
        if posixpath.basename(o["key"]) not in SIDECAR_NAMES
    }
    if exclude:
        for t in record_tables:
            current.update(zip(t["key"].to_pylist(), t["etag"].to_pylist(), strict=True))
        record_tables = [_unheld(t, exclude) for t in record_tables]
    todo, superseded = _diff(objects, current, exclude or {})
    heads = _read_heads(fs, todo)
    mores = _read_more(fs, todo, heads)
    records = []
    for obj, head, (more, more_at) in zip(todo, heads, mores, strict=True):
        modality, how = detect_modality(obj["key"], head, more, more_at)
        if obj["key"] in info_keys:
            modality, how = "dataset_info", "extension"
        records.append(
            {
                "sample_id": sample_id_of(obj["key"]),
                "key": obj["key"],
                "size": obj["size"],
                "etag": obj["etag"],
                "modality": modality,
                "detected_by": how,
                "sidecar": _sidecar_json(sidecar_rows.get(obj["key"])),
            }
        )
    records.extend(superseded)
    for target in sidecar_rows:
        if not any(o["key"] == target for o in objects):
            problems.append(
                quarantine.record(
                    sample_id_of(target), target, "manifest", Reason.SIDECAR_ROW, "file_name not found"
                )
            )
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    if record_tables:
        table = pa.concat_tables([table, *record_tables], promote_options="default").select(SCHEMA.names)
        table = table.cast(SCHEMA)
    source = {"url": source_url, "options": storage.public_options(storage_options)}
    return table.replace_schema_metadata({SOURCE_KEY: json.dumps(source)}), problems


def _unheld(table: pa.Table, held: dict[str, str]) -> pa.Table:
    """Rows of `table` whose (key, etag) the shard set does not hold already."""
    keep = [
        held.get(k) != v for k, v in zip(table["key"].to_pylist(), table["etag"].to_pylist(), strict=True)
    ]
    return table.filter(pa.array(keep, pa.bool_()))


def manifest_source(table: pa.Table) -> tuple[str, dict | None]:
    """(source URL, non-secret storage options) a manifest was listed from."""
    raw = (table.schema.metadata or {}).get(SOURCE_KEY.encode())
    if raw is None:
        raise ValueError(
            "this manifest does not record its source (written by an older version): pass --source"
        )
    source = json.loads(raw)
    return source["url"], source["options"] or None


def manifest_hash(table: pa.Table) -> str:
    """Content hash of a manifest (keys, etags, sizes, sidecar fields): the cache key of downstream stages.
    Rows are hashed in key order, 64k at a time (a manifest of record files may list millions)."""
    h = hashlib.sha256()
    cols = table.select(["key", "etag", "size", "sidecar"])
    order = pc.sort_indices(cols, [("key", "ascending")])
    for start in range(0, cols.num_rows, 65536):
        for row in cols.take(order.slice(start, 65536)).to_pylist():
            h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()


def summarize_manifest(table: pa.Table) -> dict:
    """Counts for people and artifacts. `objects` counts listed objects, a record file once; `samples`
    counts samples, every record one; `records` / `record_files` count what record files hold."""
    modality = table["modality"]
    counts = pc.value_counts(modality).to_pylist() if table.num_rows else []
    by_modality = {c["values"]: c["counts"] for c in counts}
    records = by_modality.get("record", 0)
    record_files_seen = pc.count_distinct(table["file"]).as_py() if records else 0  # null for objects
    # only object rows are selected (copied): a manifest may hold millions of records, each its own sample
    objects = pc.and_(
        pc.is_in(modality, value_set=pa.array(SAMPLE_MODALITIES)), pc.not_equal(modality, "record")
    )
    usable = table.select(["sample_id"]).filter(objects)
    superseded = table.select(["sample_id"]).filter(pc.equal(modality, "superseded"))
    return {
        "objects": table.num_rows - records + record_files_seen,
        "samples": (pc.count_distinct(usable["sample_id"]).as_py() if usable.num_rows else 0) + records,
        "bytes": pc.sum(table["size"]).as_py() or 0,
        "by_modality": dict(sorted(by_modality.items())),
        "with_sidecar": table.num_rows - table["sidecar"].null_count,
        "superseded_samples": pc.count_distinct(superseded["sample_id"]).as_py()
        if superseded.num_rows
        else 0,
        "records": records,
        "record_files": record_files_seen,
    }


def write_manifest(table: pa.Table, url: str, storage_options: dict | None = None) -> int:
    """Write the manifest as Parquet; returns its size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(url, buf.getvalue(), storage_options)
    return buf.tell()


def read_manifest(url: str, storage_options: dict | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
