"""Footage storage: video sniffing, large objects as references, ranged reads pinned to a version."""

import io
import json

import av
import pytest

from streamtune import shards, storage
from streamtune.ingest import REF_BYTES, commit_raw_shards, plan_shards, write_raw_shard
from streamtune.manifest import build_manifest
from streamtune.sniff import detect_modality, sniff
from streamtune.stream.remote_file import ObjectChanged, open_ref
from streamtune.testing.footage import encode_clip, write_long_video

INLINE = 100_000


@pytest.fixture(scope="module")
def clips():
    return {
        "mp4": encode_clip("mp4", "libx264", "aac"),
        "webm": encode_clip("webm", "libvpx-vp9", "libopus"),
        "mkv": encode_clip("matroska", "libx264", "aac"),
        "webm_audio": encode_clip("webm", None, "libopus"),
        "m4a": encode_clip("ipod", None, "aac"),
        "mp4_audio": encode_clip("mp4", None, "aac", seconds=20),  # brand isom, index after the media
        "mp4_silent": encode_clip("mp4", "libx264", None),
    }


@pytest.fixture(scope="module")
def long_video():
    buf = io.BytesIO()
    write_long_video(buf, seconds=60, width=320, height=240, fps=25, video_bit_rate=1_000_000)
    return buf.getvalue()


def test_sniff_tells_video_from_audio_by_content(clips):
    for name in ("mp4", "webm", "mkv", "mp4_silent"):
        assert sniff(clips[name]) == "video", name
    for name in ("webm_audio", "m4a", "mp4_audio"):
        assert sniff(clips[name]) == "audio", name
    assert detect_modality("a/x.wav", clips["mp4"][:8192]) == ("video", "content")  # wrong extension
    assert detect_modality("a/x.mp3", clips["webm"][:8192]) == ("video", "content")
    assert detect_modality("a/x.webm", clips["webm_audio"][:8192]) == ("audio", "content")


def test_manifest_detects_footage_and_attaches_sidecars(clips, bucket, s3opts):
    source = f"{bucket}/raw"
    files = {
        "talks/t1.mp4": clips["mp4"],
        "talks/t2.webm": clips["webm"],
        "talks/t3.mkv": clips["mkv"],
        "talks/t4.wav": clips["mp4"],  # a video under an audio name
        "voices/v1.webm": clips["webm_audio"],
        "voices/v2.m4a": clips["m4a"],
        "voices/v3.bin": clips["mp4_audio"],  # index beyond the head: the manifest reads where it starts
        "talks/metadata.jsonl": json.dumps({"file_name": "t1.mp4", "speaker": "ada"}).encode() + b"\n",
    }
    for key, data in files.items():
        storage.write_bytes(f"{source}/{key}", data, s3opts)
    table, problems = build_manifest(source, s3opts)
    assert not problems
    rows = {r["key"]: r for r in table.to_pylist()}
    kinds = {k: rows[k]["modality"] for k in files if k in rows}
    assert kinds == {
        "talks/t1.mp4": "video",
        "talks/t2.webm": "video",
        "talks/t3.mkv": "video",
        "talks/t4.wav": "video",
        "voices/v1.webm": "audio",
        "voices/v2.m4a": "audio",
        "voices/v3.bin": "audio",
        "talks/metadata.jsonl": "sidecar",
    }
    assert rows["talks/t4.wav"]["detected_by"] == "content"
    assert json.loads(rows["talks/t1.mp4"]["sidecar"]) == {"speaker": "ada"}


def _shard(source, out, so, inline_max_bytes=INLINE):
    table, problems = build_manifest(source, so)
    plans = plan_shards(table, max_shard_bytes=1 << 20, inline_max_bytes=inline_max_bytes)
    results = [write_raw_shard(source, table, p, out, source_options=so, out_options=so) for p in plans]
    index = commit_raw_shards(out, results, so, problems=problems)
    rows = [r for e in index["shards"] for r in shards.read_shard_table(out, e, so).to_pylist()]
    return table, plans, index, {r["sample_id"]: r for r in rows}


