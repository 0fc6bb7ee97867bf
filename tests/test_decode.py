import math

import numpy as np
import pytest
from corpus import ODD_IDS, Item, build, gradient, image_bytes, raw_table, speech

import streamtune  # noqa: F401
from streamtune import storage
from streamtune.decode import DecodeConfig, decode_shard, decode_shards, read_quarantine
from streamtune.shards import RAW_SCHEMA, commit_index, read_index, read_shard_table, shard_name, write_shard


def make_cfg(tiny_clip, **kw) -> DecodeConfig:
    base = dict(
        whisper_model="offline:tiny.en",
        clip_model=tiny_clip["config"],
        clip_pretrained=tiny_clip["ckpt"],
        labels=["cat", "dog", "car", "tree"],
        cache_dir=tiny_clip["cache"],
        max_audio_seconds=120,
    )
    return DecodeConfig(**(base | kw))


def write_raw(prefix: str, tables, so) -> list[dict]:
    entries = [write_shard(t, storage.join(prefix, shard_name(i)), so) for i, t in enumerate(tables)]
    commit_index(prefix, entries, RAW_SCHEMA, so)
    return entries


def list_keys(url: str, so) -> list[str]:
    fs, path = storage.get_fs(url, so)
    return sorted(p[len(path.rstrip("/")) + 1 :] for p in fs.find(path))


@pytest.mark.slow
def test_hostile_corpus_is_decoded_or_quarantined(bucket, s3opts, tiny_clip):
    items = build()
    # Odd but legal keys ride on good samples; none may turn into a path.
    odd = [Item(f"odd {i}", "image", image_bytes(gradient(), "PNG"), ext=".png") for i in range(len(ODD_IDS))]
    ids = [f"corpus/{it.name}" for it in items] + list(ODD_IDS)
    items += odd
    half = len(items) // 2
    tables = [raw_table(items[:half], ids[:half]), raw_table(items[half:], ids[half:])]
    raw, out = f"{bucket}/raw", f"{bucket}/features"
    write_raw(raw, tables, s3opts)

    seen = []
    index = decode_shards(raw, out, make_cfg(tiny_clip), s3opts, progress=lambda i, n, r: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]

    good = {sid: it for sid, it in zip(ids, items, strict=True) if it.ok}
    bad = {sid: it for sid, it in zip(ids, items, strict=True) if not it.ok}
    assert len(bad) >= 20
    features = {}
    for entry in read_index(out, s3opts)["shards"]:
        for row in read_shard_table(out, entry, s3opts).to_pylist():
            features[row["sample_id"]] = row
    assert set(features) == set(good)

    quarantine = read_quarantine(out, s3opts).to_pylist()
    by_id = {q["sample_id"]: q for q in quarantine}
    assert set(by_id) == set(bad) and len(quarantine) == len(bad)
    for sid, it in bad.items():
        q = by_id[sid]
        assert q["error"] in it.expect, (sid, q)
        assert q["stage"] == "decode" and q["message"] and q["shard"].startswith("shard-")
        if it.ext:
            assert q["key"] == sid + it.ext
    assert index["quarantine"]["rows"] == len(bad)
    assert sum(index["quarantine"]["by_error"].values()) == len(bad)
    assert index["rows"] == len(good) and index["stats"]["quarantined"] == len(bad)

    speech_row = features["corpus/speech wav"]
    assert "world" in speech_row["transcript"].lower() and speech_row["language"] == "en"
    assert speech_row["audio_seconds"] == pytest.approx(1.69, abs=0.1) and speech_row["segments"].startswith(
        "["
    )
    for sid, it in good.items():
        row = features[sid]
        if it.column == "image":
            assert math.isclose(float(np.linalg.norm(row["clip_embedding"])), 1.0, abs_tol=1e-4)
            assert len(row["tags"]) == 3 and len(row["tag_scores"]) == 3
            assert row["transcript"] is None
        elif it.column == "audio":
            assert row["clip_embedding"] is None and row["transcript"] is not None
    assert features["corpus/plain text"]["text"] == "a caption with unicode: naïve café ✓"
    for sid in ODD_IDS:
        assert features[sid]["sources"] == [sid + ".png"]

    # Only the shard-set layout exists under the output prefix, whatever the keys were.
    names = list_keys(out, s3opts)
    expected = {"index.json", "quarantine.parquet", shard_name(0), shard_name(1)}
    expected |= {f"_decode/{shard_name(i)}.json" for i in range(2)}
    assert set(names) == expected
    assert all(not k.startswith(("tmp", "absolute")) for k in list_keys(bucket, s3opts))


