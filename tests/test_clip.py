import numpy as np
import pytest
from corpus import gradient, tiny_clip_config
from PIL import Image

import streamtune  # noqa: F401
from streamtune.decode.clip import ClipEmbedder, embed_dim, save_random_checkpoint

LABELS = ["cat", "dog", "car", "tree", "beach"]


def images(n: int) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [
        Image.fromarray(rng.randint(0, 255, (40 + 7 * i, 90 - 5 * i, 3), dtype=np.uint8)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(folder)
    checkpoint = save_random_checkpoint(config, str(folder / "tiny.safetensors"), seed=3)
    return config, checkpoint


def test_checkpoint_round_trip_through_open_clip_loader(tiny, tmp_path):
    config, checkpoint = tiny
    loaded = ClipEmbedder(config, pretrained=checkpoint, labels=LABELS)
    seeded = ClipEmbedder(config, pretrained=None, seed=3)
    other = ClipEmbedder(config, pretrained=None, seed=4)
    batch = images(3)
    a, b, c = loaded.embed_images(batch), seeded.embed_images(batch), other.embed_images(batch)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).max() > 1e-2
    pt = save_random_checkpoint(config, str(tmp_path / "tiny.pt"), seed=3)
    np.testing.assert_allclose(ClipEmbedder(config, pretrained=pt).embed_images(batch), a, atol=1e-5)


def test_embeddings_normalised_and_batched_equals_unbatched(tiny):
    config, checkpoint = tiny
    batched = ClipEmbedder(config, pretrained=checkpoint, batch_size=4)
    single = ClipEmbedder(config, pretrained=checkpoint, batch_size=1)
    batch = images(7)
    a, b = batched.embed_images(batch), single.embed_images(batch)
    assert a.shape == (7, embed_dim(config)) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert batched.stats["batches"] == 2 and single.stats["batches"] == 7
    assert batched.embed_images([]).shape == (0, embed_dim(config))


def test_text_tower_and_tags(tiny):
    config, checkpoint = tiny
    clip = ClipEmbedder(config, pretrained=checkpoint, labels=LABELS)
    text = clip.embed_text(["a photo of a cat.", "a red car", "a photo of a cat."])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(text[0], text[2], atol=1e-6)
    emb = clip.embed_images(images(2) + [gradient()])
    tags = clip.tag(emb, top_k=3)
    assert len(tags) == 3
    for row in tags:
        assert len(row) == 3 and {label for label, _ in row} <= set(LABELS)
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    # The label whose text embedding *is* the query wins.
    own = clip.label_embeddings()[2:3]
    assert clip.tag(own, top_k=1)[0][0][0] == "car"
    assert ClipEmbedder(config, pretrained=checkpoint).tag(emb) == [[], [], []]


def test_bad_references_fail_clearly(tiny, tmp_path):
    config, _ = tiny
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipEmbedder("no-such-model")
    with pytest.raises(FileNotFoundError):
        ClipEmbedder(config, pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.slow
def test_vit_b_32_random_checkpoint(tmp_path):
    path = save_random_checkpoint("ViT-B-32", str(tmp_path / "vitb32.safetensors"))
    clip = ClipEmbedder("ViT-B-32", pretrained=path, labels=LABELS, batch_size=2)
    emb = clip.embed_images(images(3))
    assert emb.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    clip.batch_size = 1
    np.testing.assert_allclose(emb, clip.embed_images(images(3)), atol=1e-4)
