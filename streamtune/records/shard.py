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
    plans: list[dict] = []
    start, acc = 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and acc + size > max_shard_bytes:
            plans.append(_plan(start_index + len(plans), positions[start:i], acc))
            start, acc = i, 0
        acc += size
    plans.append(_plan(start_index + len(plans), positions[start:], acc))
    return plans


def _plan(index: int, positions: np.ndarray, nbytes: int) -> dict:
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    runs = [[int(p[0]), int(p[-1]) + 1] for p in np.split(positions, breaks)]
    return {"index": index, "sample_ids": [], "records": runs, "bytes": int(nbytes)}


def planned_records(manifest: pa.Table, plan: dict) -> pa.Table:
    runs = plan.get("records") or []
    return pa.concat_tables([manifest.slice(a, b - a) for a, b in runs]) if runs else manifest.slice(0, 0)


def record_rows(fs, root: str, table: pa.Table) -> tuple[list[dict], list[dict], set[str]]:
    """Raw rows of the records in `table` (manifest rows), in its order, plus quarantine records and the
    keys of records whose file could not be read (left out of the shard's sources, so the next run
    retries them)."""
    by_file: dict[str, list[dict]] = defaultdict(list)
    for r in table.to_pylist():
        by_file[r["file"]].append(r)
    built: dict[str, dict] = {}
    problems: list[dict] = []
    unread: set[str] = set()
    for file_key, rows in by_file.items():
        fmt, compression = split_ext(file_key)
        path = f"{root}/{file_key}"
        try:
            kinds = None
            if fmt in ("parquet", "arrow"):
                schema = columnar.read_schema(fs, path, fmt)
                kinds = fields.media_kinds(schema.names, columnar.hf_features(schema))
            parsed = list(read(fs, path, fmt, compression, rows))
        except (OSError, ValueError, pa.ArrowException) as e:
            for r in rows:
                unread.add(r["key"])
                problems.append(quarantine.record(r["key"], r["key"], "shard", Reason.UNREADABLE, str(e)))
            continue
        refs: dict[str, dict[str, str]] = {}
        for r, record, error in parsed:
            if error:
                problems.append(fields.problem(r["key"], r["row"], r["line"], error))
                continue
            media, wanted, rest = fields.split_media(record, kinds or fields.media_kinds(list(record)))
            built[r["key"]] = {"media": media, "rest": rest, "file": file_key}
            if wanted:
                refs[r["key"]] = wanted
        _fetch_refs(fs, root, file_key, refs, built, problems)
    rows = [
        fields.raw_row(key, b["media"], b["rest"], [key])
        for key in table["key"].to_pylist()
        if (b := built.get(key)) is not None
    ]
    return rows, problems, unread


def _fetch_refs(fs, root: str, file_key: str, refs: dict, built: dict, problems: list[dict]) -> None:
    """Media that records name by relative path, fetched concurrently; a bad path is quarantined and the
    record keeps its other fields."""
    targets: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, wanted in refs.items():
        for kind, path in wanted.items():
            target = fields.resolve(file_key, path)
            if target is None:
                problems.append(_ref_problem(key, f"{kind} path {path!r} leaves the source"))
            else:
                targets[f"{root}/{target}"].append((key, kind))
    if not targets:
        return
    fetched = fs.cat(list(targets), on_error="return")
    for path, users in targets.items():
        data = fetched.get(path)
        for key, kind in users:
            if isinstance(data, bytes | bytearray) and data:
                built[key]["media"][kind] = bytes(data)
            else:
                problems.append(_ref_problem(key, f"{kind} {path[len(root) + 1 :]!r}: {data or 'empty'}"))


def _ref_problem(key: str, message: str) -> dict:
    return quarantine.record(key, key, "shard", Reason.MEDIA_REF, message)
