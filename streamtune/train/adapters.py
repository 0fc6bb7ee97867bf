"""Adapter folders at any URL: mlx-lm writes a local folder, which is uploaded when the target is remote;
a previous adapter (local or remote) can seed a new run (warm start)."""

from __future__ import annotations

import hashlib
import os
import tempfile

from streamtune import storage

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_dir(adapter_url: str) -> str:
    """The local folder the trainer writes for `adapter_url` (itself, or a stable scratch folder for a URL)."""
    if not is_remote(adapter_url):
        return adapter_url.removeprefix("file://")
    name = hashlib.sha256(adapter_url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "streamtune-adapters", name)


def upload(
    local: str, adapter_url: str, storage_options: dict | None = None, extra: tuple[str, ...] = ()
) -> None:
    """Copy the adapter files (and `extra` files present in `local`) to a remote `adapter_url`."""
    if not is_remote(adapter_url):
        return
    for name in (*ADAPTER_FILES, *extra):
        path = os.path.join(local, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(adapter_url, name), f.read(), storage_options)


def read_weights(adapter_url: str, storage_options: dict | None = None) -> dict | None:
    """The adapter weights at `adapter_url` (folder or URL) as MLX arrays; None when there are none yet."""
    import mlx.core as mx

    url = storage.join(adapter_url, "adapters.safetensors")
    if not storage.exists(url, storage_options):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapters.safetensors")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(url, storage_options))
        return mx.load(path)
