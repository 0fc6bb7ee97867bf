"""Shared artifacts of tests/test_export_*.py, built once per test process: a tiny random llama and adapters
trained on it for a few real steps (lora_b far from zero, so a wrong export shows)."""

from __future__ import annotations  # noqa: I001  (streamtune before mlx, below)

import atexit
import os
import shutil
import tempfile
from functools import cache

import streamtune  # noqa: F401  (loads OpenBLAS before MLX: 30x faster f32 matmul on CPU)
import mlx.core as mx
import numpy as np

ROOT = tempfile.mkdtemp(prefix="streamtune-export-tests-")
atexit.register(shutil.rmtree, ROOT, True)
PROMPT = "The capital of France is"


def rows(n: int = 16) -> list[dict]:
    return [
        {"sample_id": f"s{i}", "transcript": "tick " * (1 + i % 5), "tags": ["t"], "text": f"answer {i % 4}"}
        for i in range(n)
    ]


@cache
def tiny_model() -> str:
    from streamtune.train.synthetic import write_random_model

    return write_random_model(os.path.join(ROOT, "tiny"), "tiny", seed=4)


TRAINED = {
    # every linear of both blocks
    "lora": dict(fine_tune_type="lora", num_layers=-1),
    # top block only, three projections: PEFT gets layers_to_transform + target_modules
    "dora": dict(
        fine_tune_type="dora", num_layers=1,
        lora_keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
    ),
    "qlora": dict(fine_tune_type="lora", num_layers=-1, qlora=True, quantize_bits=4),
}  # fmt: skip


@cache
def trained(kind: str, model: str | None = None) -> str:
    """An adapter folder trained for a few steps at a high learning rate on `model` (default: the tiny one;
    a real model gets the top 4 blocks, 4 steps at 1e-3)."""
    from streamtune.train.trainer import TrainArgs, train

    real = model is not None
    model = model or tiny_model()
    out = os.path.join(ROOT, f"{kind}-{abs(hash(model)) % 10**6}")
    fields = TRAINED[kind] | ({"num_layers": 4} if real else {})
    args = TrainArgs(
        model=model, adapter_path=out, iters=4 if real else 6, batch_size=2, seq_len=64,
        lr=1e-3 if real else 2e-2, warmup=0, **fields,
    )  # fmt: skip
    train(args, rows())
    return out


def prompt_ids(model: str) -> list[int]:
    return list(_prompt_ids(model))


@cache
def _prompt_ids(model: str) -> tuple[int, ...]:
    from streamtune.train.models import load_base

    _, tokenizer, _ = load_base(model, dtype="float32")
    return tuple(tokenizer.encode(PROMPT, add_special_tokens=False))


def mlx_logits(model: str, adapter: str | None, ids: list[int]) -> np.ndarray:
    """Logits of `model` + `adapter` as streamtune trains and serves it (float32; computed once per input)."""
    return _mlx_logits(model, adapter, tuple(ids)).copy()


@cache
def _mlx_logits(model: str, adapter: str | None, ids: tuple[int, ...]) -> np.ndarray:
    from streamtune.train.generate import load_with_adapter

    net, _, _ = load_with_adapter(model, adapter, dtype="float32")
    return np.array(net(mx.array([ids]))[0].astype(mx.float32))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of `b`."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy(step, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, `step(ids) -> last-position logits`."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(step(ids))))
    return ids[-n:]


@cache
def random_model(arch: str) -> str:
    """A tiny random mlx-lm model of another architecture (qwen2: q/k/v biases, no rotary permutation in
    GGUF; qwen3: no GGUF export here), same layer shapes as the tiny llama, SmolLM2 tokenizer."""
    import importlib
    import json

    from mlx.utils import tree_flatten

    config = json.load(open(os.path.join(tiny_model(), "config.json")))
    config |= {"model_type": arch, "head_dim": 16}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(7)
    net = module.Model(module.ModelArgs.from_dict(config))
    out = os.path.join(ROOT, arch)
    os.makedirs(out)
    mx.save_safetensors(os.path.join(out, "model.safetensors"), dict(tree_flatten(net.parameters())))
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    for name in os.listdir(tiny_model()):
        if name.startswith("tokenizer") or name.endswith((".jinja", "special_tokens_map.json")):
            shutil.copy(os.path.join(tiny_model(), name), out)
    return out


def llama_cpp_logits(model: str, ids: list[int], lora: str | None = None, n_new: int = 0):
    """(logits at every prompt position, n_new greedy tokens) from llama.cpp itself (llama-cpp-python)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=model, lora_path=lora, n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2,
        type_k=0, type_v=0,  # float32 KV cache: llama.cpp's default f16 cache alone moves logits ~1e-3
    )  # fmt: skip
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])

        def step(seq):
            llm.reset()
            llm.eval(seq)
            return np.array(llm.scores[len(seq) - 1])

        return logits, greedy(step, ids, n_new) if n_new else []
    finally:
        llm.close()


def mlx_greedy(model: str, adapter: str | None, ids: list[int], n_new: int) -> list[int]:
    from streamtune.train.generate import load_with_adapter

    net, _, _ = load_with_adapter(model, adapter, dtype="float32")
    return greedy(lambda seq: np.array(net(mx.array([seq]))[0, -1]), ids, n_new)
