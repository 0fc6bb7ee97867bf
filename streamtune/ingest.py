"""Pack source objects into raw Arrow shards (the `shard` stage).

`plan_shards` groups a manifest's samples into shards of about `max_shard_bytes`; `write_raw_shard` fetches
one shard's objects (concurrently), builds the raw rows and writes the shard; `commit_raw_shards` merges the
results into the shard set's index (appending to an existing set for incremental runs) and writes it last.

Incremental runs also drop samples the manifest marks `superseded` (changed or removed at the source):
`plan_rewrites` finds the committed shards holding them and `rewrite_raw_shard` writes each again, under a new
name, without those rows. The commit swaps the entries; the old files stay until nothing reads them.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from streamtune import quarantine, shards, storage
from streamtune.manifest import sample_id_of, versions
from streamtune.quarantine import Reason
from streamtune.records import split_record_key
from streamtune.records.shard import (
    plan_record_shards,
    planned_records,
    read_record_sources,
    record_rows,
    stale_records,
    write_record_sources,
)

MEDIA = ("audio", "image", "video")
INLINE_MAX_BYTES = 64 << 20
REF_BYTES = 256  # what a reference costs in a shard, for planning


def _samples(manifest: pa.Table) -> dict[str, list[dict]]:
    """Object samples (record rows are planned and read by streamtune.records.shard)."""
    by_sample: dict[str, list[dict]] = defaultdict(list)
    manifest = manifest.filter(pc.not_equal(manifest["modality"], "record"))
    for row in manifest.to_pylist():
        if row["modality"] in ("sidecar", "unknown", "superseded", "dataset_info"):
            continue
        by_sample[row["sample_id"]].append(row)
    return dict(sorted(by_sample.items()))


def is_ref(row: dict, inline_max_bytes: int) -> bool:
    """Whether a manifest row's object stays at its source, referenced by the shard instead of copied."""
    return row["modality"] in MEDIA and row["size"] > inline_max_bytes


def plan_shards(
    manifest: pa.Table,
    *,
    max_shard_bytes: int = 64 << 20,
    start_index: int = 0,
    inline_max_bytes: int = INLINE_MAX_BYTES,
) -> list[dict]:
    """Group samples (in key order) into shards of at most `max_shard_bytes` (a larger sample gets its own).
    Media objects over `inline_max_bytes` become references and count as a few bytes.
    Records of record files follow in shards of their own, cut by records (`plan["records"]`)."""
    plans: list[dict] = []

    def new(index: int) -> dict:
        return {"index": index, "sample_ids": [], "bytes": 0, "inline_max_bytes": inline_max_bytes}

    current = new(start_index)
    for sample_id, rows in _samples(manifest).items():
        size = sum(REF_BYTES if is_ref(r, inline_max_bytes) else r["size"] for r in rows)
        if current["sample_ids"] and current["bytes"] + size > max_shard_bytes:
            plans.append(current)
            current = new(current["index"] + 1)
        current["sample_ids"].append(sample_id)
        current["bytes"] += size
    if current["sample_ids"]:
        plans.append(current)
    start = plans[-1]["index"] + 1 if plans else start_index
    return plans + plan_record_shards(manifest, max_shard_bytes, start)


def unusable_objects(manifest: pa.Table) -> list[dict]:
    """Quarantine records for objects no stage can use (unknown type)."""
    return [
        quarantine.record(
            r["sample_id"], r["key"], "shard", Reason.UNSUPPORTED, "not audio, image, video or text"
        )
        for r in manifest.to_pylist()
        if r["modality"] == "unknown"
    ]


def _build_row(
    sample_id: str, rows: list[dict], blobs: dict[str, bytes], problems: list[dict], refs: dict[str, dict]
) -> dict:
    out: dict = {
        "sample_id": sample_id,
        "audio": None,
        "image": None,
        "video": None,
        "text": None,
        "meta": None,
        "sources": [],
        "refs": None,
    }
    meta: dict = {}
    for r in sorted(rows, key=lambda r: r["key"]):
        key, modality = r["key"], r["modality"]
        if r["sidecar"]:
            meta.update(json.loads(r["sidecar"]))
        if modality in MEDIA:
            if out[modality] is not None or any(f["modality"] == modality for f in out["refs"] or []):
                problems.append(
                    quarantine.record(
                        sample_id, key, "shard", Reason.DUPLICATE, f"sample already has {modality}"
                    )
                )
                continue
            if key in refs:
                out["refs"] = [*(out["refs"] or []), refs[key]]
            else:
                out[modality] = blobs[key]
            out["sources"].append(key)
            continue
        data = blobs[key]
        if modality == "text":
            try:
                out["text"] = data.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                problems.append(quarantine.record(sample_id, key, "shard", Reason.ENCODING, str(e)))
                continue
        elif modality == "json":
            try:
                value = json.loads(data)
            except UnicodeDecodeError as e:
                problems.append(quarantine.record(sample_id, key, "shard", Reason.ENCODING, str(e)))
                continue
            except json.JSONDecodeError as e:
                problems.append(quarantine.record(sample_id, key, "shard", Reason.BROKEN_SIDECAR, str(e)))
                continue
            meta.update(value if isinstance(value, dict) else {"json": value})
        out["sources"].append(key)
    if out["text"] is None:
        for field in ("text", "caption", "transcription", "label"):
            if isinstance(meta.get(field), str):
                out["text"] = meta[field]
                break
    out["meta"] = json.dumps(meta, sort_keys=True, default=str) if meta else None
    return out


