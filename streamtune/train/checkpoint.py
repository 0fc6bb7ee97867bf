"""Training checkpoints on any fsspec URL.

Layout under the checkpoint URL (see README.md in this folder):

    step-00000010/adapters.safetensors   trainable parameters
    step-00000010/optimizer.safetensors  optimizer state (flattened tree)
    step-00000010/state.json             step, epoch, RNG key, loader state_dict, packer state, losses
    latest.json                          {"step": 10, "path": "step-00000010"}   written last = commit

A checkpoint exists once `latest.json` names it: a process killed while writing leaves the previous one
in force. Older step folders beyond `keep` are deleted after the commit.
"""

from __future__ import annotations

import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from streamtune import storage

LATEST = "latest.json"


def _to_bytes(arrays: dict[str, mx.array]) -> bytes:
    import numpy as np

    mx.eval(list(arrays.values()))
    return st_save({k: np.array(v, copy=False) for k, v in arrays.items()})


def _from_bytes(data: bytes) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in st_load(data).items()}


def save(
    url: str,
    step: int,
    *,
    params: dict[str, mx.array],
    optimizer_state: dict,
    state: dict,
    storage_options: dict | None = None,
    keep: int = 2,
) -> str:
    name = f"step-{step:08d}"
    folder = storage.join(url, name)
    opt = dict(tree_flatten(optimizer_state))
    storage.write_bytes(storage.join(folder, "adapters.safetensors"), _to_bytes(params), storage_options)
    storage.write_bytes(storage.join(folder, "optimizer.safetensors"), _to_bytes(opt), storage_options)
    storage.write_json(storage.join(folder, "state.json"), {**state, "step": step}, storage_options)
    storage.write_json(storage.join(url, LATEST), {"step": step, "path": name}, storage_options)
    _prune(url, keep, name, storage_options)
    return folder


def _prune(url: str, keep: int, current: str, storage_options: dict | None) -> None:
    fs, root = storage.get_fs(url, storage_options)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return
    steps = [n for n in names if n.startswith("step-") and n <= current]
    for old in steps[:-keep] if keep > 0 else []:
        fs.rm(f"{root.rstrip('/')}/{old}", recursive=True)


def latest(url: str, storage_options: dict | None = None) -> dict | None:
    """{"step", "path"} of the last committed checkpoint, or None."""
    marker = storage.join(url, LATEST)
    if not storage.exists(marker, storage_options):
        return None
    return json.loads(storage.read_bytes(marker, storage_options))


def load(url: str, storage_options: dict | None = None) -> tuple[dict, dict, dict] | None:
    """(params, optimizer_state tree, state) of the latest checkpoint under `url`, or None."""
    head = latest(url, storage_options)
    if head is None:
        return None
    folder = storage.join(url, head["path"])
    params = _from_bytes(storage.read_bytes(storage.join(folder, "adapters.safetensors"), storage_options))
    opt = _from_bytes(storage.read_bytes(storage.join(folder, "optimizer.safetensors"), storage_options))
    state = storage.read_json(storage.join(folder, "state.json"), storage_options)
    return params, tree_unflatten(list(opt.items())), state