def test_large_video_is_referenced_and_read_by_range(clips, long_video, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    storage.write_bytes(f"{source}/talks/long.mp4", long_video, s3opts)
    storage.write_bytes(f"{source}/talks/short.mp4", clips["mp4"], s3opts)
    storage.write_bytes(f"{source}/talks/long.txt", b"a long talk", s3opts)
    table, plans, index, rows = _shard(source, out, s3opts)
    etag = {r["key"]: r["etag"] for r in table.to_pylist()}

    assert len(plans) == 1 and plans[0]["bytes"] == REF_BYTES + len(clips["mp4"]) + len(b"a long talk")
    assert index["bytes"] < len(long_video) / 10  # the object was not copied
    long, short = rows["talks/long"], rows["talks/short"]
    assert long["video"] is None and long["text"] == "a long talk"
    assert long["refs"] == [
        {
            "modality": "video",
            "key": "talks/long.mp4",
            "url": f"{source}/talks/long.mp4",
            "version": etag["talks/long.mp4"],
            "size": len(long_video),
        }
    ]
    assert short["video"] == clips["mp4"] and short["refs"] is None
    assert sorted(long["sources"]) == ["talks/long.mp4", "talks/long.txt"]

    # the first two seconds and one keyframe half-way: a few ranges, far from the whole object
    f = open_ref(long["refs"][0], s3opts, block_bytes=256 << 10)
    with av.open(f) as container:
        stream = container.streams.video[0]
        times = []
        for frame in container.decode(stream):
            times.append(frame.time)
            if frame.time >= 2.0:
                break
        container.seek(int(30 / stream.time_base), stream=stream)
        middle = next(container.decode(stream))
    assert times[0] == 0.0 and 29.0 <= middle.time <= 31.0
    assert middle.to_ndarray(format="rgb24").shape == (240, 320, 3)
    assert 0 < f.bytes_fetched < len(long_video) / 4
    assert f.requests >= 2 and f.bytes_fetched / f.requests <= 256 << 10  # no GET reads the whole object
    f.verify()
    f.close()


def test_a_replaced_object_is_caught_not_mixed(long_video, clips, bucket, s3opts):
    source, out = f"{bucket}/raw", f"{bucket}/shards"
    url = f"{source}/talks/long.mp4"
    storage.write_bytes(url, long_video, s3opts)
    _, _, _, rows = _shard(source, out, s3opts)
    ref = rows["talks/long"]["refs"][0]

    f = open_ref(ref, s3opts, block_bytes=256 << 10)
    assert f.read(12)[4:8] == b"ftyp"
    storage.write_bytes(url, long_video[:-1000] + b"\0" * 1000, s3opts)  # same size, other bytes
    with pytest.raises(ObjectChanged, match="talks/long.mp4"):
        f.verify()
    f.close()
    with pytest.raises(ObjectChanged, match=f"{url}"):
        open_ref(ref, s3opts)
    storage.write_bytes(url, clips["mp4"], s3opts)  # another size
    with pytest.raises(ObjectChanged, match="bytes"):
        open_ref({**ref, "version": None}, s3opts)


def test_remote_file_is_a_seekable_binary_file(long_video, bucket, s3opts):
    url = f"{bucket}/v.mp4"
    storage.write_bytes(url, long_video, s3opts)
    from streamtune.stream.remote_file import object_version

    version, size = object_version(url, s3opts)
    f = open_ref(
        {"url": url, "version": version, "size": size}, s3opts, block_bytes=64 << 10, read_ahead=False
    )
    assert f.seekable() and f.readable() and f.size == len(long_video)
    assert f.seek(-100, io.SEEK_END) == len(long_video) - 100
    assert f.read() == long_video[-100:] and f.read(10) == b""
    f.seek(100_000)
    buf = bytearray(200_000)
    assert f.readinto(buf) == 200_000 and bytes(buf) == long_video[100_000:300_000]
    assert f.tell() == 300_000
    f.seek(100_000)  # still cached: no new GET
    before = f.requests
    assert f.read(1000) == long_video[100_000:101_000] and f.requests == before
    f.close()
    with pytest.raises(ValueError):
        f.read(1)


@pytest.fixture(scope="module")
def decode_cfg(tmp_path_factory):
    from corpus import tiny_clip_config

    from streamtune.decode import DecodeConfig
    from streamtune.decode.clip import save_random_checkpoint

    folder = tmp_path_factory.mktemp("models")
    config = tiny_clip_config(folder)
    return DecodeConfig(
        clip_model=config,
        clip_pretrained=save_random_checkpoint(config, str(folder / "a.safetensors"), seed=0),
        labels=["square", "circle"],
        cache_dir=str(folder / "cache"),
        transcribe=False,
        keyframe_every=20.0,
        scene_threshold=1.0,
    )


@pytest.fixture(scope="module")
def silent_video():
    buf = io.BytesIO()
    write_long_video(buf, seconds=60, width=320, height=240, fps=25, video_bit_rate=1_000_000, audio=False)
    return buf.getvalue()


def test_decode_reads_a_referenced_video_by_range(silent_video, decode_cfg, bucket, s3opts, monkeypatch):
    from streamtune.decode import decode_shard
    from streamtune.stream import remote_file

    source, out = f"{bucket}/raw", f"{bucket}/shards"
    storage.write_bytes(f"{source}/talks/long.mp4", silent_video, s3opts)
    storage.write_bytes(f"{source}/talks/long.txt", b"a long talk", s3opts)
    _, _, index, rows = _shard(source, out, s3opts)
    assert rows["talks/long"]["refs"][0]["size"] == len(silent_video)

    monkeypatch.setattr(remote_file, "BLOCK_BYTES", 256 << 10)
    remote_file.totals(reset=True)
    result = decode_shard(out, index["shards"][0], f"{bucket}/features", decode_cfg, s3opts)
    got = remote_file.totals()
    assert result["quarantine"] == [] and result["stats"]["videos"] == 1
    features = shards.read_shard_table(f"{bucket}/features", result["entry"], s3opts).to_pylist()
    assert [(r["sample_id"], r["segment_index"]) for r in features] == [("talks/long", 0), ("talks/long", 1)]
    assert features[0]["t0"] == 0.0 and features[-1]["t1"] == pytest.approx(60.0, abs=0.1)
    assert features[0]["text"] == "a long talk" and features[0]["sources"] == [
        "talks/long.mp4",
        "talks/long.txt",
    ]
    # keyframes every 20 s of a minute: a sixth of the object, in block-sized GETs
    assert got["files"] == 1 and got["bytes"] < len(silent_video) / 3
    assert got["requests"] >= 3 and got["largest_request"] <= 256 << 10


def test_an_object_replaced_before_decode_is_quarantined(silent_video, clips, decode_cfg, bucket, s3opts):
    from streamtune.decode import decode_shard

    source, out = f"{bucket}/raw", f"{bucket}/shards"
    url = f"{source}/talks/long.mp4"
    storage.write_bytes(url, silent_video, s3opts)
    storage.write_bytes(f"{source}/talks/short.mp4", clips["mp4_silent"], s3opts)
    _, _, index, _ = _shard(source, out, s3opts)
    storage.write_bytes(url, silent_video[: len(silent_video) // 2], s3opts)  # replaced at the source

    result = decode_shard(out, index["shards"][0], f"{bucket}/features", decode_cfg, s3opts)
    (record,) = result["quarantine"]
    assert record["error"] == "source_changed" and record["sample_id"] == "talks/long"
    assert record["key"] == "talks/long.mp4" and url in record["message"]
    features = shards.read_shard_table(f"{bucket}/features", result["entry"], s3opts).to_pylist()
    assert {r["sample_id"] for r in features} == {"talks/short"}  # nothing of the changed object


def test_decode_reads_raw_shards_written_before_references(decode_cfg, bucket, s3opts):
    import pyarrow as pa

    from streamtune.decode import decode_shards

    raw, out = f"{bucket}/raw-old", f"{bucket}/features"
    old_schema = pa.schema([f for f in shards.RAW_SCHEMA if f.name not in ("video", "refs")])
    rows = [{"sample_id": f"s{i}", "text": f"caption {i}", "sources": [f"s{i}.txt"]} for i in range(40)]
    table = pa.Table.from_pylist(rows, schema=old_schema)
    entry = shards.write_shard(table, f"{raw}/shard-00000.arrow", s3opts, batch_bytes=200)
    shards.commit_index(raw, [entry], old_schema, s3opts)
    assert len(entry["batches"]) > 3
    index = decode_shards(raw, out, decode_cfg, s3opts)
    got = [r for e in index["shards"] for r in shards.read_shard_table(out, e, s3opts).to_pylist()]
    assert [r["text"] for r in got] == [f"caption {i}" for i in range(40)]


def test_a_set_appended_to_an_older_one_streams_both(tmp_path):
    import pyarrow as pa

    from streamtune import CloudStreamingDataset

    raw = str(tmp_path / "raw")
    old_schema = pa.schema([f for f in shards.RAW_SCHEMA if f.name not in ("video", "refs")])
    old = pa.Table.from_pylist(
        [{"sample_id": "a", "audio": b"RIFF", "sources": ["a.wav"]}], schema=old_schema
    )
    ref = {"modality": "video", "key": "b.mp4", "url": "s3://x/b.mp4", "version": "e", "size": 1 << 30}
    new = pa.Table.from_pylist(
        [{"sample_id": "b", "sources": ["b.mp4"], "refs": [ref]}], schema=shards.RAW_SCHEMA
    )
    entries = [shards.write_shard(t, f"{raw}/{shards.shard_name(i)}") for i, t in enumerate([old, new])]
    shards.commit_index(raw, entries, shards.RAW_SCHEMA)  # what an incremental run commits
    rows = list(CloudStreamingDataset(raw))
    assert [(r["sample_id"], r["audio"], r["refs"]) for r in rows] == [
        ("a", b"RIFF", None),
        ("b", None, [ref]),
    ]


def test_records_name_videos_and_a_video_sample_reports_its_other_media(
    silent_video, decode_cfg, bucket, s3opts
):
    """A record's `video` path becomes a reference (read by range at decode, like a large video file); a
    path leaving the source is `media_ref`. A video sample with a separate image decodes the video and
    says that the image was not decoded (`extra_media`) instead of dropping it silently."""
    from PIL import Image

    from streamtune.decode import decode_shard

    source, out = f"{bucket}/raw", f"{bucket}/shards"
    storage.write_bytes(f"{source}/data/clips/long.mp4", silent_video, s3opts)
    lines = [{"text": "talk one", "video": "clips/long.mp4"}, {"text": "talk two", "video": "../../x.mp4"}]
    storage.write_bytes(f"{source}/data/talks.jsonl", "\n".join(map(json.dumps, lines)).encode(), s3opts)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, format="JPEG")
    storage.write_bytes(f"{source}/folder/talk.mp4", silent_video, s3opts)
    storage.write_bytes(f"{source}/folder/talk.jpg", jpeg.getvalue(), s3opts)
    table, problems = build_manifest(source, s3opts)
    plans = plan_shards(table, max_shard_bytes=1 << 20, inline_max_bytes=len(silent_video) + 1)
    results = [
        write_raw_shard(source, table, p, out, source_options=s3opts, out_options=s3opts) for p in plans
    ]
    problems += [q for r in results for q in r["quarantine"]]
    index = commit_raw_shards(out, results, s3opts, problems=problems)
    rows = {
        r["sample_id"]: r
        for e in index["shards"]
        for r in shards.read_shard_table(out, e, s3opts).to_pylist()
    }

    one, two = rows["data/talks.jsonl#0"], rows["data/talks.jsonl#1"]
    (ref,) = one["refs"]
    assert one["video"] is None and one["text"] == "talk one" and "video" not in json.loads(one["meta"])
    assert ref["modality"] == "video" and ref["key"] == "data/clips/long.mp4"
    assert ref["url"].endswith(f"{bucket.split('://')[-1]}/raw/data/clips/long.mp4") and ref["size"] == len(
        silent_video
    )
    assert two["refs"] is None and two["video"] is None and two["text"] == "talk two"
    assert [(q["key"], q["error"]) for q in problems] == [("data/talks.jsonl#1", "media_ref")]
    assert rows["folder/talk"]["video"] is not None and rows["folder/talk"]["image"] is not None

    cfg = decode_cfg.model_copy(update={"keyframe_every": 30.0})
    results = [decode_shard(out, e, f"{bucket}/features", cfg, s3opts) for e in index["shards"]]
    quarantine = [(q["sample_id"], q["key"], q["error"]) for r in results for q in r["quarantine"]]
    assert quarantine == [("folder/talk", "folder/talk.jpg", "extra_media")]
    features = [
        r
        for res in results
        for r in shards.read_shard_table(f"{bucket}/features", res["entry"], s3opts).to_pylist()
    ]
    segments = {}
    for r in features:
        if r["segment_index"] is not None:
            segments.setdefault(r["sample_id"], []).append((r["t0"], r["t1"]))
    # the video file is a sample too
    assert sorted(segments) == ["data/clips/long", "data/talks.jsonl#0", "folder/talk"]
    assert all(s[-1][1] == pytest.approx(60.0, abs=0.1) for s in segments.values())
    assert [r["text"] for r in features if r["sample_id"] == "data/talks.jsonl#1"] == ["talk two"]


def test_a_referenced_video_with_sound_is_read_once(long_video, decode_cfg, bucket, s3opts):
    """Audio and frames come from one demux pass: about the object's size is fetched, not the interleaved
    audio's whole file plus the keyframes again (two passes fetched 1.06-1.47 x). The decoder's CLIP has
    released its text tower once its labels were embedded."""
    from streamtune.decode import Decoder, decode_shard
    from streamtune.stream import remote_file

    source, out = f"{bucket}/raw", f"{bucket}/shards"
    storage.write_bytes(f"{source}/talks/long.mp4", long_video, s3opts)
    _, _, index, rows = _shard(source, out, s3opts)
    assert rows["talks/long"]["refs"][0]["size"] == len(long_video)
    cfg = decode_cfg.model_copy(update={"keyframe_every": 5.0})
    decoder = Decoder(cfg)
    remote_file.totals(reset=True)
    result = decode_shard(out, index["shards"][0], f"{bucket}/features", cfg, s3opts, decoder=decoder)
    got = remote_file.totals()
    assert result["quarantine"] == [] and result["stats"]["frames_sampled"] >= 12
    assert got["files"] == 1 and got["bytes"] <= 1.02 * len(long_video), got
    assert decoder.clip.text_released and decoder.clip.tag(decoder.clip.label_embeddings()[:1], 1)[0]
    with pytest.raises(RuntimeError):
        decoder.clip.embed_text(["a square"])