def write_raw_shard(
    source_url: str,
    manifest: pa.Table,
    plan: dict,
    out_prefix: str,
    *,
    source_options: dict | None = None,
    out_options: dict | None = None,
) -> dict:
    """Fetch one planned shard's objects and write `out_prefix/shard-NNNNN.arrow`.

    Returns {"entry": the shard's index entry (with "sources": {key: version}), "quarantine": [records]}.
    """
    # this shard's rows only, selected in Arrow: the manifest may list millions of objects
    full_manifest = manifest
    wanted = pa.array(sorted(set(plan["sample_ids"])), pa.string())
    manifest = manifest.filter(pc.is_in(manifest["sample_id"], value_set=wanted))
    by_sample = _samples(manifest)
    fs, root = storage.get_fs(source_url, source_options)
    root = root.rstrip("/")
    # large media stay at the source: the row holds (url, version, size) and decode reads them by range
    inline_max = plan.get("inline_max_bytes", INLINE_MAX_BYTES)
    refs = {
        r["key"]: {
            "modality": r["modality"],
            "key": r["key"],
            "url": storage.join(source_url.rstrip("/"), r["key"]),
            "version": r["etag"],
            "size": r["size"],
        }
        for rows in by_sample.values()
        for r in rows
        if is_ref(r, inline_max)
    }
    keys = [r["key"] for rows in by_sample.values() for r in rows if r["key"] not in refs]
    paths = [f"{root}/{k}" for k in keys]
    fetched = fs.cat(paths, on_error="return") if paths else {}
    problems: list[dict] = []
    blobs: dict[str, bytes] = {}
    unread: set[str] = set()
    for key, path in zip(keys, paths, strict=True):
        value = fetched.get(path)
        if isinstance(value, BaseException) or value is None:
            problems.append(
                quarantine.record(
                    sample_id_of(key), key, "shard", Reason.UNREADABLE, str(value or "not returned")
                )
            )
            unread.add(key)
            blobs[key] = b""
        else:
            blobs[key] = value
    rows = []
    for sample_id in plan["sample_ids"]:
        sample_rows = [r for r in by_sample[sample_id] if r["key"] not in unread]
        if sample_rows:
            rows.append(_build_row(sample_id, sample_rows, blobs, problems, refs))
    table = pa.Table.from_pylist(rows, schema=shards.RAW_SCHEMA)
    if plan.get("records"):  # rows of record files, read by range (streamtune.records)
        chosen = planned_records(full_manifest, plan)
        built, bad, unread_records = record_rows(fs, root, chosen)
        table = pa.concat_tables([table, built]) if table.num_rows else built
        problems += bad
        unread |= unread_records
    url = storage.join(out_prefix, shards.shard_name(plan["index"]))
    entry = shards.write_shard(table, url, out_options)
    # every file of these samples as the manifest saw it (unusable ones too, so an unchanged sample stays
    # unchanged); a file that could not be read is left out, so the next incremental run retries its sample
    entry["sources"] = {k: v for k, v in versions(manifest).items() if k not in unread}
    if plan.get("records"):  # records' versions go to a file beside the shard, not into index.json
        held = chosen.select(["key", "etag", "file"])
        if unread:
            held = held.filter(
                pc.invert(pc.is_in(held["key"], value_set=pa.array(sorted(unread), pa.string())))
            )
        entry["record_sources"] = write_record_sources(out_prefix, plan["index"], held, out_options)
    return {"entry": entry, "quarantine": problems}


def superseded_samples(manifest: pa.Table) -> set[str]:
    return set(manifest.filter(pc.equal(manifest["modality"], "superseded"))["sample_id"].to_pylist())


