"""Footage: generated videos (PyAV, in memory) decoded into timecoded segments, and audio of any length
transcribed window by window in bounded memory."""

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from corpus import encode_audio, tiny_clip_config
from PIL import Image

import streamtune  # noqa: F401
from streamtune import storage
from streamtune.decode import DecodeConfig, decode_shards, read_quarantine
from streamtune.decode.clip import ClipEmbedder, save_random_checkpoint
from streamtune.decode.features import Decoder
from streamtune.decode.media import MediaError, decode_audio, iter_audio_windows
from streamtune.decode.video import decode_video
from streamtune.demo.footage import Shot, make_video, speak
from streamtune.quarantine import Reason
from streamtune.shards import commit_index, read_index, read_shard_table, shard_name, write_shard

FPS = 10
SHOTS = [
    Shot(0.0, "red", "circle"),
    Shot(4.3, "blue", "square", (40, 40, 40)),
    Shot(9.1, "green", "triangle"),
]
LINES = [(0.5, "a red circle"), (4.8, "a blue square"), (9.4, "a green triangle")]
SECONDS = 12.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    config = tiny_clip_config(folder)
    return {
        "config": config,
        "ckpt": save_random_checkpoint(config, str(folder / "a.safetensors"), seed=0),
        "cache": str(folder / "cache"),
    }


def make_cfg(models, **kw) -> DecodeConfig:
    base = dict(
        whisper_model="offline:tiny.en",
        clip_model=models["config"],
        clip_pretrained=models["ckpt"],
        labels=["red", "blue", "green"],
        cache_dir=models["cache"],
        segment_seconds=5.0,
    )
    return DecodeConfig(**(base | kw))


DEMO_SEGMENT_SECONDS = 6.0


@pytest.fixture(scope="module")
def decoder(models):
    return Decoder(make_cfg(models))


@pytest.fixture(scope="module")
def footage():
    """One narrated clip per container, encoded once for the module."""
    return {fmt: make_video(SHOTS, SECONDS, LINES, fmt=fmt, fps=FPS) for fmt in ("mp4", "webm", "matroska")}


def raw_rows(rows: list[dict]) -> pa.Table:
    """A raw-shard table; `video` and `refs` columns as the shard stage writes them."""
    from streamtune.shards import RAW_SCHEMA

    schema = RAW_SCHEMA
    if "video" not in schema.names:
        schema = schema.append(pa.field("video", pa.binary()))
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


