"""The numpy softmax / SiLU / attention of `cpu_ops` against MLX's own ops, values and gradients."""

import mlx.core as mx  # noqa: I001
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import streamtune  # noqa: F401  (BLAS before mlx)
from streamtune import cpu_ops
from streamtune.train.forward import attention_mask, loss_at
from streamtune.train.models import load_base
from streamtune.train.synthetic import write_random_model


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert mx.allclose(a, b, rtol=tol, atol=tol).item(), float(mx.abs(a - b).max())


def test_softmax_and_silu_match_mlx_values_and_gradients():
    x = mx.array(np.random.default_rng(0).normal(0, 4, (3, 5, 37)).astype(np.float32))
    weights = mx.array(np.random.default_rng(1).normal(size=(37,)).astype(np.float32))
    for ours, theirs in (
        (cpu_ops.softmax, lambda t: mx.softmax(t, axis=-1, precise=True)),
        (cpu_ops.silu, nn.silu),
    ):
        _close(ours(x), theirs(x))
        grad_ours = mx.grad(lambda t, f=ours: (f(t) * weights).sum())(x)
        grad_theirs = mx.grad(lambda t, f=theirs: (f(t) * weights).sum())(x)
        _close(grad_ours, grad_theirs)


@pytest.mark.parametrize("additive", [False, True])
def test_attention_matches_fused_attention_with_grouped_heads(additive):
    rng = np.random.default_rng(2)
    B, H, KV, L, D = 2, 6, 2, 40, 8
    q, k, v = (
        mx.array(rng.standard_normal(s).astype(np.float32))
        for s in [(B, H, L, D), (B, KV, L, D), (B, KV, L, D)]
    )
    segments = mx.array(np.repeat([[1, 1, 2, 2, 2]], B, 0).repeat(8, axis=1))
    mask = attention_mask(segments, mx.float32 if additive else None)

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)

    def ours(q, k, v):
        return cpu_ops.attention(q, k, v, 0.3, mask)

    _close(ours(q, k, v), fused(q, k, v))
    g_ours = mx.grad(lambda *a: (ours(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    g_fused = mx.grad(lambda *a: (fused(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_fused, strict=True):
        _close(a, b, 1e-4)


def test_packed_loss_and_gradients_match_with_and_without_cpu_ops(tmp_path):
    folder = write_random_model(str(tmp_path / "tiny"), "tiny", seed=3)
    model, _, _ = load_base(folder, dtype="float32")
    rng = np.random.default_rng(4)
    B, L = 2, 64
    inputs = mx.array(rng.integers(0, 200, (B, L)))
    segments = mx.array(np.repeat(np.arange(4), 16)[None].repeat(B, 0))
    positions = mx.array(np.tile(np.arange(16), 4)[None].repeat(B, 0))
    index = mx.arange(0, B * L, 3)
    targets = mx.array(rng.integers(0, 200, index.size))
    weights = mx.ones(index.shape)

    def loss(m):
        return loss_at(m, inputs, positions, segments, index, targets, weights)

    results = {}
    for on in (False, True):
        with cpu_ops.enabled(on):
            value, grads = nn.value_and_grad(model, loss)(model)
            results[on] = value.item(), dict(tree_flatten(grads))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for name, g in results[False][1].items():
        _close(results[True][1][name], g, 1e-4)