def plan_rewrites(
    entries: list[dict],
    stale: set[str],
    *,
    start_index: int,
    prefix: str | None = None,
    storage_options: dict | None = None,
) -> list[dict]:
    """One plan per committed shard that holds a stale sample: {index (of the new shard), replaces, drop}.
    Stale records are matched against a shard's record sources when `prefix` (the shard set) is given, else
    every shard holding records of the same file is planned (rewriting it drops what it has)."""
    plans = []
    stale_by_file: dict[str, set[str]] = defaultdict(set)
    for key in stale:
        if (found := split_record_key(key)) is not None:
            stale_by_file[found[0]].add(key)
    for entry in entries:
        drop = {sample_id_of(k) for k in entry.get("sources") or {}} & stale
        if stale_by_file and entry.get("record_sources"):
            held = read_record_sources(prefix, entry, storage_options) if prefix is not None else None
            drop |= stale_records(entry, stale_by_file, held)
        drop = sorted(drop)
        if drop:
            plans.append({"index": start_index + len(plans), "replaces": entry["path"], "drop": drop})
    return plans


def rewrite_raw_shard(prefix: str, entry: dict, plan: dict, storage_options: dict | None = None) -> dict:
    """Write `entry`'s rows minus `plan["drop"]` as shard `plan["index"]`. Returns {"entry" (None when no row is
    left), "replaces", "quarantine": []}."""
    drop = set(plan["drop"])
    table = shards.read_shard_table(prefix, entry, storage_options)
    keep = [i for i, sample_id in enumerate(table.column("sample_id").to_pylist()) if sample_id not in drop]
    result: dict = {"entry": None, "replaces": entry["path"], "quarantine": []}
    if keep:
        url = storage.join(prefix, shards.shard_name(plan["index"]))
        new = shards.write_shard(table.take(keep), url, storage_options)
        new["sources"] = {k: v for k, v in entry["sources"].items() if sample_id_of(k) not in drop}
        if entry.get("record_sources"):
            held = read_record_sources(prefix, entry, storage_options)
            held = held.filter(
                pc.invert(pc.is_in(held["key"], value_set=pa.array(sorted(drop), pa.string())))
            )
            new["record_sources"] = write_record_sources(prefix, plan["index"], held, storage_options)
        # lets the decode stage derive this shard's features from the old one's instead of decoding again
        new["derived_from"] = {"path": entry["path"], "checksum": entry["checksum"], "dropped": sorted(drop)}
        result["entry"] = new
    return result


def ingested_sources(shards_prefix: str, storage_options: dict | None = None) -> dict[str, str]:
    """{key: version} of every object (and record) already in the committed shard set at `shards_prefix`
    (empty if none).

    A sample held by more than one shard (left by versions that appended changed files instead of
    replacing them) gets versions that match nothing, so the next incremental run rebuilds it once and
    supersedes every old row."""
    if not storage.exists(storage.join(shards_prefix, "index.json"), storage_options):
        return {}
    index = shards.read_index(shards_prefix, storage_options)
    seen: dict[str, str] = {}
    holders: dict[str, set[str]] = defaultdict(set)
    for entry in index["shards"]:
        for key, version in (entry.get("sources") or {}).items():
            seen[key] = version
            holders[sample_id_of(key)].add(entry["path"])
    for key in seen:
        if len(holders[sample_id_of(key)]) > 1:
            seen[key] = "held-twice"
    for entry in index["shards"]:  # records: versions in the files beside their shards
        if entry.get("record_sources"):
            held = read_record_sources(shards_prefix, entry, storage_options)
            seen.update(zip(held["key"].to_pylist(), held["version"].to_pylist(), strict=True))
    return seen


def next_shard_index(shards_prefix: str, storage_options: dict | None = None) -> int:
    if not storage.exists(storage.join(shards_prefix, "index.json"), storage_options):
        return 0
    names = [e["path"] for e in shards.read_index(shards_prefix, storage_options)["shards"]]
    return max((int(n.split("-")[1].split(".")[0]) for n in names), default=-1) + 1


def commit_raw_shards(
    out_prefix: str,
    results: list[dict],
    storage_options: dict | None = None,
    *,
    append: bool = True,
    problems: list[dict] | None = None,
) -> dict:
    """Write the quarantine list, then index.json (last), merging with an existing index when appending.
    A result with "replaces" takes that shard's place (rewrites from `rewrite_raw_shard`)."""
    entries = [r["entry"] for r in results if r["entry"] is not None]
    if append and storage.exists(storage.join(out_prefix, "index.json"), storage_options):
        old = shards.read_index(out_prefix, storage_options)
        gone = {e["path"] for e in entries} | {r["replaces"] for r in results if r.get("replaces")}
        entries = [e for e in old["shards"] if e["path"] not in gone] + entries
    records = list(problems or []) + [q for r in results for q in r["quarantine"]]
    first = min((r["entry"]["path"] for r in results if r["entry"] is not None), default="empty")
    qname = f"quarantine-{first.split('.')[0]}.parquet"
    if records:
        quarantine.write_quarantine(storage.join(out_prefix, "quarantine", qname), records, storage_options)
    return shards.commit_index(out_prefix, entries, shards.RAW_SCHEMA, storage_options)