@pytest.mark.parametrize("fmt", ["mp4", "webm", "matroska"])
def test_segments_timecodes_and_narration(fmt, footage, decoder):
    data = footage[fmt]
    assert data[:4] == b"\x1a\x45\xdf\xa3" if fmt != "mp4" else data[4:8] == b"ftyp"
    # Whisper on CPU costs seconds per window: the narration is checked on AAC (MP4) and Opus (WebM)
    transcriber = decoder.transcriber if fmt != "matroska" else None
    result = decode_video(data, decoder.cfg, transcriber, decoder.clip)
    assert result.error is None and result.has_audio
    assert abs(result.duration - SECONDS) <= 1 / FPS
    segs = result.segments
    assert [s.index for s in segs] == list(range(len(segs))) and 2 <= len(segs) <= 4
    assert segs[0].t0 == 0.0 and all(a.t1 == b.t0 for a, b in zip(segs, segs[1:], strict=False))
    times = [t for s in segs for t in s.frame_times]
    assert times == sorted(times)
    # every keyframe_every seconds, and at each cut between shots, within one frame interval of the truth
    for truth in (0.0, 5.0, 10.0, 4.3, 9.1):
        assert min(abs(t - truth) for t in times) <= 1 / FPS + 1e-6, (truth, times)
    assert result.stats["scene_changes"] == 2
    # frames decoded: far fewer than all when only samples and the scene-change scans are needed is not
    # guaranteed with one keyframe per shot; at least no frame is decoded twice per sample
    assert result.stats["frames_decoded"] <= 3 * SECONDS * FPS
    for s in segs:
        assert len(s.thumbnails) == len(s.frame_times) == len(s.frame_embeddings)
        for jpeg in s.thumbnails:
            img = Image.open(io.BytesIO(jpeg))
            assert img.format == "JPEG" and img.width == decoder.cfg.thumbnail_width
        norms = np.linalg.norm(s.frame_embeddings, axis=1)
        assert np.allclose(norms, 1.0, atol=1e-4) and abs(np.linalg.norm(s.embedding) - 1) < 1e-4
        mean = s.frame_embeddings.mean(axis=0)
        assert np.allclose(s.embedding, mean / np.linalg.norm(mean), atol=1e-5)
        assert s.tags and s.tags[0][0] in ("red", "blue", "green")
    assert result.stats["audio_seconds"] == pytest.approx(SECONDS, abs=0.1)
    if transcriber is None:
        assert all(s.segments == [] for s in segs)
        return
    # the narration: each colour is heard in a speech segment around the second it was spoken
    speech = [x for s in segs for x in s.segments]
    assert all(segs[0].t0 <= x["start"] < segs[-1].t1 for x in speech)
    heard = 0
    for at, line in LINES:
        colour = line.split()[1]
        hits = [x for x in speech if colour in x["text"].lower()]
        heard += bool(hits)
        for x in hits:
            assert x["start"] - 1.5 <= at <= x["end"], (line, x)
    assert heard >= 2, speech
    for s in segs:  # speech is never split: each speech segment lies inside its video segment
        for x in s.segments:
            assert s.t0 <= x["start"] and x["end"] <= s.t1 + 0.5


def test_file_like_input_equals_bytes(footage, decoder):
    cfg = decoder.cfg
    a = decode_video(footage["matroska"], cfg, None, decoder.clip)
    b = decode_video(io.BytesIO(footage["matroska"]), cfg, None, decoder.clip)
    assert [(s.t0, s.t1, s.frame_times, s.thumbnails) for s in a.segments] == [
        (s.t0, s.t1, s.frame_times, s.thumbnails) for s in b.segments
    ]


def test_video_without_audio_gives_frame_only_segments(decoder):
    data = make_video(SHOTS, SECONDS, fmt="mp4", fps=FPS, audio=False)
    result = decode_video(data, decoder.cfg, decoder.transcriber, decoder.clip)
    assert not result.has_audio and result.error is None
    assert len(result.segments) == 3 and result.segments[-1].t1 == pytest.approx(SECONDS, abs=1 / FPS)
    assert all(s.transcript is None and s.segments == [] and s.frame_times for s in result.segments)


