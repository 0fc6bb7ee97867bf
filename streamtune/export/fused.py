"""The base with the adapter merged: an mlx-lm folder (`streamtune.train.generate.fuse`) or a GGUF file
(that folder written by `gguf_model.write_model_gguf`); and the bare base as GGUF, for llama.cpp adapters."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import mlx.core as mx

from streamtune.export import gguf_model, gguf_tokenizer
from streamtune.train.models import HF_ARCHITECTURES, export_base, resolve

QUANTIZED_NOTE = "the base was quantized; the fused model holds dequantized float weights (base + adapter)"


def fuse_mlx(base: str, adapter_dir: str, out_dir: str, *, dtype: str = "float32") -> dict:
    """mlx-lm folder (config.json, model.safetensors, tokenizer) of base + adapter (text model only)."""
    from streamtune.train.generate import fuse

    fuse(base, adapter_dir, out_dir, dtype=dtype)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("model_type") in HF_ARCHITECTURES:  # for transformers and llama.cpp's convert_hf_to_gguf.py
        config.setdefault("architectures", [HF_ARCHITECTURES[config["model_type"]]])
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return {"files": sorted(os.listdir(out_dir))}


def folder_to_gguf(folder: str, path: str, *, dtype: str, tokenizer_from: str | None, name: str) -> dict:
    """An unquantized mlx-lm folder as a GGUF file; tokenizer metadata copied from the GGUF file
    `tokenizer_from` when given (a GGUF base), else built from the folder's tokenizer.json."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    gguf_model.gguf_arch(config)
    if tokenizer_from:
        kv = gguf_tokenizer.tokenizer_kv_from_gguf(tokenizer_from)
    else:
        kv = gguf_tokenizer.tokenizer_kv_from_folder(folder)
    weights = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            weights.update(mx.load(os.path.join(folder, file)))
    return gguf_model.write_model_gguf(weights, config, kv, path, dtype=dtype, name=name)


def gguf_source(base: str) -> str | None:
    """The base's GGUF file, if the base is one (its tokenizer metadata is then copied verbatim)."""
    path = resolve(base)
    return path if path.endswith(".gguf") else None


def fuse_gguf(base: str, adapter_dir: str, path: str, *, dtype: str = "f16", name: str = "model") -> dict:
    """GGUF file of base + adapter, for llama.cpp / Ollama."""
    with tempfile.TemporaryDirectory(prefix="streamtune-fused-", dir=os.path.dirname(path)) as tmp:
        fuse_mlx(base, adapter_dir, tmp)
        return folder_to_gguf(tmp, path, dtype=dtype, tokenizer_from=gguf_source(base), name=name)


def base_gguf(base: str, path: str, *, dtype: str = "f16") -> dict:
    """The base alone as GGUF, to pair with a llama.cpp adapter: a GGUF base is copied unchanged (the
    adapter was trained on exactly its weights), any other base converted."""
    source = gguf_source(base)
    if source:
        shutil.copyfile(source, path)
        return {"copied": source}
    with tempfile.TemporaryDirectory(prefix="streamtune-base-", dir=os.path.dirname(path)) as tmp:
        export_base(base, tmp)
        return folder_to_gguf(tmp, path, dtype=dtype, tokenizer_from=None, name="base")
