"""Random-weight llama models of a given shape as mlx-lm folders, for tests and throughput benchmarks.

The tokenizer is the offline SmolLM2 one (its ids fit any vocabulary of at least 49152 entries).
"""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
from mlx.utils import tree_flatten

SHAPES = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
}


def write_random_model(
    out_dir: str,
    shape: str | dict = "tiny",
    *,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_dir: str | None = None,
) -> str:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer) with random weights.
    The tokenizer is copied from `tokenizer_dir` if given, else rebuilt from the SmolLM2 GGUF."""
    from mlx_lm.models.llama import Model, ModelArgs

    from streamtune.train.gguf import read_gguf
    from streamtune.train.models import offline_smollm2_gguf
    from streamtune.train.tokenizer import hf_tokenizer_from_gguf

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    config = {
        "model_type": "llama",
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        **fields,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    os.makedirs(out_dir, exist_ok=True)
    mx.save_safetensors(os.path.join(out_dir, "model.safetensors"), weights, metadata={"format": "mlx"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name != "config.json" and not name.endswith(".safetensors"):
                shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    else:
        _, meta = read_gguf(offline_smollm2_gguf())
        hf_tokenizer_from_gguf(meta).save_pretrained(out_dir)
    return out_dir
