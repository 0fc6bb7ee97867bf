"""Packing: a packed batch computes exactly what its samples compute alone."""

import json

import mlx.core as mx  # noqa: I001
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import streamtune  # noqa: F401  (BLAS before mlx)
from streamtune.train.data import (
    DEFAULT_TEMPLATE,
    ListSource,
    Packer,
    Template,
    encode,
    pack_rows,
    packed_batches,
    render,
)
from streamtune.train.forward import attention_mask, local_attention, loss_at, loss_sum, supports_packing
from streamtune.train.models import load_base
from streamtune.train.synthetic import SHAPES, write_random_model

LLAMA3_ROPE = {**SHAPES["tiny"], "rope_scaling": SHAPES["llama-3.2-1b"]["rope_scaling"], "rope_theta": 5e5}


@pytest.fixture(scope="module", params=["tiny", "tiny-llama3-rope"])
def tiny(request, tmp_path_factory):
    shape = "tiny" if request.param == "tiny" else LLAMA3_ROPE
    folder = write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), shape, seed=1)
    model, tokenizer, config = load_base(folder, dtype="float32")
    return model, tokenizer


def rows(n):
    return [
        {
            "sample_id": f"s{i}",
            "transcript": "word " * (3 + (i * 7) % 23),
            "tags": ["dog", "park"][: 1 + i % 2],
            "text": f"caption number {i} " + "x" * (i % 5),
            "meta": json.dumps({"notes": f"n{i}"}),
        }
        for i in range(n)
    ]


def per_sample_loss(model, samples):
    """Token-weighted mean completion loss with every sample run alone through the model's own forward."""
    total, count = 0.0, 0
    for ids, prompt_len in samples:
        x = mx.array(ids[:-1])[None]
        y = mx.array(ids[1:])[None]
        logits = model(x)
        ce = nn.losses.cross_entropy(logits, y)[0]
        mask = mx.arange(1, len(ids)) >= prompt_len
        total += (ce * mask).sum().item()
        count += int(mask.sum().item())
    return total / count


def test_packed_loss_equals_mean_of_separate_losses(tiny):
    model, tokenizer = tiny
    assert supports_packing(model)
    # give the adapters non-zero weights so LoRA paths are exercised too
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    seq_len = 160
    samples = [encode(tokenizer, *render(r), max_len=seq_len + 1) for r in rows(14)]
    packer = Packer(3, seq_len)
    pending = list(samples)
    batch = packer.next_batch(lambda: pending.pop(0) if pending else None)
    leftover = [x for lane in packer.lanes for x in lane]
    used = [s for s in samples[: packer.dealt] if s not in leftover]
    assert batch.samples == len(used) and batch.samples >= 4
    assert (batch.segments.max(axis=1) >= 2).all(), "every row holds several samples"
    arrays = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    packed_loss = loss_sum(model, *arrays).item() / batch.targets_count
    expected = per_sample_loss(model, used)
    assert packed_loss == pytest.approx(expected, rel=2e-5)
    # what the trainer computes: head and cross-entropy only where the loss counts
    from streamtune.train.trainer import _arrays

    selected = _arrays(batch)
    assert selected[3].size < batch.inputs.size  # prompts were left out
    assert loss_at(model, *selected).item() / batch.targets_count == pytest.approx(expected, rel=2e-5)


def test_head_at_loss_positions_gives_the_full_heads_loss_and_gradients(tiny):
    from streamtune.train.trainer import _arrays

    model, tokenizer = tiny  # every weight trainable, the tied embedding (input and head) included
    batch = next(iter(packed_batches(rows(10), tokenizer, batch_size=2, seq_len=192)))
    full = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    selected = _arrays(batch)
    assert selected[3].size < batch.inputs.size // 2  # the head runs on under half of the positions
    everywhere, g_full = nn.value_and_grad(model, lambda *a: loss_sum(model, *a))(*full)
    gathered, g_at = nn.value_and_grad(model, lambda *a: loss_at(model, *a))(*selected)
    assert gathered.item() == pytest.approx(everywhere.item(), rel=1e-5)
    flat_full, flat_at = dict(tree_flatten(g_full)), dict(tree_flatten(g_at))
    assert flat_full.keys() == flat_at.keys() and flat_full
    for name, g in flat_full.items():
        assert mx.allclose(g, flat_at[name], rtol=1e-4, atol=1e-6).item(), name


def test_checkpointed_blocks_give_the_same_loss_and_gradients(tiny):
    model, tokenizer = tiny
    batch = next(iter(packed_batches(rows(10), tokenizer, batch_size=2, seq_len=192)))
    arrays = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    results = [
        nn.value_and_grad(model, lambda *a, c=checkpoint: loss_sum(model, *a, checkpoint=c))(*arrays)
        for checkpoint in (False, True)
    ]
    (plain, g_plain), (saved, g_saved) = results
    assert saved.item() == pytest.approx(plain.item(), rel=1e-6)
    flat_plain, flat_saved = dict(tree_flatten(g_plain)), dict(tree_flatten(g_saved))
    assert flat_plain.keys() == flat_saved.keys() and flat_plain
    for name, g in flat_plain.items():
        assert mx.allclose(g, flat_saved[name], rtol=1e-4, atol=1e-6).item(), name


