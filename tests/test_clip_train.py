"""The small CLIP trained on drawings sees them: zero-shot colour and shape on new drawings, and its
checkpoint tags pictures through the real decode path (DecodeConfig -> Decoder -> open_clip loader)."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest

import streamtune  # noqa: F401
from streamtune.config import DecodeConfig
from streamtune.decode.clip_train import ClipRecipe, drawing, trained_clip, zero_shot_accuracy
from streamtune.demo.data import COLOURS, SHAPES, draw
from streamtune.shards.format import RAW_SCHEMA

# measured on held-out drawings (seed 1234, n=240): colour 0.99, shape 0.93 (chance 0.17 / 0.25)
MIN_COLOUR, MIN_SHAPE = 0.85, 0.75


@pytest.fixture(scope="session")
def clip():
    """(config, checkpoint): trained once per recipe, then reused from ~/.cache/streamtune/clip/."""
    return trained_clip()


def test_zero_shot_colour_and_shape_on_held_out_drawings(clip):
    acc = zero_shot_accuracy(*clip, n=240, seed=1234)
    print(json.dumps(acc))
    assert acc["colour"] >= MIN_COLOUR and acc["shape"] >= MIN_SHAPE  # chance: 1/6 and 1/4


def test_recipe_key_tracks_the_recipe():
    assert ClipRecipe().key() == ClipRecipe().key()
    assert ClipRecipe(steps=5).key() != ClipRecipe().key()


def test_checkpoint_tags_pictures_through_the_decode_path(clip):
    from streamtune.decode.features import Decoder

    config, checkpoint = clip
    cfg = DecodeConfig(clip_model=config, clip_pretrained=checkpoint, labels=list(SHAPES), top_k=1)
    rng = np.random.default_rng(99)
    truth, rows = [], []
    for i, (colour, shape) in enumerate([(c, s) for c in COLOURS for s in SHAPES][::2]):
        img = draw(shape, colour) if i % 2 else drawing(colour, shape, rng, 160)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        rows.append({"sample_id": f"p{i}", "image": buf.getvalue(), "sources": [f"p{i}.png"]})
        truth.append(shape)
    table, quarantine = Decoder(cfg).decode_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    assert not quarantine and table.num_rows == len(rows)
    tags = [t[0] for t in table.column("tags").to_pylist()]
    right = sum(t == s for t, s in zip(tags, truth, strict=True))
    assert right / len(truth) >= MIN_SHAPE, list(zip(tags, truth, strict=True))
    emb = np.asarray(table.column("clip_embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
