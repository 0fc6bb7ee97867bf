"""Read GGUF checkpoints into mlx-lm llama-family modules.

MLX reads GGUF natively for F32/F16/Q4_0/Q4_1/Q8_0 and hands quantized tensors over in its own affine
layout (uint32 `weight` + `scales` + `biases`, group size 32). Other types (K-quants, Q5_x) are
dequantized to f32 with the `gguf` package.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np

GGUF_GROUP_SIZE = 32

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


def read_gguf(path: str) -> tuple[dict[str, mx.array], dict]:
    """Tensors (GGUF names) and metadata (plain Python values) of a GGUF file."""
    try:
        weights, meta = mx.load(path, return_metadata=True)
    except (ValueError, RuntimeError) as exc:
        if "not supported" not in str(exc).lower() and "unsupported" not in str(exc).lower():
            raise ValueError(f"cannot read GGUF file {path}: {exc}") from exc
        return _read_with_gguf_package(path)
    return weights, {k: _plain(v) for k, v in meta.items()}


def _plain(value):
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _read_with_gguf_package(path: str) -> tuple[dict[str, mx.array], dict]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        meta[name] = value
    weights = {}
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        weights[t.name] = mx.array(data.reshape(shape))
    return weights, meta


def model_config(meta: dict) -> dict:
    """mlx-lm `config.json` fields for a llama-family GGUF."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rope_traditional": False,
        "tie_word_embeddings": True,
    }
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def mlx_name(gguf_name: str) -> str:
    base, _, leaf = gguf_name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        layer, part = m.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"
    if base not in _TOP_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name}")
    return f"{_TOP_NAMES[base]}.{leaf}"


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rotary row permutation of Q/K (rows are independent, so this is exact
    for quantized `weight`/`scales`/`biases` too)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """GGUF tensors -> mlx-lm names in Hugging Face row order (so `rope_traditional=False`). Only llama-graph
    files (llama, mistral) have permuted Q/K rows; llama.cpp runs qwen2 with NeoX rotary on HF order."""
    out = {}
    permuted = config.get("model_type") != "qwen2"
    for name, w in weights.items():
        target = mlx_name(name)
        if permuted and ".self_attn.q_proj." in target:
            w = _unpermute_rows(w, config["num_attention_heads"])
        elif permuted and ".self_attn.k_proj." in target:
            w = _unpermute_rows(w, config["num_key_value_heads"])
        out[target] = w
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False
    return out


def quantization_of(weights: dict[str, mx.array]) -> dict[str, dict]:
    """Per-module {group_size, bits} for every quantized tensor, read from the packed shapes."""
    quant = {}
    for name, w in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        in_features = w.shape[-1] * GGUF_GROUP_SIZE
        bits = packed.shape[-1] * 32 // in_features
        quant[module] = {"group_size": GGUF_GROUP_SIZE, "bits": int(bits)}
    return quant


def dequantize_all(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    quant = quantization_of(weights)
    out = {}
    for name, w in weights.items():
        module, _, leaf = name.rpartition(".")
        if module in quant:
            if leaf != "weight":
                continue
            q = quant[module]
            w = mx.dequantize(
                w, weights[f"{module}.scales"], weights[f"{module}.biases"], q["group_size"], q["bits"]
            )
        out[name] = w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
    return out
