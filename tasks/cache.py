"""Cache keys from content, so a rerun skips exactly the work whose inputs did not change.

A key hashes what determines a task's output: the source listing (keys, etags, sizes), the manifest hash,
a shard's checksum, model ids and settings, the output location, and the code version of the stage. The
code version hashes the stage's source files, so editing the decoder invalidates decode results only.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy

STAGE_CODE = {
    "manifest": ["streamtune/manifest.py", "streamtune/storage.py"],
    "shard": ["streamtune/ingest.py", "streamtune/shards", "streamtune/storage.py"],
    "decode": ["streamtune/decode", "streamtune/shards", "streamtune/stream"],
    "train": ["streamtune/train", "streamtune/stream"],
    "export": ["streamtune/export", "streamtune/train"],
    "index": [
        "streamtune/search/index.py",
        "streamtune/search/embed.py",
        "streamtune/search/lexical.py",
        "streamtune/search/ann.py",
    ],
}

_ROOT = Path(__file__).resolve().parent.parent


def digest(*parts: Any) -> str:
    """Stable hex digest of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@functools.cache
def code_version(stage: str) -> str:
    """Hash of the source files a stage runs (package version when the sources are not on disk)."""
    h = hashlib.sha256()
    for rel in STAGE_CODE[stage]:
        path = _ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(_ROOT)).encode())
                h.update(f.read_bytes())
    from streamtune import __version__

    h.update(__version__.encode())
    return h.hexdigest()[:16]


def source_fingerprint(url: str, storage_options: dict | None = None) -> str:
    """Digest of every object under a source prefix (key, size, etag/mtime): changes when any object does."""
    from streamtune.storage import get_fs

    fs, path = get_fs(url, storage_options)
    listing = fs.find(path, detail=True) if fs.exists(path) else {}
    rows = sorted(
        (
            key,
            info.get("size"),
            info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"),
        )
        for key, info in listing.items()
    )
    return digest(rows)


Output = str | tuple[str, int | None]  # a URL, or (URL, expected size in bytes)


def keyed(
    stage: str,
    *fields: str,
    outputs: Callable[[dict[str, Any], Any], list[Output]] | None = None,
) -> CachePolicy:
    """A cache policy keyed on the named task parameters plus the stage's code version.

    Parameters not named (storage options, callbacks) do not enter the key: credentials must not change
    results, and a key must never depend on an object's identity. `outputs(parameters, cached_result)` names
    the objects a stored result points at (URLs, or (URL, size) to check the object is whole). A stored result
    is used only while they all exist: after a fresh bucket, a deleted manifest or a truncated shard the
    task runs again under a key of its own instead of returning a result that points at nothing.
    """

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        key = f"streamtune-{stage}-" + digest(stage, code_version(stage), [parameters.get(f) for f in fields])
        if outputs is None:
            return key
        found, cached = _stored_result(getattr(context, "result_store", None), key)
        if not found:
            return key
        if cached is not _UNREADABLE and outputs_whole(
            outputs(parameters, cached), parameters.get("work_options")
        ):
            return key
        return key + "-rerun-" + uuid.uuid4().hex[:12]

    return CacheKeyFnPolicy(cache_key_fn=key_fn)


_UNREADABLE = object()


def _stored_result(store: Any, key: str) -> tuple[bool, Any]:
    """(a result is stored under `key`, that result or _UNREADABLE)."""
    if store is None:
        return False, None
    found = store.exists(key)
    if inspect.iscoroutine(found):
        found.close()
        return True, _UNREADABLE  # cannot tell from here: recompute rather than trust a possibly stale result
    if not found:
        return False, None
    try:
        record = store.read(key)
    except Exception:  # a partly written or foreign record is as good as none
        return True, _UNREADABLE
    if inspect.iscoroutine(record):
        record.close()
        return True, _UNREADABLE
    return True, record.result


def outputs_whole(wanted: list[Output], storage_options: dict | None) -> bool:
    """Every URL exists, and has the expected size where one is given."""
    from streamtune.storage import get_fs

    try:
        for item in wanted:
            url, size = item if isinstance(item, tuple) else (item, None)
            fs, path = get_fs(url, storage_options or None)
            if not fs.exists(path) or (size is not None and fs.size(path) != size):
                return False
    except OSError:
        return False
    return True


def prefix_key(url: str) -> str:
    """Normalise an output URL for keys (trailing slashes and local path spelling do not matter)."""
    return url.rstrip("/") if "://" in url else os.path.abspath(url)
