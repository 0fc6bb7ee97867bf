"""The feature index's `clip_embedding` width is the configured CLIP model's, in every decode path."""

import pyarrow as pa
import pytest
from corpus import Item, gradient, image_bytes, raw_table

import streamtune  # noqa: F401
from streamtune import storage
from streamtune.decode import DecodeConfig, commit_features, decode_shard, decode_shards
from streamtune.decode.clip import embed_dim, save_random_checkpoint
from streamtune.shards import RAW_SCHEMA, commit_index, read_index, read_shard_table, shard_name, write_shard
from streamtune.shards.format import schema_from_json

# open_clip's smallest built-in config whose width is not 512: 256-d, about 1 s to build and 1 s to load.
MODEL = "ViT-S-32-alt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_checkpoint(MODEL, str(tmp_path_factory.mktemp("clip") / "s32alt.safetensors"), seed=0)


@pytest.fixture(scope="module")
def width():
    dim = embed_dim(MODEL)
    assert dim != 512
    return dim


def make_cfg(ckpt) -> DecodeConfig:
    return DecodeConfig(clip_model=MODEL, clip_pretrained=ckpt, labels=["cat", "dog"])


def write_raw(prefix: str, tables, so, start: int = 0) -> list[dict]:
    entries = [write_shard(t, storage.join(prefix, shard_name(start + i)), so) for i, t in enumerate(tables)]
    commit_index(prefix, entries, RAW_SCHEMA, so)
    return entries


def assert_width(out: str, so, index: dict, width: int) -> list[dict]:
    """The committed index and every feature shard carry fixed_size_list<float32>[width]; returns the rows."""
    want = pa.list_(pa.float32(), width)
    assert schema_from_json(index["schema"]).field("clip_embedding").type == want
    assert read_index(out, so)["schema"].field("clip_embedding").type == want
    rows = []
    for entry in index["shards"]:
        table = read_shard_table(out, entry, so)
        assert table.schema.field("clip_embedding").type == want
        rows += table.to_pylist()
    for row in rows:
        assert row["clip_embedding"] is None or len(row["clip_embedding"]) == width
    return rows


def test_feature_schema_width_follows_configured_clip_model(bucket, s3opts, ckpt, width):
    items = [
        Item("img", "image", image_bytes(gradient(), "JPEG"), ext=".jpg"),
        Item("cap", "text", "a caption", ext=".txt"),
    ]
    raw, out = f"{bucket}/raw", f"{bucket}/features"
    # one shard with an image and a text, one with no rows, one corrupt (read as an empty feature shard)
    entries = write_raw(raw, [raw_table(items), raw_table([]), raw_table(items[1:])], s3opts)
    good = storage.read_bytes(storage.join(raw, entries[2]["path"]), s3opts)
    storage.write_bytes(storage.join(raw, entries[2]["path"]), good[:-10] + b"0123456789", s3opts)
    cfg = make_cfg(ckpt)

    first = decode_shards(raw, out, cfg, s3opts)
    assert first["stats"]["images"] == 1 and first["quarantine"]["by_error"] == {"corrupt_shard": 1}
    rows = assert_width(out, s3opts, first, width)
    (image_row,) = [r for r in rows if r["sample_id"] == "corpus/img"]
    assert len(image_row["clip_embedding"]) == width and len(image_row["tags"]) == 2

    again = decode_shards(raw, out, cfg, s3opts)  # decoded shards skipped, the corrupt one retried
    assert again["stats"]["skipped_shards"] == 2 and again["stats"]["images"] == 0
    assert_width(out, s3opts, again, width)

    # An incremental run rewrote shard 0 without the caption: its features are derived, not decoded.
    table = read_shard_table(raw, entries[0], s3opts)
    derived = write_shard(table.slice(0, 1), storage.join(raw, shard_name(3)), s3opts)
    derived["derived_from"] = {"path": entries[0]["path"], "checksum": entries[0]["checksum"],
                               "dropped": ["corpus/cap"]}  # fmt: skip
    commit_index(raw, [entries[1], derived], RAW_SCHEMA, s3opts)
    third = decode_shards(raw, out, cfg, s3opts)
    assert third["stats"]["derived_shards"] == 1 and third["stats"]["images"] == 0
    (row,) = [r for r in assert_width(out, s3opts, third, width) if r["sample_id"] == "corpus/img"]
    assert row["clip_embedding"] == image_row["clip_embedding"]

    # A result of another width is refused rather than committed under a schema that does not match it.
    result = decode_shard(raw, derived, out, cfg, s3opts)
    with pytest.raises(ValueError, match="clip_embedding"):
        commit_features(f"{bucket}/other", [result], s3opts, clip_dim=512)


def test_empty_feature_set_gets_configured_width(bucket, s3opts, ckpt, width):
    raw = f"{bucket}/raw"
    write_raw(raw, [], s3opts)  # a committed raw set with no shards: no results to take a schema from
    index = decode_shards(raw, f"{bucket}/features", make_cfg(ckpt), s3opts)
    assert index["rows"] == 0 and index["shards"] == []
    assert_width(f"{bucket}/features", s3opts, index, width)

    direct = commit_features(f"{bucket}/direct", [], s3opts, clip_dim=width)
    assert_width(f"{bucket}/direct", s3opts, direct, width)

    from tasks.stages import commit_features_task

    summary = commit_features_task.fn(f"{bucket}/task", [], [], work_options=s3opts, clip_model=MODEL)
    assert summary["rows"] == 0
    assert read_index(f"{bucket}/task", s3opts)["schema"].field("clip_embedding").type.list_size == width
