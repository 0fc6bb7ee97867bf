"""What a work prefix holds right now (shard set, feature set, quarantine), and numbers written for people.

The state is read from storage, not from what one run did, so a report made by a run that found nothing new
still tells the truth about the data.
"""

from __future__ import annotations

import posixpath
from typing import Any

from streamtune import shards, storage
from streamtune.quarantine import SENTENCES, read_quarantine
from streamtune.records import is_record_key
from streamtune.records.shard import record_holders


def shard_set_state(prefix: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Shards, rows and bytes of the committed shard set at `prefix` (zeros when none is committed)."""
    if not storage.exists(storage.join(prefix, "index.json"), storage_options):
        return {"committed": False, "shards": 0, "rows": 0, "bytes": 0, "entries": []}
    index = shards.read_index(prefix, storage_options)
    entries = [{k: e.get(k) for k in ("path", "rows", "bytes", "checksum")} for e in index["shards"]]
    out = {"committed": True, "shards": len(entries), "rows": index["rows"], "bytes": index["bytes"]}
    return out | {"entries": entries, "stats": index.get("stats") or {}, "sources": _sources(index)}


def _number(name: str) -> int:
    digits = "".join(c for c in name.rsplit("-", 1)[-1] if c.isdigit())
    return int(digits) if digits else -1


def _sources(index: dict) -> dict[str, int]:
    """{object key: number of the newest shard holding it}."""
    out: dict[str, int] = {}
    for e in index["shards"]:
        for key in e.get("sources") or {}:
            out[key] = max(out.get(key, -1), _number(e["path"]))
    return out


def current_quarantine(work_url: str, storage_options: dict | None = None) -> list[dict]:
    """Every input the data currently leaves out, with its reason: the raw shard set's quarantine files and
    the feature set's quarantine table. A record is dropped once a later commit ingested its object again
    (a shard numbered after the commit the record came from holds it)."""
    raw = storage.join(work_url, "shards")
    ingested = shard_set_state(raw, storage_options).get("sources") or {}
    records: dict[tuple, dict] = {}
    fs, root = storage.get_fs(storage.join(raw, "quarantine"), storage_options)
    files = sorted(fs.glob(posixpath.join(root, "quarantine-*.parquet"))) if fs.exists(root) else []
    found = [
        (_number(posixpath.basename(p).removesuffix(".parquet")),
         read_quarantine(storage.join(raw, "quarantine", posixpath.basename(p)), storage_options).to_pylist())
        for p in files
    ]  # fmt: skip
    record_keys = {r["key"] for _, rows in found for r in rows if r["key"] and is_record_key(r["key"])}
    if record_keys and storage.exists(storage.join(raw, "index.json"), storage_options):  # records' versions
        # live beside their shards, not in index.json
        entries = shards.read_index(raw, storage_options)["shards"]
        ingested = {**ingested, **record_holders(raw, entries, record_keys, storage_options)}
    for committed, rows in found:
        for r in rows:
            if ingested.get(r["key"], -1) <= committed:
                records[(r["key"], r["error"])] = r
    features = storage.join(work_url, "features", "quarantine.parquet")
    for r in read_quarantine(features, storage_options).to_pylist():
        records[(r["key"], r["error"])] = r
    return sorted(records.values(), key=lambda r: (r["stage"] or "", r["key"] or ""))


def by_reason(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["error"]] = counts.get(r["error"], 0) + 1
    return dict(sorted(counts.items()))


def reason_sentence(code: str) -> str:
    return SENTENCES.get(code, "")


def data_state(work_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The raw shard set, feature set and quarantine under a pipeline's work prefix."""
    raw = shard_set_state(storage.join(work_url, "shards"), storage_options)
    features = shard_set_state(storage.join(work_url, "features"), storage_options)
    raw.pop("sources", None)
    features.pop("sources", None)
    quarantine = current_quarantine(work_url, storage_options)
    return {"shards": raw, "features": features, "quarantine": quarantine, "by_reason": by_reason(quarantine)}


def megabytes(n: float | None) -> str:
    if not n:
        return "0 MB"
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def figure(x: float | None, digits: int = 3) -> str:
    """A number rounded to `digits` significant digits, with thousands separators."""
    if x is None:
        return "-"
    if isinstance(x, int) or abs(x) >= 10 ** (digits - 1):
        return f"{round(x):,}"
    return f"{x:.{digits}g}"