def test_truncated_video_keeps_segments_before_the_damage(footage, decoder):
    data = footage["matroska"]
    cut = data[: int(len(data) * 0.6)]
    result = decode_video(cut, decoder.cfg, None, decoder.clip)
    err = result.error
    assert err is not None and err.kind == Reason.VIDEO_TRUNCATED
    assert 3.0 < err.at < 0.8 * SECONDS and "s" in err.reason
    assert result.segments and result.segments[-1].t1 <= err.at + 1e-6
    assert all(t < err.at for s in result.segments for t in s.frame_times)
    with pytest.raises(MediaError) as bad:  # an MP4 cut before its index (moov at the end): nothing decodes
        mp4 = footage["mp4"]
        decode_video(mp4[: len(mp4) // 2], decoder.cfg)
    assert bad.value.kind == Reason.VIDEO_TRUNCATED and bad.value.at == 0.0
    with pytest.raises(MediaError) as bad:
        decode_video(b"not a video at all, just some text", decoder.cfg)
    assert bad.value.kind == Reason.UNSUPPORTED


def test_a_shard_with_nothing_decodable_gives_an_empty_feature_table(models):
    decoder = Decoder(make_cfg(models, transcribe=False))
    rows = [{"sample_id": "v/x", "video": b"not a video at all", "sources": ["v/x.mp4"]}]
    table, quarantine = decoder.decode_table(raw_rows(rows))
    assert table.num_rows == 0 and table.schema == decoder.schema()
    assert [q["error"] for q in quarantine] == [Reason.UNSUPPORTED.value]


def test_feature_rows_one_per_segment(footage, models):
    decoder = Decoder(make_cfg(models, transcribe=False))  # transcripts: test above
    meta = json.dumps({"speaker": "ana"})
    wav = encode_audio(speak("hello world"), 16000, "wav", "pcm_s16le")
    rows = [
        {
            "sample_id": "v/a",
            "video": footage["mp4"],
            "meta": meta,
            "sources": ["v/a.mp4", "v/metadata.jsonl"],
        },
        {"sample_id": "v/b", "video": footage["webm"], "sources": ["v/b.wav"]},  # wrong extension
        {"sample_id": "v/c", "video": wav, "sources": ["v/c.mp4"]},  # audio in a video's clothes
        {"sample_id": "s/d", "audio": wav, "sources": ["s/d.wav"]},
    ]
    table, quarantine = decoder.decode_table(raw_rows(rows))
    by_id: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by_id.setdefault(r["sample_id"], []).append(r)
    assert set(by_id) == {"v/a", "v/b", "s/d"}
    assert [q["error"] for q in quarantine] == ["wrong_content"] and quarantine[0]["key"] == "v/c.mp4"
    for sid in ("v/a", "v/b"):
        segs = by_id[sid]
        assert [r["segment_index"] for r in segs] == list(range(len(segs))) and len(segs) >= 2
        assert segs[0]["t0"] == 0 and abs(segs[-1]["t1"] - SECONDS) < 1
        for r in segs:
            emb = np.asarray(r["clip_embedding"])
            assert abs(np.linalg.norm(emb) - 1) < 1e-4 and r["tags"]
            assert len(r["frame_times"]) == len(r["frame_embeddings"]) == len(r["thumbnails"]) >= 1
            assert r["transcript"] is None and r["audio_seconds"] == pytest.approx(r["t1"] - r["t0"])
    assert all(r["meta"] == meta and r["sources"][0] == "v/a.mp4" for r in by_id["v/a"])
    plain = by_id["s/d"][0]
    for col in ("segment_index", "t0", "t1", "frame_times", "frame_embeddings", "thumbnails"):
        assert plain[col] is None
    assert plain["audio_seconds"] > 0.5 and plain["clip_embedding"] is None


def test_short_audio_is_decoded_whole_as_before(decoder):
    wav = encode_audio(speak("hello world"), 16000, "wav", "pcm_s16le")
    st: dict = {}
    windows = list(iter_audio_windows(wav, 0.5, stats=st))
    assert np.array_equal(np.concatenate([w for _, w in windows]), decode_audio(wav))
    assert [t for t, _ in windows] == [i * 0.5 for i in range(len(windows))]
    assert st["peak_pcm_bytes"] < 0.5 * 16000 * 4 + 16000 * 4  # a window plus one decoded frame


def test_decompression_bomb_ratio():
    silence = encode_audio(np.zeros(16000 * 20, np.float32), 16000, "flac", "flac")
    with pytest.raises(MediaError) as err:
        list(iter_audio_windows(silence, 1.0, max_ratio=10, min_bomb_bytes=0))
    assert err.value.kind == Reason.BOMB
    assert len(list(iter_audio_windows(silence, 1.0, max_ratio=10_000, min_bomb_bytes=0))) == 20


def long_recording(seconds: float, words: list[tuple[float, str]]) -> bytes:
    """A quiet hum with a few spoken phrases at known offsets, as 8 kHz 16-bit WAV (cheap to decode)."""
    rate = 8000
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.002 * np.sin(2 * np.pi * 120 * t)).astype(np.float32)
    for at, text in words:
        voice = speak(text)[::2]  # 16 kHz -> 8 kHz
        i = int(at * rate)
        pcm[i : i + voice.size] += voice
    return encode_audio(pcm, rate, "wav", "pcm_s16le")


def test_long_audio_streams_in_bounded_memory(models):
    seconds = 720.0
    wav = long_recording(seconds, [])
    decoder = Decoder(make_cfg(models, audio_window_seconds=60.0, transcribe=False))
    rows = [{"sample_id": "long", "audio": wav, "sources": ["l.wav"]}]
    table, quarantine = decoder.decode_table(raw_rows(rows))
    assert quarantine == [] and table.num_rows == 1  # over an hour used to be refused (too_long)
    assert table.to_pylist()[0]["audio_seconds"] == pytest.approx(seconds, abs=0.1)
    assert decoder.stats["streamed_audio"] == 1
    # the whole track as PCM is 46 MB; windows of 60 s (3.8 MB) are held, two at most
    assert 0 < decoder.peak_pcm_bytes <= 2 * 60 * 16000 * 4 + 16000 * 4


def transcribe_long(models, seconds: float, words: list[tuple[float, str]], window: float) -> None:
    wav = long_recording(seconds, words)
    decoder = Decoder(make_cfg(models, audio_window_seconds=window))
    rows = [{"sample_id": "long", "audio": wav, "sources": ["l.wav"]}]
    table, quarantine = decoder.decode_table(raw_rows(rows))
    assert quarantine == [] and table.num_rows == 1 and decoder.stats["streamed_audio"] == 1
    row = table.to_pylist()[0]
    assert row["audio_seconds"] == pytest.approx(seconds, abs=0.1)
    assert 0 < decoder.peak_pcm_bytes <= 2 * window * 16000 * 4 + 16000 * 4
    segments = json.loads(row["segments"])
    for at, text in words:  # each phrase heard at its absolute time, across window boundaries
        word = text.split()[0]
        hits = [s for s in segments if word in s["text"].lower()]
        assert hits, (text, segments)
        assert any(s["start"] - 2 <= at <= s["end"] + 1 for s in hits), (text, hits)


def test_long_audio_is_transcribed_by_windows(models):
    # Whisper tiny costs ~7 s per 30 s window on the shared CPU: a minute here, ten behind the slow marker
    transcribe_long(models, 62.0, [(4.0, "hello world"), (27.0, "good morning"), (50.0, "thank you")], 20.0)


@pytest.mark.heavy  # 10 min of speech through Whisper: a minute idle
def test_ten_minutes_are_transcribed_by_windows(models):
    words = [(30.0, "hello world"), (301.0, "good morning"), (575.0, "thank you")]
    transcribe_long(models, 600.0, words, 60.0)


def test_every_segment_once_after_a_failed_and_retried_decode(tmp_path, models, footage):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "features")
    silent = make_video(SHOTS[:2], 8.0, fmt="mp4", fps=FPS, audio=False)
    tables = [
        raw_rows([{"sample_id": "a", "video": footage["mp4"], "sources": ["a.mp4"]}]),
        raw_rows(
            [{"sample_id": "b", "video": silent, "sources": ["b.mp4"]}, {"sample_id": "c", "text": "hi"}]
        ),
        raw_rows([{"sample_id": "d", "video": footage["webm"], "sources": ["d.webm"]}]),
    ]
    entries = [write_shard(t, storage.join(raw, shard_name(i))) for i, t in enumerate(tables)]
    commit_index(raw, entries, tables[0].schema)
    cfg = make_cfg(models, whisper_model="offline:tiny.en", transcribe=False)
    blocker = tmp_path / "features" / shard_name(1)
    blocker.mkdir(parents=True)  # a storage fault for one shard, mid-decode
    with pytest.raises(OSError):
        decode_shards(raw, out, cfg)
    shutil.rmtree(blocker)
    decode_shards(raw, out, cfg)
    index = read_index(out)
    keys = []
    for entry in index["shards"]:
        t = read_shard_table(out, entry)
        keys += [
            (s, i) for s, i in zip(t["sample_id"].to_pylist(), t["segment_index"].to_pylist(), strict=True)
        ]
    videos = [k for k in keys if k[1] is not None]
    assert len(videos) == len(set(videos))
    per = {s: sorted(i for v, i in videos if v == s) for s in "abd"}
    assert all(per[s] == list(range(len(per[s]))) and per[s] for s in "abd"), per
    assert ("c", None) in keys and len(keys) == len(videos) + 1
    # stats count this run's work: the retry decoded shards 1 and 2 (shard 0 was done before the fault)
    assert index["stats"]["videos"] == 2 and index["stats"]["skipped_shards"] == 1
    assert index["stats"]["frames_sampled"] > 0 and len(read_quarantine(out)) == 0


