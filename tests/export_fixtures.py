"""Shared artifacts of tests/test_export_*.py, built once per test process: a tiny random llama and adapters
trained on it for a few real steps (lora_b far from zero, so a wrong export shows)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache

import mlx.core as mx
import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before MLX)

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
    "dora": dict(fine_tune_type="dora", num_layers=1, lora_keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
    "qlora": dict(fine_tune_type="lora", num_layers=-1, qlora=True, quantize_bits=4),
}  # fmt: skip


@cache
def trained(kind: str, model: str | None = None) -> str:
    """An adapter folder trained for 6 steps at a high learning rate on `model` (default: the tiny one)."""
    from streamtune.train.trainer import TrainArgs, train

    model = model or tiny_model()
    out = os.path.join(ROOT, f"{kind}-{abs(hash(model)) % 10**6}")
    args = TrainArgs(
        model=model, adapter_path=out, iters=6, batch_size=2, seq_len=64, lr=2e-2, warmup=0, **TRAINED[kind]
    )
    train(args, rows())
    return out


def prompt_ids(model: str) -> list[int]:
    from streamtune.train.models import load_base

    _, tokenizer, _ = load_base(model, dtype="float32")
    return tokenizer.encode(PROMPT, add_special_tokens=False)


def mlx_logits(model: str, adapter: str | None, ids: list[int]) -> np.ndarray:
    """Logits of `model` + `adapter` as streamtune trains and serves it (float32)."""
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
