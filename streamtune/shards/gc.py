"""Delete shard files that no committed index refers to any more.

Incremental runs write changed shards again under new names and commit an index without the old ones; the
old files stay so that a reader still streaming them is not cut off. `collect_garbage` deletes them once
they are older than a grace period.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import re
import time

from streamtune import storage
from streamtune.shards.index import read_index

SHARD_FILE = re.compile(r"shard-\d+\.(arrow|records\.parquet)$")  # a shard, or its records' versions


def _modified(info: dict) -> float | None:
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


def collect_garbage(
    prefix: str,
    storage_options: dict | None = None,
    *,
    older_than_s: float = 3600.0,
    dry_run: bool = False,
) -> list[str]:
    """Delete `shard-N.arrow` files directly under `prefix` that its index.json does not list and that were
    last written more than `older_than_s` ago. Returns the URLs deleted (or that would be, with dry_run).
    A prefix without index.json is left alone: nothing there is known to be garbage."""
    index_url = storage.join(prefix, "index.json")
    if not storage.exists(index_url, storage_options):
        return []
    entries = read_index(prefix, storage_options)["shards"]
    listed = {e["path"] for e in entries} | {
        e["record_sources"]["path"] for e in entries if e.get("record_sources")
    }
    fs, root = storage.get_fs(prefix, storage_options)
    root = root.rstrip("/")
    now = time.time()
    doomed = []
    for path, info in sorted(fs.find(root, maxdepth=1, detail=True).items()):
        name = posixpath.basename(path)
        if not SHARD_FILE.fullmatch(name) or name in listed:
            continue
        modified = _modified(info)
        if modified is None or now - modified < older_than_s:
            continue
        doomed.append((path, storage.join(prefix, name)))
    if doomed and not dry_run:
        fs.rm([path for path, _ in doomed])
    return [url for _, url in doomed]
