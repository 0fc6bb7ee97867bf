"""Decode keeps encoder outputs for multimodal training: CLIP patch tokens and stacked Whisper encoder
frames, float16, one row per sample, streamed back as (tokens, width) arrays."""

import numpy as np
import pyarrow as pa
import pytest
from corpus import gradient, image_bytes, speech, tiny_clip_config

import streamtune  # noqa: F401
from streamtune import CloudStreamingDataset, storage
from streamtune.decode import DecodeConfig, decode_shards
from streamtune.decode.clip import ClipEmbedder, save_random_checkpoint
from streamtune.decode.tokens import AudioTokens, config_from_spec, media_spec
from streamtune.shards import RAW_SCHEMA, commit_index, shard_name, write_shard


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(folder)  # 64 px, 16 px patches: a 4 x 4 grid, width 64
    return config, save_random_checkpoint(config, str(folder / "tiny.safetensors"), seed=0)


def raw_rows():
    hello = speech("hello world this is a test")
    png = image_bytes(gradient(), "PNG")
    rows = [
        ("both", hello, png),
        ("image only", None, image_bytes(gradient(50, 80), "PNG")),
        ("audio only", speech("red circle"), None),
        ("text only", None, None),
    ]
    return pa.Table.from_pylist(
        [
            {"sample_id": sid, "audio": a, "image": i, "text": b"caption " + sid.encode(), "sources": [sid]}
            for sid, a, i in rows
        ],
        RAW_SCHEMA,
    )


def test_decode_stores_encoder_tokens_and_the_index_describes_them(tmp_path, clip):
    config, ckpt = clip
    raw, out = f"file://{tmp_path}/raw", f"file://{tmp_path}/features"
    commit_index(raw, [write_shard(raw_rows(), storage.join(raw, shard_name(0)))], RAW_SCHEMA)
    cfg = DecodeConfig(
        clip_model=config,
        clip_pretrained=ckpt,
        labels=["a", "b"],
        media_tokens=["image", "audio"],
        image_pool=2,
    )
    index = decode_shards(raw, out, cfg)
    spec = index["media_tokens"]
    assert spec == media_spec(cfg, ["image", "audio"])
    assert spec["image"] | {"tokens": 4, "dim": 64, "layer": -2, "pool": 2} == spec["image"]
    assert spec["audio"]["dim"] == 384 * 5 and spec["audio"]["tokens_per_second"] == 10
    rows = {r["sample_id"]: r for r in CloudStreamingDataset(out)}
    assert set(rows) == {"both", "image only", "audio only", "text only"}
    for sid, r in rows.items():
        has_image, has_audio = r["clip_embedding"] is not None, r["transcript"] is not None
        assert (r["image_tokens"] is not None) == has_image and (r["audio_tokens"] is not None) == has_audio
        if has_image:
            assert r["image_tokens"].shape == (4, 64) and r["image_tokens"].dtype == np.float16
        if has_audio:
            tokens = r["audio_tokens"]
            expect = int(np.ceil(r["audio_seconds"] * 10))
            assert tokens.shape == (expect, 1920) and tokens.dtype == np.float16, sid
            assert np.isfinite(tokens.astype(np.float32)).all()
    # the embedding taken in the same pass as the tokens is the plain CLIP embedding
    plain = ClipEmbedder(config, pretrained=ckpt).embed_images([gradient()])[0]
    np.testing.assert_allclose(rows["both"]["clip_embedding"], plain, atol=1e-5)
    # the spec rebuilds the same encoders (training online, generation)
    assert media_spec(config_from_spec(spec), ["image", "audio"]) == spec


def test_audio_tokens_per_clip_or_padded_window_and_mean_pooling():
    clip = AudioTokens("offline:tiny.en", factor=4)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 8000, 40 * 16000)]
    together = clip.encode_many(clips, batch_size=4)
    assert [t.shape for t in together] == [(13, 1536), (7, 1536), (500, 1536)]  # 50 frames/s, 4 per token
    for a, c in zip(together, clips, strict=True):  # one clip at a time, whatever else is asked for
        assert a.tobytes() == clip.encode(c).tobytes()
    window = AudioTokens("offline:tiny.en", factor=4, whisper=clip.model, context="window")
    padded = window.encode_many(clips[:2], batch_size=2)
    assert [t.shape for t in padded] == [(13, 1536), (7, 1536)]
    np.testing.assert_allclose(
        padded[1].astype(np.float32), window.encode(clips[1]).astype(np.float32), atol=2e-2
    )
    assert np.abs(padded[0].astype(np.float32) - together[0].astype(np.float32)).max() > 1e-2
    mean = AudioTokens("offline:tiny.en", factor=4, pool="mean", layer=1, whisper=clip.model)
    assert mean.encode(clips[0]).shape == (13, 384)
    with pytest.raises(ValueError, match="out of range"):
        AudioTokens("offline:tiny.en", layer=4, whisper=clip.model)


def test_stacked_image_tokens_keep_each_block_of_patches(clip):
    from streamtune.decode.tokens import ImageTokens

    config, ckpt = clip
    embedder = ClipEmbedder(config, pretrained=ckpt)
    pixels = [embedder.prepare(gradient())]
    plain = ImageTokens(embedder, -2, 1).encode(pixels)[1][0].astype(np.float32)  # 4 x 4 grid, 16 x 64
    stacked = ImageTokens(embedder, -2, 2, "stack").encode(pixels)[1][0].astype(np.float32)
    assert plain.shape == (16, 64) and stacked.shape == (4, 256)
    grid = plain.reshape(4, 4, 64)
    block = np.concatenate([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]])  # token 1: rows 0-1, cols 2-3
    np.testing.assert_allclose(stacked[1], block, atol=1e-3)
    padded = ImageTokens(embedder, -2, 3, "stack").encode(pixels)[1][0]
    assert padded.shape == (4, 576)  # 4 x 4 padded to 6 x 6
    cfg = DecodeConfig(clip_model=config, image_pool=3, image_merge="stack", media_tokens=["image"])
    assert (
        media_spec(cfg, ["image"])["image"] | {"tokens": 4, "dim": 576} == media_spec(cfg, ["image"])["image"]
    )


def test_audio_tokens_without_transcription(tmp_path, clip):
    config, ckpt = clip
    raw, out = f"file://{tmp_path}/raw", f"file://{tmp_path}/features"
    table = raw_rows().slice(2, 1)  # the audio-only sample
    commit_index(raw, [write_shard(table, storage.join(raw, shard_name(0)))], RAW_SCHEMA)
    cfg = DecodeConfig(clip_model=config, clip_pretrained=ckpt, media_tokens=["audio"], transcribe=False)
    assert cfg.key() != cfg.model_copy(update={"transcribe": True}).key()
    index = decode_shards(raw, out, cfg)
    (row,) = list(CloudStreamingDataset(out))
    assert row["transcript"] is None and row["audio_seconds"] > 0.5 and index["stats"]["windows"] == 0
    assert row["audio_tokens"].shape == (int(np.ceil(row["audio_seconds"] * 10)), 1920)
    assert "image_tokens" not in row
