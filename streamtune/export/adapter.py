"""The pieces every export shares: an mlx-lm adapter folder read and checked against its base, the base's
layer shapes, and outputs that appear at `--out` only when complete (written under a temporary name,
renamed at the end)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from streamtune import storage

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
PROJECTOR_FILES = ("projector.safetensors", "multimodal.json")
LEAVES = ("lora_a", "lora_b", "m")
MODULE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
MULTIMODAL_NOTE = (
    "projector.safetensors (the multimodal projector) stays MLX-only and is not in this export: it holds the "
    "text model with its adapter; images/audio need the MLX adapter folder "
    "(streamtune.train.mm_generate.load_multimodal(BASE, ADAPTER_DIR))"
)


@dataclass
class MlxAdapter:
    """An mlx-lm adapter folder: LoRA/DoRA tensors grouped per adapted module."""

    path: str
    config: dict
    kind: str  # lora | dora | full
    rank: int
    scale: float
    modules: dict[str, dict[str, mx.array]] = field(default_factory=dict)
    projector: bool = False

    @property
    def alpha(self) -> float:
        """PEFT's / llama.cpp's `lora_alpha`: mlx-lm's scale multiplies B·A directly, PEFT's alpha / r."""
        return self.scale * self.rank

    def layers(self) -> list[int]:
        return sorted({layer_of(name) for name in self.modules})

    def targets(self) -> list[str]:
        """Module paths inside a block that carry adapters (`self_attn.q_proj`, `mlp.down_proj`, ...)."""
        return sorted({MODULE.match(name).group(2) for name in self.modules})


def layer_of(module: str) -> int:
    m = MODULE.match(module)
    if not m:
        raise ValueError(f"adapter tensor outside the transformer blocks: {module}")
    return int(m.group(1))


def read_mlx_adapter(adapter_dir: str) -> MlxAdapter:
    """Read `adapters.safetensors` + `adapter_config.json` (what streamtune train / mlx_lm lora write)."""
    for name in ADAPTER_FILES:
        if not os.path.exists(os.path.join(adapter_dir, name)):
            raise FileNotFoundError(f"no {name} in {adapter_dir} (not an adapter folder)")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    kind = config.get("fine_tune_type", "lora")
    params = config.get("lora_parameters") or {}
    weights = mx.load(os.path.join(adapter_dir, "adapters.safetensors"))
    adapter = MlxAdapter(
        path=adapter_dir,
        config=config,
        kind=kind,
        rank=int(params.get("rank", 8)),
        scale=float(params.get("scale", 20.0)),
        projector=os.path.exists(os.path.join(adapter_dir, PROJECTOR_FILES[0])),
    )
    if kind == "full":
        return adapter
    if kind not in ("lora", "dora"):
        raise ValueError(f"unknown fine_tune_type {kind!r} in {adapter_dir}/adapter_config.json")
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in LEAVES or not MODULE.match(module):
            raise ValueError(f"unexpected tensor {name} in {adapter_dir}/adapters.safetensors")
        adapter.modules.setdefault(module, {})[leaf] = value
    for module, parts in adapter.modules.items():
        missing = [p for p in ("lora_a", "lora_b") if p not in parts]
        if missing:
            raise ValueError(f"adapter tensor {module}.{missing[0]} is missing")
        if kind == "dora" and "m" not in parts:
            raise ValueError(f"DoRA adapter without magnitude {module}.m")
        rank = parts["lora_a"].shape[1]
        if rank != adapter.rank:
            raise ValueError(f"{module}.lora_a has rank {rank}, adapter_config.json says {adapter.rank}")
    if not adapter.modules:
        raise ValueError(f"{adapter_dir}/adapters.safetensors holds no LoRA tensors")
    return adapter


def linear_shapes(net: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of a loaded model, quantized ones included."""
    shapes = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out_dims, packed = module.weight.shape
            shapes[name] = (out_dims, packed * 32 // module.bits)
        elif isinstance(module, nn.Linear):
            shapes[name] = tuple(module.weight.shape)
    return shapes


def check_fits(adapter: MlxAdapter, shapes: dict[str, tuple[int, int]], base: str) -> None:
    """Every adapted layer exists in the base with the shapes the adapter was trained on."""
    for module, parts in sorted(adapter.modules.items()):
        if module not in shapes:
            raise ValueError(f"base {base} has no layer {module} (is it the adapter's base?)")
        out_dims, in_dims = shapes[module]
        a, b = parts["lora_a"].shape, parts["lora_b"].shape
        if a[0] != in_dims or b[1] != out_dims or ("m" in parts and parts["m"].shape[0] != out_dims):
            raise ValueError(
                f"adapter does not fit base {base}: {module} is {out_dims}x{in_dims} there but the adapter's "
                f"lora_a is {a[0]}x{a[1]} and lora_b {b[0]}x{b[1]} (is it the adapter's base?)"
            )


@contextlib.contextmanager
def local_adapter(adapter_url: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local folder holding the adapter at `adapter_url` (the folder itself, or a download of it); a
    pipeline's adapters root stands for the version its latest.json names."""
    from streamtune.train.adapters import is_remote, latest

    adapter_url = latest(adapter_url, storage_options) or adapter_url
    if not is_remote(adapter_url):
        yield adapter_url.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory(prefix="streamtune-adapter-") as tmp:
        for name in (*ADAPTER_FILES, *PROJECTOR_FILES):
            url = storage.join(adapter_url, name)
            if storage.exists(url, storage_options):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(storage.read_bytes(url, storage_options))
        yield tmp


@contextlib.contextmanager
def staged_output(out: str, *, force: bool = False) -> Iterator[str]:
    """A temporary path next to `out` to write into; renamed to `out` when the block succeeds and removed
    when it fails, so `out` never holds a half-written export."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            _remove(out)
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