@pytest.mark.slow
def test_rerun_skips_model_work_and_a_changed_model_redecodes(bucket, s3opts, tiny_clip):
    rows = [
        Item("s", "audio", speech("good morning everyone"), ext=".wav"),
        Item("i1", "image", image_bytes(gradient(), "JPEG"), ext=".jpg"),
        Item("i2", "image", image_bytes(gradient(40, 80), "PNG"), ext=".png"),
    ]
    raw, out = f"{bucket}/raw", f"{bucket}/features"
    write_raw(raw, [raw_table(rows[:2]), raw_table(rows[2:])], s3opts)
    cfg = make_cfg(tiny_clip)

    first = decode_shards(raw, out, cfg, s3opts)
    assert first["stats"]["windows"] == 1 and first["stats"]["images"] == 2
    assert first["stats"]["skipped_shards"] == 0

    again = decode_shards(raw, out, cfg, s3opts)
    assert again["stats"]["windows"] == 0 and again["stats"]["images"] == 0
    assert again["stats"]["audio_seconds"] == 0 and again["stats"]["skipped_shards"] == 2
    assert again["shards"] == first["shards"]

    # Batch sizes change speed, not results: still skipped.
    same = decode_shards(raw, out, make_cfg(tiny_clip, audio_batch=1, image_batch=1), s3opts)
    assert same["stats"]["skipped_shards"] == 2

    changed = decode_shards(raw, out, make_cfg(tiny_clip, clip_pretrained=tiny_clip["ckpt2"]), s3opts)
    assert changed["stats"]["skipped_shards"] == 0
    assert changed["stats"]["images"] == 2 and changed["stats"]["windows"] == 1
    assert [e["key"] for e in changed["shards"]] != [e["key"] for e in first["shards"]]
    emb = read_shard_table(out, changed["shards"][0], s3opts).column("clip_embedding").to_pylist()
    assert emb[1] is not None


def test_corrupt_raw_shard_is_quarantined_and_retried(bucket, s3opts, tiny_clip):
    rows = [Item("t1", "text", "first caption", ext=".txt"), Item("t2", "text", "second caption", ext=".txt")]
    raw, out = f"{bucket}/raw", f"{bucket}/features"
    entries = write_raw(raw, [raw_table(rows[:1]), raw_table(rows[1:])], s3opts)
    good = storage.read_bytes(storage.join(raw, entries[1]["path"]), s3opts)
    storage.write_bytes(storage.join(raw, entries[1]["path"]), good[:-10] + b"0123456789", s3opts)

    index = decode_shards(raw, out, make_cfg(tiny_clip), s3opts)
    assert index["rows"] == 1 and len(index["shards"]) == 2
    (record,) = read_quarantine(out, s3opts).to_pylist()
    assert (
        record["error"] == "corrupt_shard"
        and record["key"] == entries[1]["path"]
        and record["stage"] == "read"
    )

    storage.write_bytes(storage.join(raw, entries[1]["path"]), good, s3opts)  # repaired upstream
    index = decode_shards(raw, out, make_cfg(tiny_clip), s3opts)
    assert index["rows"] == 2 and index["quarantine"]["rows"] == 0
    assert index["stats"]["skipped_shards"] == 1  # the good shard was not decoded again


def test_unsafe_shard_names_are_refused(tmp_path, tiny_clip):
    cfg = make_cfg(tiny_clip)
    for bad in ("../escape.arrow", "/etc/passwd", "a/b.arrow", ".hidden", "x.json"):
        with pytest.raises(ValueError, match="unsafe shard name"):
            decode_shard(str(tmp_path / "raw"), {"path": bad, "checksum": "x"}, str(tmp_path / "out"), cfg)
    assert not (tmp_path / "out").exists()


def test_config_key_tracks_settings_not_batching(tiny_clip):
    a, b = make_cfg(tiny_clip), make_cfg(tiny_clip, audio_batch=2, image_batch=3)
    assert a.key() == b.key()
    assert a.key() != make_cfg(tiny_clip, labels=["other"]).key()
    assert a.key() != make_cfg(tiny_clip, whisper_model="offline:base").key()
    assert a.key() != make_cfg(tiny_clip, clip_pretrained=tiny_clip["ckpt2"]).key()
    assert a.key() != make_cfg(tiny_clip, max_pixels=10).key()
    for bad in ({"audio_batch": 0}, {"labels": "cat"}, {"labels": ["ok", ""]}, {"max_audio_seconds": 0}):
        with pytest.raises(ValueError, match="DecodeConfig"):
            make_cfg(tiny_clip, **bad)