def test_clip_batches_give_the_same_frames(footage, models):
    cfg = make_cfg(models)
    one = ClipEmbedder(cfg.clip_model, cfg.clip_pretrained, cfg.labels, batch_size=1)
    many = ClipEmbedder(cfg.clip_model, cfg.clip_pretrained, cfg.labels, batch_size=16)
    a = decode_video(footage["mp4"], cfg, None, one)
    b = decode_video(footage["mp4"], cfg, None, many)
    for x, y in zip(a.segments, b.segments, strict=True):
        assert np.allclose(x.frame_embeddings, y.frame_embeddings, atol=1e-5)


@pytest.mark.heavy  # ~160 s here: two pipeline runs, one in a fresh process (the fast twin is above)
def test_pipeline_run_failing_mid_decode_then_retried_keeps_every_segment_once(tmp_path, models, monkeypatch):
    import subprocess
    import sys

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import PipelineParams, pipeline
    from streamtune.demo.data import generate_demo_source

    monkeypatch.setenv("STREAMTUNE_RETRY_DELAY_S", "0")
    src, work = tmp_path / "src", tmp_path / "work"
    generate_demo_source(str(src), n=1, broken=False, videos=2)  # one picture + speech sample, two videos
    decode = make_cfg(models, transcribe=False, segment_seconds=DEMO_SEGMENT_SECONDS).model_dump()
    params = PipelineParams(
        source_url=str(src), work_url=str(work), shard={"max_shard_bytes": 1}, skip=["train"], decode=decode
    )
    blocker = work / "features" / shard_name(1)
    blocker.mkdir(parents=True)  # a storage fault while writing one feature shard
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    shutil.rmtree(blocker)
    run_id = state.state_details.flow_run_id
    retried = subprocess.run(
        [sys.executable, "-m", "app", "retry", str(run_id)], capture_output=True, text=True, timeout=600
    )
    assert retried.returncode == 0, retried.stderr[-3000:]

    index = read_index(str(work / "features"))
    keys = []
    for entry in index["shards"]:
        t = read_shard_table(str(work / "features"), entry)
        keys += list(zip(t["sample_id"].to_pylist(), t["segment_index"].to_pylist(), strict=True))
    videos = [k for k in keys if k[1] is not None]
    assert len(videos) == len(set(videos)) == 6, keys  # two 15 s videos, segments of ~6 s: 0-6, 6-12, 12-15
    assert {s for s, _ in videos} == {"clips/v00", "clips/v01"} and ("clips/s00", None) in keys
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["decode-stats"]))
        )
    assert any("video segments" in (a.data or "") for a in arts)


def test_open_clip_imports_without_torch_dynamo():
    # torchvision's and timm's package __init__s would import torch._dynamo + sympy (~160 MB resident)
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from streamtune.decode.clip import embed_dim\n"
        "print(embed_dim('ViT-B-32'), sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
        "import torchvision\n"
        "print(torchvision.__version__ != '', callable(torchvision.models.resnet18))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["512 []", "True True"]
