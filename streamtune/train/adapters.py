"""Adapter folders at any URL: mlx-lm writes a local folder, which is uploaded when the target is remote;
a previous adapter (local or remote) can seed a new run (warm start)."""

from __future__ import annotations

import hashlib
import os
import tempfile

from streamtune import storage

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
# next to the adapter after stage align or instruct
MULTIMODAL_FILES = ("projector.safetensors", "multimodal.json")


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
    for name in (*ADAPTER_FILES, *MULTIMODAL_FILES, *extra):
        path = os.path.join(local, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(adapter_url, name), f.read(), storage_options)


def read_weights(adapter_url: str, storage_options: dict | None = None) -> dict | None:
    """The adapter weights at `adapter_url` (folder or URL) as MLX arrays; None when there are none yet.
    A PEFT folder (adapter_model.safetensors + adapter_config.json) is read too, converted to mlx-lm's layout."""
    import mlx.core as mx

    url = storage.join(adapter_url, "adapters.safetensors")
    if not storage.exists(url, storage_options):
        return _read_peft_weights(adapter_url, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapters.safetensors")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(url, storage_options))
        return mx.load(path)


def read_config(adapter_url: str, storage_options: dict | None = None) -> dict | None:
    """adapter_config.json of the adapter at `adapter_url`, or None."""
    url = storage.join(adapter_url, "adapter_config.json")
    return storage.read_json(url, storage_options) if storage.exists(url, storage_options) else None


LATEST = "latest.json"


def publish(root: str, version_url: str, info: dict, storage_options: dict | None = None) -> dict:
    """Point `root/latest.json` at a finished adapter version (written last: the pointer moves on success)."""
    pointer = {**info, "path": version_url}
    storage.write_json(storage.join(root, LATEST), pointer, storage_options)
    return pointer


def latest(root: str, storage_options: dict | None = None) -> str | None:
    """The newest finished adapter under `root`: the version `latest.json` names, else `root` itself when it
    holds adapter files (a folder written before versions), else None."""
    pointer = storage.join(root, LATEST)
    if storage.exists(pointer, storage_options):
        return storage.read_json(pointer, storage_options)["path"]
    if storage.exists(storage.join(root, "adapters.safetensors"), storage_options):
        return root
    return None


def describe(local: str) -> dict:
    """Size and sha256 of a local adapter's weights."""
    import hashlib

    path = os.path.join(local, "adapters.safetensors")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _read_peft_weights(adapter_url: str, storage_options: dict | None = None) -> dict | None:
    from streamtune.export.peft import CONFIG, WEIGHTS, read_peft_adapter

    if not storage.exists(storage.join(adapter_url, WEIGHTS), storage_options):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name in (WEIGHTS, CONFIG):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(adapter_url, name), storage_options))
        return read_peft_adapter(tmp)[0]
