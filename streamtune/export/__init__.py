"""Hand-off: a trained adapter as PEFT, a llama.cpp LoRA GGUF, a fused mlx-lm folder, a fused GGUF or an
Ollama folder. `export_adapter` is the one entry point (CLI `streamtune export`, a pipeline task);
`read_peft_adapter` goes the other way. Formats and files: README.md in this folder."""

from __future__ import annotations

import os
import time

from streamtune.export.adapter import (
    MULTIMODAL_NOTE,
    check_fits,
    linear_shapes,
    local_adapter,
    read_mlx_adapter,
    staged_output,
)
from streamtune.export.peft import read_peft_adapter

FORMATS = ("peft", "gguf-adapter", "fused-mlx", "fused-gguf", "ollama")
__all__ = ["FORMATS", "export_adapter", "read_peft_adapter"]


def export_adapter(
    adapter_dir: str,
    base: str | None,
    to: str,
    out: str,
    *,
    dtype: str | None = None,
    base_name: str | None = None,
    ollama_mode: str = "fused",
    force: bool = False,
    storage_options: dict | None = None,
) -> dict:
    """Export the adapter at `adapter_dir` (folder or URL) for `base` (default: the model recorded in its
    adapter_config.json) as `to` (one of FORMATS) at `out`, which appears only once complete.

    dtype: GGUF tensor type for fused-gguf/ollama/the base of ollama's adapter mode (f16, bf16, q8_0, f32;
    default f16). base_name: PEFT's base_model_name_or_path (default: `base`). ollama_mode: "fused" (one
    GGUF) or "adapter" (base GGUF + llama.cpp adapter GGUF). Returns a JSON-ready summary."""
    if to not in FORMATS:
        raise ValueError(f"unknown export format {to!r} (one of: {', '.join(FORMATS)})")
    if ollama_mode not in ("fused", "adapter"):
        raise ValueError(f"ollama_mode must be fused or adapter, got {ollama_mode!r}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    start = time.perf_counter()
    with local_adapter(adapter_dir, storage_options) as local:
        adapter = read_mlx_adapter(local)
        base = base or adapter.config.get("model")
        if not base:
            raise ValueError(f"no --base given and {adapter_dir}/adapter_config.json names no model")
        config = _check_base(adapter, base, needs_tokenizer=to in ("fused-mlx", "fused-gguf", "ollama"))
        notes = [MULTIMODAL_NOTE] if adapter.projector else []
        with staged_output(out, force=force) as tmp:
            detail = _write(to, adapter, base, config, tmp, out, dtype, base_name, ollama_mode, notes)
    summary = {
        "format": to,
        "out": os.path.abspath(out),
        "adapter": adapter_dir,
        "base": base,
        "fine_tune_type": adapter.kind,
        "rank": adapter.rank if adapter.kind != "full" else None,
        "lora_alpha": adapter.alpha if adapter.kind != "full" else None,
        "modules": len(adapter.modules),
        **detail,
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return summary


def _check_base(adapter, base: str, *, needs_tokenizer: bool) -> dict:
    """Load the base once to check the adapter fits it; its config (arch, heads, quantization)."""
    from streamtune.train.models import load_base, resolve

    path = resolve(base)
    if needs_tokenizer and os.path.isdir(path) and not _has_tokenizer(path):
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer.model): the export needs it"
        )
    net, _, config = load_base(base, dequantize=False, dtype="float32")
    if adapter.kind != "full":
        check_fits(adapter, linear_shapes(net), base)
    return config


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))


def _write(to, adapter, base, config, tmp, out, dtype, base_name, ollama_mode, notes) -> dict:
    from streamtune.export import fused, gguf_adapter, gguf_tokenizer, ollama, peft

    quantized = bool(config.get("quantization")) or bool(adapter.config.get("qlora"))
    if to == "peft":
        name = base_name or (os.path.abspath(base) if os.path.exists(base) else base)
        if name.startswith("offline:") or name.endswith(".gguf"):
            notes.append(
                f"base_model_name_or_path is {name!r}, which PEFT cannot load: write a transformers folder "
                f"with `streamtune export-base --model {base} --out DIR` and pass --base-name DIR"
            )
        return peft.write_peft(adapter, tmp, base_name=name)
    if to == "gguf-adapter":
        path = _file_in(tmp, out, "adapter.gguf")
        info = gguf_adapter.write_gguf_adapter(adapter, config, path, name=os.path.basename(adapter.path))
        source, final = (
            fused.gguf_source(base),
            out if out.endswith(".gguf") else os.path.join(out, "adapter.gguf"),
        )
        notes.append(
            f"use with llama.cpp: -m {source} --lora {final}"
            if source
            else "pair it with a GGUF of the same base (export --to ollama --ollama-mode adapter writes both)"
        )
        return info
    if to == "fused-mlx":
        if quantized:
            notes.append(fused.QUANTIZED_NOTE)
        return fused.fuse_mlx(base, adapter.path, tmp)
    if to == "fused-gguf":
        if quantized:
            notes.append(fused.QUANTIZED_NOTE)
        path = _file_in(tmp, out, "model.gguf")
        return fused.fuse_gguf(base, adapter.path, path, dtype=dtype or "f16")
    os.makedirs(tmp)
    if ollama_mode == "adapter":
        reason = gguf_adapter.refuse_reason(adapter, config)
        if reason:
            raise ValueError(f"ollama adapter mode: {reason.split(';')[0]}; use --ollama-mode fused")
        info = fused.base_gguf(base, os.path.join(tmp, "base.gguf"), dtype=dtype or "f16")
        info |= gguf_adapter.write_gguf_adapter(adapter, config, os.path.join(tmp, "adapter.gguf"))
        files = ("base.gguf", "adapter.gguf")
    else:
        if quantized:
            notes.append(fused.QUANTIZED_NOTE)
        info = fused.fuse_gguf(base, adapter.path, os.path.join(tmp, "model.gguf"), dtype=dtype or "f16")
        files = ("model.gguf", None)
    kv = gguf_tokenizer.tokenizer_kv_from_gguf(os.path.join(tmp, files[0]))
    text, more = ollama.modelfile(kv, *files)
    with open(os.path.join(tmp, "Modelfile"), "w") as f:
        f.write(text)
    notes += more
    return {**info, "files": sorted(os.listdir(tmp)), "create": f"ollama create NAME -f {out}/Modelfile"}


def _file_in(tmp: str, out: str, default_name: str) -> str:
    """GGUF outputs: `out` itself when it ends in .gguf, else a folder `out` holding `default_name`."""
    if out.endswith(".gguf"):
        return tmp
    os.makedirs(tmp)
    return os.path.join(tmp, default_name)