def test_local_attention_matches_dense():
    rng = np.random.default_rng(0)
    B, H, KV, L, D, W = 2, 6, 2, 96, 8, 24
    seg = np.zeros((B, L), np.int32)
    for b in range(B):
        at, s = 0, 1
        while at < L - 3:
            n = int(rng.integers(1, W + 1))
            seg[b, at : at + n] = s
            at, s = at + n, s + 1
    q, k, v = (
        mx.array(rng.standard_normal(shape).astype(np.float32))
        for shape in [(B, H, L, D), (B, KV, L, D), (B, KV, L, D)]
    )
    segments = mx.array(seg)
    dense = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=attention_mask(segments))
    local = local_attention(q, k, v, segments, 0.35, W)
    assert mx.abs(dense - local).max().item() < 1e-5


def test_windowed_packed_loss_matches_dense(tiny):
    model, tokenizer = tiny
    batch = next(iter(packed_batches(rows(10), tokenizer, batch_size=2, seq_len=256)))
    arrays = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    longest = max(
        int((batch.segments == s).sum(axis=1).max()) for s in range(1, int(batch.segments.max()) + 1)
    )
    window = 64 if longest <= 64 else 128
    dense = loss_sum(model, *arrays).item()
    local = loss_sum(model, *arrays, window=window).item()
    assert local == pytest.approx(dense, rel=1e-5)


def test_pack_rows_layout():
    batch = pack_rows([[([1, 2, 3, 4], 2), ([5, 6, 7], 1)], [([8, 9], 1)]], seq_len=6)
    assert batch.inputs.tolist() == [[1, 2, 3, 5, 6, 0], [8, 0, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[2, 3, 4, 6, 7, 0], [9, 0, 0, 0, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert batch.segments.tolist() == [[1, 1, 1, 2, 2, 0], [1, 0, 0, 0, 0, 0]]
    # prompt of 2 tokens: the first target (token 3... index 1 of ids) is prompt, 3 and 4 are completion
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert batch.tokens == 6 and batch.samples == 3
    with pytest.raises(ValueError, match="overflows"):
        pack_rows([[([1] * 8, 1)]], seq_len=6)


def test_packer_state_round_trip_continues_identically():
    samples = [([i] * (2 + i % 5), 1) for i in range(40)]
    stream = iter(samples)
    a = Packer(2, 10)
    first = a.next_batch(lambda: next(stream, None))
    state = json.loads(json.dumps(a.state_dict()))
    rest_a = [b.inputs.tolist() for b in iter(lambda: a.next_batch(lambda: next(stream, None)), None)]
    b = Packer(2, 10)
    b.load_state_dict(state)
    stream_b = iter(samples[state["dealt"] :])
    rest_b = [x.inputs.tolist() for x in iter(lambda: b.next_batch(lambda: next(stream_b, None)), None)]
    assert first.samples > 0 and rest_a == rest_b and len(rest_a) > 3


def test_render_template_fields_and_skips():
    row = {
        "sample_id": "a",
        "transcript": "hello there",
        "tags": ["dog", "ball"],
        "text": "A dog.",
        "meta": "{}",
    }
    prompt, completion = render(row)
    assert "Transcript: hello there" in prompt and "Detected: dog, ball" in prompt
    assert "Notes:" not in prompt and completion == "A dog."
    assert render({**row, "text": None}) is None
    custom = Template(prompt="Tags {tags} / {meta_place}", completion="{transcript}")
    assert render({**row, "meta": json.dumps({"place": "park"})}, custom) == (
        "Tags dog, ball / park",
        "hello there",
    )
    assert render(row, lambda r: ("p", r["sample_id"])) == ("p", "a")
    assert DEFAULT_TEMPLATE.completion == "{text}"


def test_encode_uses_chat_template_and_masks_prompt(tiny):
    _, tokenizer = tiny
    ids, prompt_len = encode(tokenizer, "What is this?", "A dog.", max_len=512)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is this?<|im_end|>" in text and text.rstrip().endswith("A dog.<|im_end|>")
    assert tokenizer.decode(ids[prompt_len:]).startswith("A dog.")
    short, plen = encode(tokenizer, "What is this?", "A dog.", max_len=10)
    assert len(short) == 10 and plen == 10


def test_list_source_resumes_after_last_row():
    src = ListSource(list(range(10)), shuffle=True, seed=3)
    it = iter(src)
    head = [next(it) for _ in range(4)]
    other = ListSource(list(range(10)), shuffle=True, seed=3)
    other.load_state_dict(src.state_dict())
    assert head + list(other) == list(ListSource(list(range(10)), shuffle=True, seed=3))
