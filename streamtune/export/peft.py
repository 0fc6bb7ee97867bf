"""PEFT's adapter layout, both ways: mlx-lm `lora_a` (in, r) / `lora_b` (r, out) / DoRA `m` (out,) <->
PEFT `lora_A.weight` (r, in) / `lora_B.weight` (out, r) / `lora_magnitude_vector` (out,), and mlx-lm's
`scale` <-> PEFT's `lora_alpha` (= scale x r; PEFT multiplies B·A by lora_alpha / r)."""

from __future__ import annotations

import json
import os
import re

import mlx.core as mx

from streamtune.export.adapter import MlxAdapter

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PEFT_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m"}


def peft_config(adapter: MlxAdapter, base_name: str) -> dict:
    """adapter_config.json for PEFT (LoraConfig fields)."""
    layers, targets = adapter.layers(), adapter.targets()
    short = {t.rsplit(".", 1)[-1] for t in targets}
    target_modules = sorted(short) if len(short) == len(targets) else targets
    every = {f"model.layers.{n}.{t}" for n in layers for t in targets}
    layer_key = {re.sub(r"^layers\.", "model.layers.", m) for m in adapter.modules}
    if layer_key != every:  # not every (layer, module) pair: name them exactly (a full-match regex)
        target_modules = "|".join(re.escape(m) for m in sorted(layer_key))
        layers = None
    params = adapter.config.get("lora_parameters") or {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "use_dora": adapter.kind == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def peft_tensors(adapter: MlxAdapter, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    out = {}
    for module, parts in adapter.modules.items():
        name = PREFIX + (module if module.startswith("model.") else f"model.{module}")
        out[f"{name}.lora_A.weight"] = parts["lora_a"].T
        out[f"{name}.lora_B.weight"] = parts["lora_b"].T
        if "m" in parts:
            out[f"{name}.lora_magnitude_vector"] = parts["m"]
    if dtype is not None:
        out = {k: v.astype(dtype) for k, v in out.items()}
    return {k: mx.contiguous(v) for k, v in out.items()}


def write_peft(adapter: MlxAdapter, out_dir: str, *, base_name: str, dtype: mx.Dtype | None = None) -> dict:
    """adapter_model.safetensors + adapter_config.json in `out_dir`, loadable with
    `peft.PeftModel.from_pretrained(base, out_dir)`."""
    if adapter.kind == "full":
        raise ValueError("a full fine-tune has no adapter form; export --to fused-mlx or fused-gguf")
    os.makedirs(out_dir, exist_ok=True)
    tensors = peft_tensors(adapter, dtype)
    mx.save_safetensors(os.path.join(out_dir, WEIGHTS), tensors, metadata={"format": "pt"})
    config = peft_config(adapter, base_name)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return {"files": [WEIGHTS, CONFIG], "tensors": len(tensors), "lora_alpha": config["lora_alpha"]}


def read_peft_adapter(adapter_dir: str) -> tuple[dict[str, mx.array], dict]:
    """A PEFT LoRA/DoRA folder as (mlx-lm adapter weights, mlx-lm adapter_config dict)."""
    paths = [os.path.join(adapter_dir, n) for n in (WEIGHTS, CONFIG)]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no {os.path.basename(path)} in {adapter_dir} (not a PEFT adapter folder)"
            )
    with open(paths[1]) as f:
        peft = json.load(f)
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"PEFT adapter type {peft.get('peft_type')!r} is not LoRA")
    if peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise ValueError("PEFT adapters with per-module rank_pattern/alpha_pattern are not supported")
    if peft.get("modules_to_save"):
        raise ValueError(f"PEFT modules_to_save {peft['modules_to_save']} have no mlx-lm adapter form")
    rank = int(peft["r"])
    alpha = float(peft.get("lora_alpha", rank))
    scale = alpha / rank**0.5 if peft.get("use_rslora") else alpha / rank
    weights, targets, layers = {}, set(), set()
    for name, value in mx.load(paths[0]).items():
        leaf = next((k for k in _PEFT_LEAVES if name.endswith("." + k)), None)
        if leaf is None:
            raise ValueError(f"unexpected tensor {name} in {paths[0]}")
        module = name[: -len(leaf) - 1].removeprefix(PREFIX)
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module):
            layers.add(int(m.group(1)))
            targets.add(m.group(2))
        target = _PEFT_LEAVES[leaf]
        weights[f"{module}.{target}"] = value.T if target != "m" else value
    config = {
        "fine_tune_type": "dora" if peft.get("use_dora") else "lora",
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": float(peft.get("lora_dropout", 0.0)),
            "keys": sorted(targets),
        },
        "model": peft.get("base_model_name_or_path"),
        "layers": sorted(layers),
        "source": "peft",
    }
    return weights, config
