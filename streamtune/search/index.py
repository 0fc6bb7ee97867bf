"""Feature set -> search index (Parquet parts + an FTS5 database + index.json written last).

One part per feature shard, named by the shard's checksum and the index settings: a rebuild keeps the
parts of unchanged shards as they are and reads only changed shards, where a row whose text is unchanged
keeps its embedding (keyed by sample_id, segment and text hash): only new or changed transcripts are
embedded again. Samples gone from the features are gone from the index. See README.md in this folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamtune import storage
from streamtune.config import IndexConfig
from streamtune.search import ann, lexical
from streamtune.shards.index import read_index, read_shard_table

FORMAT = "streamtune-search-index"
VERSION = 1
CODE_VERSION = "index-1"
MANIFEST = "index.json"
PARTS = "parts"
FEATURE_COLUMNS = (
    "sample_id", "text", "meta", "sources", "transcript", "segments", "language", "audio_seconds",
    "clip_embedding", "tags", "segment_index", "t0", "t1", "frame_times", "frame_embeddings", "thumbnails",
)  # fmt: skip


class SearchError(ValueError):
    """A user error: the index or its features cannot be used, or a query or filter is unusable."""


def default_index_url(features_url: str) -> str:
    """`index/` beside the feature set (`s3://b/work/features` -> `s3://b/work/index`)."""
    url = features_url.rstrip("/")
    if "://" in url:
        proto, rest = url.split("://", 1)
        parent = posixpath.dirname(rest)
        return f"{proto}://{parent}/index" if parent else f"{proto}://{rest}-index"
    return os.path.join(os.path.dirname(os.path.abspath(url)), "index")


def settings_key(cfg: IndexConfig) -> dict[str, Any]:
    """What changes the stored vectors: a change rebuilds every part."""
    return {"text_model": cfg.text_model, "vector_dtype": cfg.vector_dtype, "thumbnails": cfg.thumbnails,
            "code": CODE_VERSION}  # fmt: skip


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    try:
        data = storage.read_json(storage.join(url, MANIFEST), storage_options)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise SearchError(f"{storage.join(url, MANIFEST)} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SearchError(f"{storage.join(url, MANIFEST)} is not a {FORMAT} manifest")
    if data.get("version") != VERSION:
        raise SearchError(f"{url}: index version {data.get('version')!r}; this reader knows {VERSION}")
    return data


def part_schema(dim: int, clip_dim: int | None, dtype: str) -> pa.Schema:
    vec = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("sample_id", pa.string()),
        pa.field("segment_index", pa.int32()),
        pa.field("modality", pa.string()),
        pa.field("source", pa.string()),
        pa.field("t0", pa.float64()),
        pa.field("t1", pa.float64()),
        pa.field("transcript", pa.string()),
        pa.field("segments", pa.string()),
        pa.field("language", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("text_hash", pa.string()),
        pa.field("row_hash", pa.string()),
        pa.field("feature_shard", pa.string()),
        pa.field("feature_row", pa.int32()),
        pa.field("text_embedding", pa.list_(vec, dim)),
    ]
    if clip_dim:
        fields += [
            pa.field("clip_embedding", pa.list_(vec, clip_dim)),
            pa.field("frame_times", pa.list_(pa.float32())),
            pa.field("frame_embeddings", pa.list_(pa.list_(vec, clip_dim))),
        ]
    fields.append(pa.field("thumbnail", pa.binary()))
    return pa.schema(fields)


def _modality(row: dict) -> str:
    if row.get("t0") is not None:
        return "video"
    if row.get("transcript") is not None or row.get("audio_seconds") is not None:
        return "audio"
    if row.get("clip_embedding") is not None:
        return "image"
    return "text"


def segment_text(row: dict) -> str:
    """What a segment is searched by: its transcript, else the sample's text."""
    return (row.get("transcript") or row.get("text") or "").strip()


