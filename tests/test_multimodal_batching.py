"""Online media encoded in windows: batched image-tower and masked Whisper batches give each medium the
tokens it gets alone (float tolerance); OnlineSource hands out the per-sample path's media, quarantine
records and order, and a resume in the middle of a window re-encodes that window to the same bits; worker
processes prepare the same media as threads."""

import numpy as np
import pytest
from corpus import image_bytes, speech, tiny_clip_config

import streamtune  # noqa: F401
from streamtune.config import DecodeConfig
from streamtune.decode.clip import save_random_checkpoint
from streamtune.train.data import ListSource
from streamtune.train.mm_train import ENCODED, MultimodalRun, Quarantined
from streamtune.train.models import load_base
from streamtune.train.synthetic import write_random_model
from streamtune.train.trainer import TrainArgs


def drawing(i: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48 + 8 * i, 64), (250, 250, 250))
    ImageDraw.Draw(img).ellipse([8, 8, 40, 56], fill=(40 * i % 255, 90, 200))
    return image_bytes(img, "PNG")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching")
    clip = tiny_clip_config(folder)
    ckpt = save_random_checkpoint(clip, str(folder / "clip.safetensors"), seed=0)
    model, tokenizer, _ = load_base(write_random_model(str(folder / "tiny"), "tiny", seed=3))
    media = DecodeConfig(clip_model=clip, clip_pretrained=ckpt, media_tokens=["image", "audio"])
    args = TrainArgs(model="x", stage="align", media_source="online", seed=4, media_batch=3)
    spec = {"image": {"dim": 64}, "audio": {"dim": 1920}}
    return MultimodalRun(args, model, tokenizer, spec, media)


@pytest.fixture(scope="module")
def rows():
    voices = [speech("a red one"), speech("a big blue square")]
    out = []
    for i in range(7):
        out.append(
            {
                "sample_id": f"s{i}",
                "image": drawing(i) if i != 3 else None,
                "audio": voices[i % 2] if i % 3 else None,
                "text": f"answer {i}",
                "sources": [f"s{i}.png", f"s{i}.wav"],
            }
        )
    out[4]["image"] = b"\x89PNG\r\n\x1a\n not a picture"
    return out


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(
        a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3
    )


def test_batched_towers_equal_one_medium_at_a_time(run):
    from PIL import Image

    enc = run.encoders()
    pictures = [Image.new("RGB", (40 + 9 * i, 50), (30 * i, 120, 200)) for i in range(5)]
    images = [enc["image"].clip.prepare(p) for p in pictures]
    alone = [enc["image"].encode([t])[1][0] for t in images]
    batched = enc["image"].encode_tokens(images, batch_size=4)
    assert all(close(a, b) for a, b in zip(alone, batched, strict=True))
    from streamtune.decode.tokens import image_pixels

    pixels = [image_pixels(p, enc["image"].pixel_options()) for p in pictures]
    assert all(close(a, b) for a, b in zip(alone, enc["image"].encode_tokens(pixels), strict=True))
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 23456, 3000, 100)]
    alone = [enc["audio"].encode(c) for c in clips]
    batched = enc["audio"].encode_batch(clips, batch_size=4)
    assert all(close(a, b) for a, b in zip(alone, batched, strict=True))


def _drain(source, count=None) -> list[dict]:
    out = []
    for row in source:
        out.append(row)
        if count is not None and len(out) == count:
            break
    return out


def test_online_source_matches_per_sample_media_and_resumes_mid_window(run, rows):
    source = run.source(ListSource(rows, shuffle=True, seed=1))
    full = _drain(source)
    assert [r["sample_id"] for r in full] == [r["sample_id"] for r in ListSource(rows, shuffle=True, seed=1)]
    for row in full:
        plain = {k: v for k, v in row.items() if k != ENCODED}
        try:
            alone = run.media_of(plain, 0, augment=True)
        except Quarantined as q:
            with pytest.raises(Quarantined) as got:
                run.media_of(row, 0, augment=True)
            assert got.value.record == q.record and row["sample_id"] == "s4"
            continue
        got = run.media_of(row, 0, augment=True)
        assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in alone.items()}
        assert all(close(a, b) for k in got for a, b in zip(alone[k], got[k], strict=True))

    # stop after 4 rows (window of 3: one row into the second window), resume in a fresh source
    first = run.source(ListSource(rows, shuffle=True, seed=1))
    head = _drain(first, 4)
    state = first.state_dict()
    assert state["skip"] == 1
    second = run.source(ListSource(rows, shuffle=True, seed=1))
    second.load_state_dict(state)
    tail = _drain(second)
    assert [r["sample_id"] for r in head + tail] == [r["sample_id"] for r in full]
    for a, b in zip(full, head + tail, strict=True):
        ma, mb = a[ENCODED][2], b[ENCODED][2]
        if isinstance(ma, Quarantined):
            assert ma.record == mb.record
            continue
        assert all(np.array_equal(x, y) for k in ma for x, y in zip(ma[k], mb[k], strict=True))


def test_worker_processes_prepare_what_threads_prepare(run, rows):
    threads = _drain(run.source(ListSource(rows)))
    run.args.media_workers = 2
    try:
        processes = _drain(run.source(ListSource(rows)))
    finally:
        run.args.media_workers = 0
    for a, b in zip(threads, processes, strict=True):
        ma, mb = a[ENCODED][2], b[ENCODED][2]
        if isinstance(ma, Quarantined):
            assert ma.record == mb.record
            continue
        assert all(np.array_equal(x, y) for k in ma for x, y in zip(ma[k], mb[k], strict=True))


def test_next_epoch_begun_ahead_gives_that_epochs_windows(run, rows):
    source = run.source(ListSource(rows, shuffle=True, seed=2))
    _drain(source)
    assert source.next_feed is not None and source.next_feed["epoch"] == 1
    source.set_epoch(1)
    state = source.state_dict()
    ahead = _drain(source)
    fresh = run.source(ListSource(rows, shuffle=True, seed=2))
    fresh.set_epoch(1)
    again = run.source(ListSource(rows, shuffle=True, seed=2))
    again.set_epoch(1)  # as SampleStream.load_state_dict does
    again.load_state_dict(state)
    for other in (_drain(fresh), _drain(again)):
        assert [r["sample_id"] for r in other] == [r["sample_id"] for r in ahead]
        for a, b in zip(ahead, other, strict=True):
            ma, mb = a[ENCODED], b[ENCODED]
            assert ma[:2] == mb[:2] == (1, True)
            if isinstance(ma[2], Quarantined):
                assert ma[2].record == mb[2].record
                continue
            assert all(np.array_equal(x, y) for k in ma[2] for x, y in zip(ma[2][k], mb[2][k], strict=True))
