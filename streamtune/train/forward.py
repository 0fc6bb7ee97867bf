"""Forward pass over packed rows for llama-family mlx-lm models, and the masked token loss.

mlx-lm's model `__call__` builds a plain causal mask and positions 0..L-1. A packed row needs a
block-diagonal causal mask and positions that restart per sample, so this reuses the model's own modules
(including LoRA/DoRA/quantized layers and its RoPE variant) with those two inputs. Other architectures are
trained one sample per row through the model's own `__call__`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from streamtune import cpu_ops

PACKED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
Mask = mx.array | tuple[mx.array, int]  # dense boolean mask, or (segments, window) for local attention


def supports_packing(model: nn.Module) -> bool:
    if getattr(model, "model_type", None) not in PACKED_ARCHS:
        return False
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        not layers
        or getattr(model.args, "sliding_window", None)
        and "sliding_attention" in (getattr(model.args, "layer_types", None) or [])
    ):
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "scale"))


def attention_mask(segments: mx.array, additive: mx.Dtype | None = None) -> mx.array:
    """(B, 1, L, L): query i may see key j iff j <= i and both belong to the same sample. Boolean, or
    0 / -inf in dtype `additive`."""
    L = segments.shape[1]
    causal = mx.arange(L)[:, None] >= mx.arange(L)[None, :]
    same = segments[:, :, None] == segments[:, None, :]
    allowed = (same & causal)[:, None]
    if additive is None:
        return allowed
    return mx.where(allowed, mx.array(0.0, additive), mx.array(-mx.inf, additive))


def local_attention(
    q: mx.array, k: mx.array, v: mx.array, segments: mx.array, scale: float, window: int
) -> mx.array:
    """Exact attention for packed rows whose samples are at most `window` tokens long.

    The row is cut into chunks of `window` queries. A sample that fits in a window and contains a query
    of chunk c starts no earlier than chunk c - 1, so each chunk attends to keys of its own and the
    previous chunk only: cost L * 2W instead of L * L.
    """
    B, H, L, D = q.shape
    KV, W = k.shape[1], window
    r, n = H // KV, L // W
    qc = (q * scale).reshape(B, KV, r, n, W, D).transpose(0, 1, 3, 2, 4, 5)  # B KV n r W D

    def with_previous(x, fill):
        chunks = x.reshape(*x.shape[:-2], n, W, x.shape[-1]) if x.ndim == 4 else x.reshape(B, n, W)
        axis = chunks.ndim - (3 if x.ndim == 4 else 2)
        pad = [(0, 0)] * chunks.ndim
        pad[axis] = (1, 0)
        prev = mx.pad(chunks, pad, constant_values=fill)
        prev = mx.take(prev, mx.arange(n), axis=axis)
        return mx.concatenate([prev, chunks], axis=axis + 1)

    kk = with_previous(k, 0.0)  # B KV n 2W D
    vv = with_previous(v, 0.0)
    seg_q = segments.reshape(B, n, W)
    seg_k = with_previous(segments, -1)  # B n 2W
    causal = mx.arange(2 * W)[None, :] <= (mx.arange(W)[:, None] + W)
    allowed = (seg_q[..., :, None] == seg_k[..., None, :]) & causal  # B n W 2W
    scores = qc @ kk[:, :, :, None].swapaxes(-1, -2)  # B KV n r W 2W
    scores = mx.where(allowed[:, None, :, None], scores, mx.array(-1e30, scores.dtype))
    probs = cpu_ops.softmax(scores) if cpu_ops.active(scores) else mx.softmax(scores, axis=-1, precise=True)
    out = probs @ vv[:, :, :, None]  # B KV n r W D
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(B, H, L, D)


def _rope(rope: nn.Module, x: mx.array, positions: mx.array) -> mx.array:
    # x: (B, L, H, D). RoPE's offset may be a vector (one per leading index): make every token its own
    # length-1 sequence so each gets its own position.
    B, L, H, D = x.shape
    out = rope(x.reshape(B * L, H, 1, D), offset=positions.reshape(-1))
    return out.reshape(B, L, H, D)


def _attention(attn: nn.Module, x: mx.array, positions: mx.array, mask: Mask) -> mx.array:
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = _rope(attn.rope, q, positions).transpose(0, 2, 1, 3)
    k = _rope(attn.rope, k, positions).transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    if isinstance(mask, tuple):
        segments, window = mask
        out = local_attention(q, k, v, segments, attn.scale, window)
    elif cpu_ops.active(q):
        out = cpu_ops.attention(q, k, v, attn.scale, mask)
    else:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _block(layer: nn.Module, h: mx.array, positions: mx.array, mask: Mask) -> mx.array:
    h = h + _attention(layer.self_attn, layer.input_layernorm(h), positions, mask)
    x = layer.post_attention_layernorm(h)
    if cpu_ops.active(x) and type(layer.mlp).__name__ == "MLP" and hasattr(layer.mlp, "gate_proj"):
        return h + cpu_ops.swiglu_mlp(layer.mlp, x)
    return h + layer.mlp(x)


def _checkpointed_block(layer: nn.Module, h: mx.array, positions: mx.array, mask: Mask) -> mx.array:
    # Only the parameters and hidden state are inputs of the checkpoint: were positions and mask inputs
    # too, its backward would ask attention for a gradient with respect to the mask, which the CUDA
    # backend's fused attention refuses.
    def inner(params, h):
        layer.update(params)
        return _block(layer, h, positions, mask)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h)


def packed_hidden(
    model: nn.Module,
    inputs: mx.array,
    positions: mx.array,
    segments: mx.array,
    checkpoint: bool = False,
    window: int | None = None,
    additive_mask: bool = False,
    soft: tuple[mx.array, ...] | None = None,
) -> mx.array:
    """Final (normed) hidden states of packed rows. `window`: the longest sample, if shorter than half a
    row (enables `local_attention`). `soft`: (gather, features per kind) of multimodal soft tokens
    (`multimodal.soft_inputs`), put into the input embeddings by `model.projectors`."""
    inner = model.model
    L = inputs.shape[1]
    if window and 2 * window <= L and L % window == 0:
        mask = (segments, window)
    else:
        mask = attention_mask(segments, inner.embed_tokens.weight.dtype if additive_mask else None)
    h = inner.embed_tokens(inputs)
    if soft:
        h = _with_soft(model, h, soft)
    block = _checkpointed_block if checkpoint else _block
    for layer in inner.layers:
        h = block(layer, h, positions, mask)
    return inner.norm(h)


def _with_soft(model: nn.Module, h: mx.array, soft: tuple[mx.array, ...]) -> mx.array:
    from streamtune.train.multimodal import insert_soft

    return insert_soft(model.projectors, h, *soft)


def output_head(model: nn.Module, h: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def packed_logits(
    model: nn.Module,
    inputs: mx.array,
    positions: mx.array,
    segments: mx.array,
    checkpoint: bool = False,
    window: int | None = None,
    additive_mask: bool = False,
) -> mx.array:
    """Logits of packed rows."""
    return output_head(
        model, packed_hidden(model, inputs, positions, segments, checkpoint, window, additive_mask)
    )


def loss_at(
    model: nn.Module,
    inputs: mx.array,
    positions: mx.array,
    segments: mx.array,
    index: mx.array,
    targets: mx.array,
    weights: mx.array,
    packed: bool = True,
    checkpoint: bool = False,
    window: int | None = None,
    additive_mask: bool = False,
    soft: tuple[mx.array, ...] | None = None,
) -> mx.array:
    """`loss_sum`, with the vocabulary projection and cross-entropy computed only at `index` (flat
    positions where the loss counts, padded with weight-0 entries to a few fixed sizes so a compiled step
    sees few shapes). Prompt tokens carry no loss, so this skips most of the widest matmul and the
    softmax over the vocabulary (slow on CPUs: about 0.6 s per 512 tokens of a 49k vocabulary here)."""
    if packed:
        h = packed_hidden(model, inputs, positions, segments, checkpoint, window, additive_mask, soft)
        logits = output_head(model, h.reshape(-1, h.shape[-1])[index])
    elif soft:
        embeddings = _with_soft(model, model.model.embed_tokens(inputs), soft)
        logits = model(inputs, input_embeddings=embeddings)
        logits = logits.reshape(-1, logits.shape[-1])[index]
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[index]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return (ce * weights).sum()


def loss_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    loss_mask: mx.array,
    positions: mx.array,
    segments: mx.array,
    packed: bool = True,
    checkpoint: bool = False,
    window: int | None = None,
    additive_mask: bool = False,
    soft: tuple[mx.array, ...] | None = None,
) -> mx.array:
    """Sum of the cross-entropy over completion tokens (divide by `loss_mask.sum()` for the mean), with
    logits at every position; `loss_at` leaves out the positions without loss."""
    return loss_at(
        model,
        inputs,
        positions,
        segments,
        mx.arange(inputs.size),
        targets.reshape(-1),
        loss_mask.reshape(-1),
        packed,
        checkpoint,
        window,
        additive_mask,
        soft,
    )
