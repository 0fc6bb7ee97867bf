"""Write an mlx-lm llama-family model (llama, mistral, qwen2) as a llama.cpp GGUF file: f32, f16, bf16 or
q8_0, with the tokenizer and chat template (`gguf_tokenizer`). The inverse of streamtune.train.gguf:
llama/mistral Q/K rows are permuted into llama.cpp's rotary order (as convert_hf_to_gguf.py does); qwen2 keeps
Hugging Face order. Tensors are converted and written one at a time."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from streamtune.train.gguf import _LAYER_NAMES, _TOP_NAMES

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
DTYPES = ("f32", "f16", "bf16", "q8_0")
_TO_GGUF = {v: k for k, v in _LAYER_NAMES.items()}
_TOP_TO_GGUF = {v: k for k, v in _TOP_NAMES.items()}


def gguf_arch(config: dict) -> str:
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise ValueError(
            f"architecture {kind!r} has no GGUF export here (supported: {', '.join(ARCHS)}); "
            "use --to peft or fused-mlx"
        )
    return ARCHS[kind]


def gguf_name(mlx_name: str) -> str:
    """mlx-lm tensor name -> llama.cpp tensor name (`model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight`)."""
    base, _, leaf = mlx_name.rpartition(".")
    parts = base.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:])
        if module in _TO_GGUF:
            return f"blk.{parts[2]}.{_TO_GGUF[module]}.{leaf}"
    elif base in _TOP_TO_GGUF:
        return f"{_TOP_TO_GGUF[base]}.{leaf}"
    raise ValueError(f"tensor {mlx_name} has no llama.cpp name (unsupported layer for GGUF export)")


def rotary_permute(name: str, rows: np.ndarray, config: dict) -> np.ndarray:
    """Rows of a q_proj/k_proj tensor (weight, bias, LoRA B) in llama.cpp's order for the llama graph."""
    if gguf_arch(config) != "llama":
        return rows
    if ".self_attn.q_proj" in name:
        heads = config["num_attention_heads"]
    elif ".self_attn.k_proj" in name:
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    else:
        return rows
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)


def _qtype(name: str, shape: tuple[int, ...], dtype: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[dtype]


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def rope_freqs(config: dict) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for Llama-3 rope scaling (as convert_hf_to_gguf.py computes it)."""
    scaling = config.get("rope_scaling") or {}
    if str(scaling.get("rope_type", scaling.get("type", ""))).lower() != "llama3":
        return None
    base = config.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_model_gguf(
    weights: dict[str, mx.array],
    config: dict,
    tokenizer_kv: list[tuple],
    path: str,
    *,
    dtype: str = "f16",
    name: str = "model",
) -> dict:
    """Write `weights` (mlx-lm names, Hugging Face row order, unquantized) as a GGUF model file."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if any(k.endswith((".scales", ".biases")) for k in weights):
        raise ValueError("quantized weights: dequantize before writing GGUF")
    arch = gguf_arch(config)
    tensors = {}
    for key, value in weights.items():
        tensors[gguf_name(key)] = (key, value)
    if (freqs := rope_freqs(config)) is not None:
        tensors["rope_freqs.weight"] = (None, mx.array(freqs))
    writer = gguf.GGUFWriter(path, arch)
    _add_hparams(writer, config, name, dtype)
    for key, value, vtype, sub in tokenizer_kv:
        writer.add_key_value(key, value, vtype, sub)
    plan = []
    for gname, (key, value) in tensors.items():
        shape = tuple(value.shape)
        qtype = gguf.GGMLQuantizationType.F32 if key is None else _qtype(gname, shape, dtype)
        raw = gguf.quants.quant_shape_to_byte_shape(shape, qtype) if qtype not in _PLAIN else shape
        item = np.dtype(_PLAIN.get(qtype, np.uint8))
        writer.add_tensor_info(gname, raw, item, int(np.prod(raw)) * item.itemsize, qtype)
        plan.append((gname, key, value, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _gname, key, value, qtype in plan:
        data = to_numpy(value)
        if key is not None:
            data = rotary_permute(key, data, config)
        writer.write_tensor_data(_encode(data, qtype))
    writer.close()
    return {"arch": arch, "dtype": dtype, "tensors": len(plan)}


_PLAIN = {0: np.float32, 1: np.float16}  # GGMLQuantizationType.F32 / F16 (IntEnum compares to int)


def _add_hparams(writer, config: dict, name: str, dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type |= {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
