"""Soft tokens in packed rows: a packed batch with image/audio tokens computes exactly what each sample
computes alone through mlx-lm's own forward (input embeddings with the projected tokens in place)."""

import json

import mlx.core as mx  # noqa: I001
import mlx.nn as nn
import numpy as np
import pytest

import streamtune  # noqa: F401  (BLAS before mlx)
from streamtune.train.data import Packer, pack_rows, sample_from_json, sample_to_json
from streamtune.train.forward import loss_at, loss_sum
from streamtune.train.models import load_base
from streamtune.train.multimodal import (
    SLOT_ID,
    MediaMismatch,
    attach_projectors,
    encode_with_media,
    sample_embeddings,
    soft_inputs,
)
from streamtune.train.synthetic import write_random_model

DIMS = {"image": 24, "audio": 40}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), "tiny", seed=1)
    model, tokenizer, _ = load_base(folder, dtype="float32")
    attach_projectors(model, DIMS, "mlp", seed=2)
    return model, tokenizer


def samples(tokenizer, n: int, seq_len: int):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        media = {}
        parts = []
        if i % 3 != 1:
            media["image"] = [rng.standard_normal((4 + i % 5, DIMS["image"])).astype(np.float16)]
            parts.append("<image>")
        if i % 3 != 0:
            media["audio"] = [rng.standard_normal((3 + i % 7, DIMS["audio"])).astype(np.float16)]
            parts.append("Listen: <audio> now")
        if i % 4 == 2:  # several media of one kind
            media["image"] = media.get("image", []) + [rng.standard_normal((5, 24)).astype(np.float16)]
            parts.append("and <image>")
        prompt = "\n".join(parts) + f"\nquestion {i}"
        out.append(encode_with_media(tokenizer, prompt, f"answer {i} " + "y" * (i % 4), media, seq_len + 1))
    return out


def alone(model, sample):
    """Completion loss sum and count of one sample through mlx-lm's forward with input embeddings."""
    ids, prompt_len, media = sample
    emb = sample_embeddings(model, ids[:-1], [m for m in media if m[1] + len(m[2]) <= len(ids) - 1])
    logits = model(mx.array(ids[:-1])[None], input_embeddings=emb)
    ce = nn.losses.cross_entropy(logits, mx.array(ids[1:])[None])[0]
    mask = mx.arange(1, len(ids)) >= prompt_len
    return (ce * mask).sum().item(), int(mask.sum().item())


def test_packed_soft_tokens_equal_per_sample_forward(tiny):
    model, tokenizer = tiny
    seq_len = 192
    data = samples(tokenizer, 12, seq_len)
    assert all(ids[at] == SLOT_ID and at + len(f) <= p for ids, p, media in data for _, at, f in media)
    packer = Packer(3, seq_len)
    pending = list(data)
    batch = packer.next_batch(lambda: pending.pop(0) if pending else None)
    assert (batch.segments.max(axis=1) >= 2).all(), "every row holds several samples"
    used = [s for s in data[: packer.dealt] if not any(s is x for lane in packer.lanes for x in lane)]
    assert batch.samples == len(used) and {k for k, _, _ in batch.media} == {"image", "audio"}
    # no loss at a soft token or at the position predicting one
    for _, pos, f in batch.media:
        flat = batch.loss_mask.reshape(-1)
        assert flat[max(pos - 1, 0) : pos + len(f)].sum() == 0
    soft = soft_inputs(batch, ["image", "audio"], DIMS)
    arrays = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    packed = loss_sum(model, *arrays, soft=soft).item() / batch.targets_count
    sums = [alone(model, s) for s in used]
    expected = sum(t for t, _ in sums) / sum(c for _, c in sums)
    assert packed == pytest.approx(expected, rel=2e-5)
    # the trainer's path: head and cross-entropy only where the loss counts
    from streamtune.train.trainer import _arrays

    assert loss_at(model, *_arrays(batch), soft=soft).item() / batch.targets_count == pytest.approx(
        expected, rel=2e-5
    )
    # the media matter: other features give another loss
    other = soft_inputs(batch, ["image", "audio"], DIMS)
    other = (other[0], other[1] * 0 + 1, other[2])
    assert abs(loss_sum(model, *arrays, soft=other).item() / batch.targets_count - packed) > 1e-4


def test_gradients_reach_the_projectors_only_through_soft_tokens(tiny):
    model, tokenizer = tiny
    batch = pack_rows([[s] for s in samples(tokenizer, 2, 128)], 128)
    arrays = [
        mx.array(a) for a in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments)
    ]
    model.freeze()
    model.projectors.unfreeze()
    soft = soft_inputs(batch, ["image", "audio"], DIMS)
    _, grads = nn.value_and_grad(model, lambda *a: loss_sum(model, *a, soft=soft))(*arrays)
    flat = dict(nn.utils.tree_flatten(grads))
    assert flat and all(k.startswith("projectors.") for k in flat)
    assert all(mx.abs(g).sum().item() > 0 for g in flat.values())


def test_sample_json_round_trip_keeps_media_bits(tiny):
    _, tokenizer = tiny
    for s in samples(tokenizer, 4, 128):
        back = sample_from_json(json.loads(json.dumps(sample_to_json(s))))
        assert back[:2] == s[:2] and len(back[2]) == len(s[2])
        for (k1, a1, f1), (k2, a2, f2) in zip(back[2], s[2], strict=True):
            assert (k1, a1) == (k2, a2) and f1.tobytes() == f2.tobytes()


def test_placeholders_must_match_the_media(tiny):
    _, tokenizer = tiny
    image = [np.zeros((3, 24), np.float16)]
    with pytest.raises(MediaMismatch, match="sample 'clips/s07'.*0 <image>.*1 image"):
        encode_with_media(tokenizer, "no placeholder", "x", {"image": image}, 64, sample_id="clips/s07")
    with pytest.raises(MediaMismatch, match="sample 'b'.*2 <image>"):
        encode_with_media(tokenizer, "<image> <image>", "x", {"image": image}, 64, sample_id="b")
    with pytest.raises(MediaMismatch, match="<audio>"):
        encode_with_media(tokenizer, "<audio>", "x", {}, 64, sample_id="c")
    # a prompt without placeholders and without media is plain text, as `data.encode` makes it
    from streamtune.train.data import encode

    assert encode_with_media(tokenizer, "hi there", "ok", {}, 64)[:2] == encode(
        tokenizer, "hi there", "ok", 64
    )
