"""Greedy generation with a base model plus trained adapters, and fusing adapters into a standalone model."""

from __future__ import annotations

import json
import os

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from streamtune.train.models import load_base


def _adapter_config(adapter_path: str) -> dict:
    path = os.path.join(adapter_path, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_path}")
    with open(path) as f:
        return json.load(f)


def load_with_adapter(model: str, adapter_path: str | None = None, dtype: str | None = None):
    """(model, tokenizer, config) with the adapter applied the way it was trained (quantized base for
    QLoRA adapters)."""
    from mlx_lm.tuner.utils import load_adapters

    from streamtune.train.adapters import latest

    qbits = None
    if adapter_path:
        adapter_path = latest(adapter_path) or adapter_path  # a pipeline's adapters/ root: its latest version
        cfg = _adapter_config(adapter_path)
        qbits = cfg.get("quantize_bits") if cfg.get("qlora") else None
    net, tokenizer, config = load_base(model, quantize=qbits, dequantize=qbits is None, dtype=dtype)
    if adapter_path:
        net = load_adapters(net, adapter_path)
    net.eval()
    return net, tokenizer, config


def generate(model: str, prompt: str, adapter_path: str | None = None, max_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (wrapped in the chat template when the tokenizer has one)."""
    net, tokenizer, _ = load_with_adapter(model, adapter_path)
    return complete(net, tokenizer, prompt, max_tokens=max_tokens)


def complete(net, tokenizer, prompt: str, max_tokens: int = 64, system: str | None = None) -> str:
    from mlx_lm.generate import generate as mlx_generate

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    return mlx_generate(net, tokenizer, ids, max_tokens=max_tokens).strip()


def fuse(model: str, adapter_path: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Merge LoRA/DoRA adapters into the base weights and write a standalone mlx-lm folder."""
    net, tokenizer, config = load_with_adapter(model, adapter_path, dtype=dtype)
    fused = [(name, m.fuse(dequantize=True)) for name, m in net.named_modules() if hasattr(m, "fuse")]
    if fused:
        net.update_modules(tree_unflatten(fused))
    from mlx_lm.utils import dequantize_model

    net = dequantize_model(net)
    os.makedirs(out_dir, exist_ok=True)
    weights = dict(tree_flatten(net.parameters()))
    mx.save_safetensors(os.path.join(out_dir, "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {k: v for k, v in config.items() if k not in ("source", "quantization") and v is not None}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer._tokenizer.save_pretrained(out_dir)
    return out_dir
