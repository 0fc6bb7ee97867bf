"""The demo's multimodal part: its image tokens (one max-pooled token per picture) and its held-out set."""

import numpy as np
import pytest
from corpus import gradient, tiny_clip_config

import streamtune  # noqa: F401
from streamtune.decode import DecodeConfig
from streamtune.decode.clip import ClipEmbedder, save_random_checkpoint
from streamtune.decode.tokens import ImageTokens, media_spec


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(folder)  # 64 px, 16 px patches: a 4 x 4 grid, width 64
    return config, save_random_checkpoint(config, str(folder / "tiny.safetensors"), seed=0)


def test_max_merged_image_tokens_are_the_maximum_over_their_patches(clip):
    config, ckpt = clip
    embedder = ClipEmbedder(config, pretrained=ckpt)
    pixels = [embedder.prepare(gradient())]
    grid = ImageTokens(embedder, 0, 1).encode(pixels)[1][0].astype(np.float32).reshape(4, 4, 64)
    whole = ImageTokens(embedder, 0, 4, "max")
    one = whole.encode(pixels)[1][0].astype(np.float32)
    assert one.shape == (1, 64)
    np.testing.assert_allclose(one[0], grid.max(axis=(0, 1)), atol=1e-3)
    np.testing.assert_array_equal(whole.encode_tokens(pixels)[0], whole.encode(pixels)[1][0])  # stops early
    quarters = ImageTokens(embedder, 0, 2, "max").encode(pixels)[1][0].astype(np.float32)
    assert quarters.shape == (4, 64)
    np.testing.assert_allclose(quarters[1], grid[0:2, 2:4].max(axis=(0, 1)), atol=1e-3)
    cfg = DecodeConfig(
        clip_model=config, image_layer=0, image_pool=4, image_merge="max", media_tokens=["image"]
    )
    spec = media_spec(cfg, ["image"])["image"]
    assert (spec["tokens"], spec["dim"], spec["merge"]) == (1, 64, "max")
    with pytest.raises(ValueError, match="mean, stack or max"):
        ImageTokens(embedder, 0, 2, "median")