def _vectors(values: list, dim: int, dtype: str) -> pa.Array:
    """fixed_size_list column from rows of (dim,) vectors or None."""
    np_type = np.float16 if dtype == "float16" else np.float32
    mask = np.array([v is None for v in values], bool)
    flat = np.zeros((len(values), dim), np_type)
    for i, v in enumerate(values):
        if v is not None:
            flat[i] = np.asarray(v, np.float32)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
    return pa.FixedSizeListArray.from_arrays(arr.values, dim, mask=pa.array(mask)) if mask.any() else arr


def _clip_dim(schema: pa.Schema) -> int | None:
    if "clip_embedding" in schema.names:
        return int(schema.field("clip_embedding").type.list_size)
    return None


def _read_part(url: str, storage_options: dict | None, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.arrow_fs(url, storage_options)
    return pq.read_table(path, filesystem=fs, columns=columns)


ARROW_COLUMNS = ("clip_embedding", "frame_times", "frame_embeddings", "thumbnails")


def _part_rows(
    table: pa.Table, shard_path: str, clip_dim: int | None, cfg: IndexConfig
) -> tuple[dict[str, list], list[str], list[str]]:
    """Plain columns of a part (vectors stay in Arrow: see `_vector_columns`), the texts to embed and their
    hashes."""
    rows = table.drop_columns([c for c in ARROW_COLUMNS if c in table.column_names]).to_pylist()
    clip, frames = _row_vectors(table, clip_dim)
    thumbs = _middle_thumbnails(table) if cfg.thumbnails else [None] * table.num_rows
    cols: dict[str, list] = {k: [] for k in ("sample_id", "segment_index", "modality", "source", "t0", "t1",
        "transcript", "segments", "language", "meta", "tags", "text_hash", "row_hash", "feature_shard",
        "feature_row", "thumbnail")}  # fmt: skip
    texts, hashes = [], []
    for i, row in enumerate(rows):
        text = segment_text(row)
        text_hash = _hash(text)[:24]
        sources = row.get("sources") or []
        t0 = row.get("t0")
        t1 = row.get("t1") if t0 is not None else row.get("audio_seconds")
        has_clip = clip is not None and bool(clip[1][i])
        values = {
            "sample_id": row["sample_id"],
            "segment_index": int(row.get("segment_index") or 0),
            "modality": "video" if t0 is not None else _modality({**row, "clip_embedding": has_clip or None}),
            "source": sources[0] if sources else row["sample_id"],
            "t0": float(t0 or 0.0),
            "t1": float(t1) if t1 is not None else None,
            "transcript": text or None,
            "segments": row.get("segments"),
            "language": row.get("language"),
            "meta": row.get("meta"),
            "tags": row.get("tags"),
            "text_hash": text_hash,
            "feature_shard": shard_path,
            "feature_row": i,
            "thumbnail": thumbs[i],
        }
        vectors = hashlib.sha256()
        if has_clip:
            vectors.update(clip[0][i].tobytes())
        if frames is not None:
            vectors.update(frames[0][frames[1][i] : frames[1][i + 1]].tobytes())
        scalars = {k: v for k, v in values.items() if k not in ("thumbnail", "feature_row")}
        values["row_hash"] = _hash(scalars, vectors.hexdigest(), thumbs[i] is not None)[:24]
        for k, v in values.items():
            cols[k].append(v)
        texts.append(text)
        hashes.append(text_hash)
    return cols, texts, hashes


def _row_vectors(table: pa.Table, clip_dim: int | None):
    """((N, D) clip embeddings, validity) and ((F, D) frame embeddings, row offsets), None where absent."""
    clip = frames = None
    if clip_dim and "clip_embedding" in table.column_names:
        col = table.column("clip_embedding")
        clip = (_fixed_to_numpy(col, clip_dim), np.asarray(col.is_valid()))
    if clip_dim and "frame_embeddings" in table.column_names:
        arr = table.column("frame_embeddings").combine_chunks()
        off = arr.offsets.to_numpy()
        flat = arr.flatten().flatten().to_numpy(zero_copy_only=False)
        frames = (flat.reshape(-1, clip_dim), off - off[0])
    return clip, frames


def _middle_thumbnails(table: pa.Table) -> list[bytes | None]:
    if "thumbnails" not in table.column_names:
        return [None] * table.num_rows
    arr = table.column("thumbnails").combine_chunks()
    off = arr.offsets.to_numpy()
    valid = np.asarray(arr.is_valid())
    values = arr.values
    out: list[bytes | None] = []
    for i in range(len(arr)):
        n = int(off[i + 1] - off[i])
        out.append(values[int(off[i] + n // 2)].as_py() if valid[i] and n else None)
    return out


def _vector_columns(table: pa.Table, clip_dim: int, dtype: str) -> dict[str, pa.Array]:
    """clip_embedding, frame_times, frame_embeddings of a feature table at the index's vector width."""
    vec = pa.float16() if dtype == "float16" else pa.float32()
    want = {"clip_embedding": pa.list_(vec, clip_dim), "frame_times": pa.list_(pa.float32()),
            "frame_embeddings": pa.list_(pa.list_(vec, clip_dim))}  # fmt: skip
    out = {}
    for name, kind in want.items():
        if name in table.column_names:
            out[name] = table.column(name).combine_chunks().cast(kind)
        else:
            out[name] = pa.nulls(table.num_rows, kind)
    return out


def build_index(
    features_url: str,
    out_url: str | None = None,
    cfg: IndexConfig | None = None,
    storage_options: dict | None = None,
    embedder=None,
    progress=None,
) -> dict:
    """Build or update the index of `features_url` at `out_url` (default `index/` beside it).

    Returns the committed manifest; its `stats` say how many rows were embedded and how many reused.
    `embedder` (anything with `.embed(texts) -> (N, D)` and `.dim`) replaces the configured text model.
    """
    cfg = cfg or IndexConfig()
    out_url = (out_url or default_index_url(features_url)).rstrip("/")
    t_start = time.perf_counter()
    features = read_index(features_url, storage_options)
    schema: pa.Schema = features["schema"]
    clip_dim = _clip_dim(schema)
    old = read_manifest(out_url, storage_options)
    key = settings_key(cfg)
    same_settings = bool(old) and old.get("settings_key") == key and old.get("clip_dim") == clip_dim
    old_parts = {p["source"]["path"]: p for p in (old or {}).get("parts", [])} if same_settings else {}

    if embedder is None:
        from streamtune.search.embed import text_embedder

        embedder = text_embedder(cfg.text_model, cfg.text_batch)
    dim = int(embedder.dim)
    out_schema = part_schema(dim, clip_dim, cfg.vector_dtype)
    columns = [c for c in FEATURE_COLUMNS if c in schema.names]
    stats = {"shards": 0, "shards_reused": 0, "rows": 0, "embedded": 0, "reused": 0, "removed": 0,
             "embed_seconds": 0.0}  # fmt: skip

    # Which shards need work; the embeddings of rows in parts that will be replaced can be reused.
    todo, parts = [], []
    for entry in features["shards"]:
        prev = old_parts.get(entry["path"])
        if prev and prev["source"]["checksum"] == entry["checksum"]:
            parts.append(prev)
            stats["shards_reused"] += 1
        else:
            todo.append(entry)
    kept = {p["path"] for p in parts}
    stale = [p for p in (old or {}).get("parts", []) if p["path"] not in kept]
    reuse: dict[tuple[str, int, str], np.ndarray] = {}
    if todo and same_settings:
        for p in stale:
            t = _read_part(storage.join(out_url, p["path"]), storage_options,
                           ["sample_id", "segment_index", "text_hash", "text_embedding"])  # fmt: skip
            vecs = _fixed_to_numpy(t.column("text_embedding"), dim)
            for sid, seg, th, v in zip(t.column("sample_id").to_pylist(), t.column("segment_index").to_pylist(),
                                       t.column("text_hash").to_pylist(), vecs, strict=True):  # fmt: skip
                reuse[(sid, seg, th)] = v
    stats["removed"] = sum(int(p["rows"]) for p in stale) if old else 0

    for n, entry in enumerate(todo):
        table = read_shard_table(features_url, entry, storage_options, columns)
        cols, texts, hashes = _part_rows(table, entry["path"], clip_dim, cfg)
        vectors = np.zeros((len(texts), dim), np.float32)
        missing = []
        for i, (sid, seg, th) in enumerate(
            zip(cols["sample_id"], cols["segment_index"], hashes, strict=True)
        ):
            v = reuse.get((sid, seg, th))
            if v is not None:
                vectors[i] = v
                stats["reused"] += 1
            elif texts[i]:
                missing.append(i)
        if missing:
            t0 = time.perf_counter()
            vectors[missing] = embedder.embed([texts[i] for i in missing])
            stats["embed_seconds"] += time.perf_counter() - t0
            stats["embedded"] += len(missing)
        has_text = [bool(t) for t in texts]
        arrow = _vector_columns(table, clip_dim, cfg.vector_dtype) if clip_dim else {}
        arrays = []
        for field in out_schema:
            if field.name == "text_embedding":
                arrays.append(_vectors([v if ok else None for v, ok in zip(vectors, has_text, strict=True)],
                                       dim, cfg.vector_dtype))  # fmt: skip
            elif field.name in arrow:
                arrays.append(arrow[field.name])
            else:
                arrays.append(pa.array(cols[field.name], field.type))
        part = pa.Table.from_arrays(arrays, schema=out_schema)
        buf = io.BytesIO()
        pq.write_table(part, buf, compression="zstd", row_group_size=65536)
        data = buf.getvalue()
        stem = posixpath.basename(entry["path"]).rsplit(".", 1)[0]
        path = f"{PARTS}/{stem}-{_hash(entry['checksum'], key, clip_dim)[:16]}.parquet"
        storage.write_bytes(storage.join(out_url, path), data, storage_options)
        kinds = {k: cols["modality"].count(k) for k in sorted(set(cols["modality"]))}
        parts.append({"path": path, "rows": part.num_rows, "bytes": len(data), "modalities": kinds,
                      "source": {"path": entry["path"], "checksum": entry["checksum"]}})  # fmt: skip
        stats["shards"] += 1
        if progress:
            progress(n + 1, len(todo))
    parts.sort(key=lambda p: p["source"]["path"])
    stats["rows"] = sum(int(p["rows"]) for p in parts)

    t_ann = time.perf_counter()
    ann_entry = _ann(out_url, parts, old if same_settings else None, cfg, dim, clip_dim, storage_options)
    stats["ann_seconds"] = round(time.perf_counter() - t_ann, 3)
    lex = _lexical(out_url, parts, old, storage_options)
    counts: dict[str, int] = {}
    for p in parts:
        for kind, c in (p.get("modalities") or {}).items():
            counts[kind] = counts.get(kind, 0) + c
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "features_url": features_url,
        "features_rows": int(features.get("rows", 0)),
        "settings_key": key,
        "text_model": cfg.text_model,
        "text_dim": dim,
        "clip_dim": clip_dim,
        "clip_model": cfg.clip_model,
        "clip_pretrained": cfg.clip_pretrained,
        "vector_dtype": cfg.vector_dtype,
        "parts": parts,
        "lexical": lex,
        "ann": ann_entry,
        "rows": stats["rows"],
        "modalities": counts,
        "bytes": sum(int(p["bytes"]) for p in parts) + int(lex["bytes"]) + _ann_bytes(ann_entry),
        "stats": stats | {"seconds": round(time.perf_counter() - t_start, 3)},
    }
    storage.write_json(storage.join(out_url, MANIFEST), manifest, storage_options)
    _remove_unlisted(out_url, old, manifest, storage_options)
    return manifest


def _fixed_to_numpy(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    """(N, dim) float32 from a fixed_size_list column; null rows are zeros."""
    out = np.zeros((len(col), dim), np.float32)
    pos = 0
    for chunk in col.chunks:
        n = len(chunk)
        if n:
            values = chunk.values.to_numpy(zero_copy_only=False)
            start = chunk.offset * dim
            out[pos : pos + n] = values[start : start + n * dim].reshape(n, dim)
            if chunk.null_count:
                out[pos : pos + n][np.asarray(chunk.is_null())] = 0
        pos += n
    return out


SLOT_BITS = 32  # FTS rowid = part slot << 32 | row in the part: stable while the part stays


def _slots(parts: list[dict], old: dict | None) -> None:
    """Give each part an FTS slot: kept parts keep theirs, new parts take numbers never used before."""
    used = [p.get("fts") for p in (old or {}).get("parts", [])] + [p.get("fts") for p in parts]
    nxt = max([u for u in used if u is not None], default=-1) + 1
    for p in parts:
        if p.get("fts") is None:
            p["fts"] = nxt
            nxt += 1


def _lexical(out_url: str, parts: list[dict], old: dict | None, storage_options: dict | None) -> dict:
    """The FTS5 database over every part's transcripts (rowid: part slot << 32 | row). With an earlier one of
    the same kind, only removed parts' rows are deleted and new parts' rows added; else it is built anew."""
    prev = (old or {}).get("lexical") or {}
    incremental = prev.get("rowids") == "slot" and all(p.get("fts") is not None for p in old["parts"])
    if not incremental:
        for p in parts:
            p.pop("fts", None)
        old = None
    _slots(parts, old)
    key = _hash([p["path"] for p in parts])[:16]
    if prev.get("key") == key and incremental:
        return prev
    path = f"lexical-{key}.sqlite"
    kept = {p["path"] for p in parts}
    gone = [p for p in (old or {}).get("parts", []) if p["path"] not in kept]
    had = {p["path"] for p in (old or {}).get("parts", [])}
    new = [p for p in parts if p["path"] not in had] if old else parts
    if old and len(new) == len(parts):  # nothing kept (e.g. new settings): a fresh build is cheaper
        old, gone = None, []

    def rows(some: list[dict]):
        for p in some:
            t = _read_part(storage.join(out_url, p["path"]), storage_options, ["transcript"])
            for i, text in enumerate(t.column("transcript").to_pylist()):
                if text:
                    yield (int(p["fts"]) << SLOT_BITS) + i, text

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "lexical.sqlite")
        if old:
            with open(local, "wb") as f:
                f.write(storage.read_bytes(storage.join(out_url, prev["path"]), storage_options))
            n = lexical.update(local, rows(gone), rows(new))
        else:
            n = lexical.build(local, rows(new))
        with open(local, "rb") as f:
            data = f.read()
    storage.write_bytes(storage.join(out_url, path), data, storage_options)
    return {"path": path, "key": key, "rows": n, "bytes": len(data), "rowids": "slot",
            "updated": {"deleted_parts": len(gone), "added_parts": len(new)} if old else None,
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def _remove_unlisted(out_url: str, old: dict | None, new: dict, storage_options: dict | None) -> None:
    """Delete files the previous manifest listed and the new one does not (after the new one is committed)."""
    if not old:
        return
    keep = {p["path"] for p in new["parts"]} | {new["lexical"]["path"]} | set(_ann_files(new.get("ann")))
    gone = [p["path"] for p in old.get("parts", [])] + [(old.get("lexical") or {}).get("path")]
    gone += _ann_files(old.get("ann"))
    fs, root = storage.get_fs(out_url, storage_options)
    for rel in gone:
        if rel and rel not in keep:
            try:
                fs.rm_file(posixpath.join(root, rel) if "://" in out_url else os.path.join(root, rel))
            except FileNotFoundError:
                pass


def part_vectors(table: pa.Table, kind: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A part's vectors of one kind and the part row of each: `text` = transcript embeddings of rows with
    text; `frames` = every keyframe embedding, then the clip_embedding of rows without frames."""
    if kind == "text":
        col = table.column("text_embedding")
        valid = np.asarray(col.is_valid())
        return _fixed_to_numpy(col, dim)[valid], np.flatnonzero(valid)
    clip = _fixed_to_numpy(table.column("clip_embedding"), dim)
    has_clip = np.asarray(table.column("clip_embedding").is_valid())
    frames = table.column("frame_embeddings").combine_chunks()
    lengths = frames.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = frames.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    only_clip = has_clip & (lengths == 0)
    vecs = np.concatenate([flat, clip[only_clip]])
    owners = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.flatnonzero(only_clip)])
    return vecs, owners.astype(np.int64)


ANN_COLUMNS = {"text": ["text_embedding"], "frames": ["clip_embedding", "frame_embeddings"]}


def _ann(out_url: str, parts: list[dict], old: dict | None, cfg: IndexConfig, dim: int, clip_dim: int | None,
         storage_options: dict | None) -> dict | None:  # fmt: skip
    """IVF centroids and per-part list files once the index has `ann_min_rows` rows (None below: exact scan).
    Centroids are kept while the row count stays within 4x of the count they were trained on; then only new
    parts are assigned to lists."""
    rows = sum(int(p["rows"]) for p in parts)
    if cfg.ann_min_rows <= 0 or rows < cfg.ann_min_rows:
        return None
    out = {}
    for kind, d in (("text", dim), ("frames", clip_dim)):
        if not d:
            continue
        prev = ((old or {}).get("ann") or {}).get(kind)
        lists = ann.n_lists(rows, cfg.ann_lists)
        if prev and (not cfg.ann_lists or prev["lists"] == lists) and prev["trained_rows"] / 4 <= rows <= 4 * prev["trained_rows"]:  # fmt: skip
            entry = dict(prev, parts={})
            cent = ann.read_centroids(_read_part(storage.join(out_url, prev["centroids"]), storage_options))
        else:
            cent = ann.train(_ann_sample(out_url, parts, kind, d, lists, storage_options), lists)
            key = _hash(kind, [p["path"] for p in parts], lists)[:16]
            entry = {"centroids": f"ann/{kind}-centroids-{key}.parquet", "key": key, "lists": len(cent),
                     "trained_rows": rows, "parts": {}}  # fmt: skip
            data = ann.centroids_bytes(cent)
            storage.write_bytes(storage.join(out_url, entry["centroids"]), data, storage_options)
            entry["centroids_bytes"] = len(data)
            prev = None
        for p in parts:
            if prev and p["path"] in prev["parts"]:
                entry["parts"][p["path"]] = prev["parts"][p["path"]]
                continue
            t = _read_part(storage.join(out_url, p["path"]), storage_options, ANN_COLUMNS[kind])
            vecs, _ = part_vectors(t, kind, d)
            stem = posixpath.basename(p["path"]).rsplit(".", 1)[0]
            path = f"ann/{stem}-{kind}-{entry['key']}.parquet"
            data = ann.lists_bytes(ann.assign(vecs, cent))
            storage.write_bytes(storage.join(out_url, path), data, storage_options)
            entry["parts"][p["path"]] = {"path": path, "bytes": len(data)}
        out[kind] = entry
    return out


def _ann_sample(
    out_url: str, parts: list[dict], kind: str, dim: int, lists: int, storage_options
) -> np.ndarray:
    """About `ann.PER_LIST` vectors per list, drawn from every part in proportion to its rows."""
    rows = sum(int(p["rows"]) for p in parts)
    rng = np.random.default_rng(0)
    out = []
    for p in parts:
        t = _read_part(storage.join(out_url, p["path"]), storage_options, ANN_COLUMNS[kind])
        vecs, _ = part_vectors(t, kind, dim)
        take = min(len(vecs), int(np.ceil(ann.PER_LIST * lists * int(p["rows"]) / max(rows, 1))))
        out.append(vecs[np.sort(rng.choice(len(vecs), size=take, replace=False))] if take else vecs[:0])
    return np.concatenate(out)


def _ann_files(entry: dict | None) -> list[str]:
    return [
        f for e in (entry or {}).values() for f in [e["centroids"], *(v["path"] for v in e["parts"].values())]
    ]


def _ann_bytes(entry: dict | None) -> int:
    return sum(
        e["centroids_bytes"] + sum(v["bytes"] for v in e["parts"].values()) for e in (entry or {}).values()
    )
