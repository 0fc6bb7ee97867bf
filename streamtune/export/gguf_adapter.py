"""A llama.cpp LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora adapter.gguf`, Ollama's ADAPTER).

llama.cpp's layout: `blk.N.attn_q.weight.lora_a` holds PEFT's A (r, in), `...lora_b` PEFT's B (out, r);
`adapter.lora.alpha` = scale x r (llama.cpp multiplies by alpha / r; a missing alpha means 1, which
would make an mlx-lm adapter 20x weaker). llama.cpp's llama graph wants Q/K rows in its rotary order
(convert_hf_to_gguf permutes them), so B's rows of q_proj/k_proj are permuted the same way.
"""

from __future__ import annotations

import numpy as np

from streamtune.export.adapter import MlxAdapter, layer_of
from streamtune.export.gguf_model import gguf_arch, gguf_name, rotary_permute


def refuse_reason(adapter: MlxAdapter, config: dict) -> str | None:
    """Why `adapter` on a base with `config` has no llama.cpp LoRA form (None: it has one)."""
    if adapter.kind == "full":
        return "a full fine-tune has no adapter form; export --to fused-gguf instead"
    if adapter.kind == "dora":
        return "DoRA magnitudes have no llama.cpp LoRA form; export --to fused-gguf or ollama instead"
    if adapter.config.get("qlora") and not _gguf_quantized(config):
        return (
            "this QLoRA adapter was trained against MLX's own 4-bit quantization of the base, which "
            "llama.cpp cannot load; export --to fused-gguf instead (the fused weights are exact)"
        )
    return None


def _gguf_quantized(config: dict) -> bool:
    # a quantized GGUF base (Q4_0/Q4_1/Q8_0) is what both MLX and llama.cpp compute with
    return str(config.get("source", "")).endswith(".gguf") and bool(config.get("quantization"))


def write_gguf_adapter(adapter: MlxAdapter, config: dict, path: str, *, name: str = "adapter") -> dict:
    """Write `adapter` (checked against the base `config`) as a llama.cpp LoRA GGUF file at `path`."""
    import gguf

    reason = refuse_reason(adapter, config)
    if reason:
        raise ValueError(reason)
    arch = gguf_arch(config)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
    writer.add_name(name)
    count = 0
    for module in sorted(adapter.modules, key=lambda m: (layer_of(m), m)):
        parts = adapter.modules[module]
        a = np.asarray(parts["lora_a"].T, dtype=np.float32)  # (r, in)
        b = np.asarray(parts["lora_b"].T, dtype=np.float32)  # (out, r)
        b = rotary_permute(module, b, config)
        target = gguf_name(f"{module}.weight")
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
        count += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "tensors": count, "lora_alpha": float(adapter.alpha)}
