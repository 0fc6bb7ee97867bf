"""Online multimodal training: raw media stream in, frozen encoders (tiny CLIP, Whisper tiny.en) run in
the data path with seeded augmentation. Kill -9 and resume gives the uninterrupted run's adapter and
projector bit for bit; an undecodable medium is quarantined and skipped the same way every time; the
same (seed, epoch, sample id) is augmented the same way in any process."""

import hashlib
import json
import os
import random
import subprocess
import sys

import mlx.core as mx  # noqa: I001
import numpy as np
import pyarrow as pa
import pytest
from corpus import image_bytes, speech, tiny_clip_config
from helpers import kill_at_step

import streamtune  # noqa: F401
from streamtune import storage
from streamtune.decode.clip import save_random_checkpoint
from streamtune.shards import RAW_SCHEMA, commit_index, shard_name, write_shard
from streamtune.train import checkpoint
from streamtune.train.synthetic import write_random_model

WORKER = r"""
import json, sys, time
import streamtune
from streamtune import CloudStreamingDataset
from streamtune.config import DecodeConfig
from streamtune.train.data import Template
from streamtune.train.trainer import TrainArgs, train

cfg = json.loads(sys.argv[1])
data = CloudStreamingDataset(cfg["raw"], cfg["so"], shuffle=True, seed=5)
media = DecodeConfig(clip_model=cfg["clip"], clip_pretrained=cfg["ckpt"], media_tokens=["image", "audio"],
                     audio_factor=5)
args = TrainArgs(model=cfg["model"], adapter_path=cfg["adapter"], stage="instruct", media_source="online",
                 template=Template(prompt="{image}\n{audio}\nWhat is it?", completion="{text}"),
                 iters=6, batch_size=2, seq_len=128, lr=1e-3, projector_lr=2e-3, warmup=2, dropout=0.1,
                 num_layers=-1, rank=4, save_every=2, checkpoint_url=cfg["ckpt_url"], storage_options=cfg["so"],
                 resume=cfg["resume"], seed=7, compile=False)
slow = cfg.get("slow", 0.0)
res = train(args, data, on_step=lambda m: time.sleep(slow), media=media)
print(json.dumps({"steps": res["steps"], "losses": res["losses"], "quarantined": res["quarantined"]}))
"""

AUGMENT = r"""
import json, sys
import streamtune
sys.path.insert(0, sys.argv[2])
from test_multimodal_online import augment_hashes
print(json.dumps(augment_hashes(json.loads(sys.argv[1]))))
"""


def augment_hashes(cfg: dict) -> dict:
    """sha256 of each augmented medium's encoder tokens, by seed/sample id/epoch."""
    import hashlib

    from streamtune.config import DecodeConfig
    from streamtune.train.mm_train import MultimodalRun
    from streamtune.train.models import load_base
    from streamtune.train.trainer import TrainArgs

    rows = json.loads(open(cfg["rows"]).read())
    media = DecodeConfig(clip_model=cfg["clip"], clip_pretrained=cfg["ckpt"], media_tokens=["image", "audio"])
    model, tokenizer, _ = load_base(cfg["model"])
    out = {}
    for seed in (1, 2):
        args = TrainArgs(model=cfg["model"], stage="align", media_source="online", seed=seed)
        run = MultimodalRun(args, model, tokenizer, {"image": {"dim": 64}, "audio": {"dim": 1920}}, media)
        for row in rows:
            row = {
                "sample_id": row["sample_id"],
                "image": bytes.fromhex(row["image"]),
                "audio": bytes.fromhex(row["audio"]),
            }
            for epoch in (0, 1):
                got = run.media_of(row, epoch, augment=True)
                key = f"{seed}/{row['sample_id']}/{epoch}"
                out[key] = {k: hashlib.sha256(v[0].tobytes()).hexdigest() for k, v in got.items()}
    return out


def drawing(colour, size: int = 64) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (250, 250, 250))
    ImageDraw.Draw(img).ellipse([12, 12, size - 12, size - 12], fill=colour)
    return image_bytes(img, "PNG")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online")
    clip = tiny_clip_config(folder)
    return {
        "clip": clip,
        "ckpt": save_random_checkpoint(clip, str(folder / "clip.safetensors"), seed=0),
        "model": write_random_model(str(folder / "tiny"), "tiny", seed=3),
        "folder": folder,
    }


def raw_rows() -> list[dict]:
    colours = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220)}
    rows = []
    for i in range(9):
        name = list(colours)[i % 3]
        rows.append(
            {
                "sample_id": f"clips/s{i}",
                "image": drawing(colours[name]) if i % 4 != 1 else None,
                "audio": speech(f"a {name} one") if i % 4 != 2 else None,
                "text": f"{name} {i % 2}".encode(),
                "sources": [f"clips/s{i}.png", f"clips/s{i}.wav"],
            }
        )
    rows[5]["image"] = b"\x89PNG\r\n\x1a\n this is not a picture"  # quarantined, every time
    return rows


def _run(cfg, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def test_kill_and_resume_online_gives_identical_adapter_and_projector(tmp_path, bucket, s3opts, world):
    raw = f"{bucket}/raw"
    commit_index(raw, [write_shard(pa.Table.from_pylist(raw_rows(), RAW_SCHEMA), storage.join(raw, shard_name(0)), s3opts)], RAW_SCHEMA, s3opts)  # fmt: skip
    base = {k: world[k] for k in ("clip", "ckpt", "model")} | {"so": s3opts, "raw": raw, "resume": False}
    uninterrupted = _run({**base, "adapter": str(tmp_path / "a"), "ckpt_url": f"{bucket}/full"})

    ckpt = f"{bucket}/killed"  # the run to be killed starts alongside: separate processes, the same bits
    kill_after = random.Random().choice([2, 4])
    proc = _run({**base, "adapter": str(tmp_path / "b"), "ckpt_url": ckpt, "slow": 0.5})
    kill_at_step(proc, lambda: checkpoint.latest(ckpt, s3opts), kill_after, timeout=400)
    full = _finish(uninterrupted)
    assert checkpoint.latest(ckpt, s3opts)["step"] < 6
    resumed = _finish(_run({**base, "adapter": str(tmp_path / "b"), "ckpt_url": ckpt, "resume": True}))

    assert resumed["steps"] == full["steps"] == 6 and resumed["losses"] == full["losses"]
    for name in ("adapters.safetensors", "projector.safetensors"):
        a, b = mx.load(str(tmp_path / "a" / name)), mx.load(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert mx.array_equal(a[k], b[k]).item(), (name, k)
    # the undecodable picture: one record, with its reason, in both runs and next to both adapters
    assert resumed["quarantined"] == full["quarantined"]
    assert [(q["sample_id"], q["modality"], q["stage"]) for q in full["quarantined"]] == [
        ("clips/s5", "image", "train")
    ]
    assert full["quarantined"][0]["error"] in ("corrupt", "truncated", "unsupported")
    assert (tmp_path / "b" / "quarantine.parquet").exists()


def test_same_augmented_sample_for_the_same_seed_epoch_and_id_in_any_process(tmp_path, world):
    rows = [
        {
            "sample_id": f"x{i}",
            "image": drawing((200, 40 * i, 30)).hex(),
            "audio": speech(f"number {i}").hex(),
        }
        for i in range(2)
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    cfg = {k: world[k] for k in ("clip", "ckpt", "model")} | {"rows": str(tmp_path / "rows.json")}

    other = subprocess.Popen(  # another process, while this one computes the same
        [sys.executable, "-c", AUGMENT, json.dumps(cfg), os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = augment_hashes(cfg)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err.decode()[-3000:]
    second = json.loads(out.decode().splitlines()[-1])
    assert first == second and len(first) == 8
    for kind in ("image", "audio"):
        assert first["1/x0/0"][kind] != first["1/x0/1"][kind], "another epoch, another augmentation"
        assert first["1/x0/0"][kind] != first["1/x1/0"][kind]
        assert first["1/x0/0"][kind] != first["2/x0/0"][kind], "another seed"


def test_augmentations_keep_the_medium_recognisable():
    from PIL import Image

    from streamtune.decode.augment import augment_audio, augment_image, rng_for

    img = Image.new("RGB", (96, 96), (30, 70, 220))
    out = augment_image(img, rng_for(0, 0, "a", "image"))
    assert out.size == (96, 96)
    r, g, b = np.asarray(out, np.float32).reshape(-1, 3).mean(0)
    assert b > r + 60 and b > g + 60, "still blue"
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    speeds = []
    for epoch in range(8):
        aug = augment_audio(tone, rng_for(0, epoch, "a", "audio"))
        assert aug.dtype == np.float32 and np.abs(aug).max() <= 1.0
        speeds.append(aug.size)
        spectrum = np.abs(np.fft.rfft(aug))
        peak = np.fft.rfftfreq(aug.size, 1 / 16000)[spectrum.argmax()]
        assert 380 < peak < 500  # speed 0.9-1.1 moves the pitch by as much
    assert len(set(speeds)) > 4
    assert hashlib.sha256(augment_audio(tone, rng_for(0, 0, "a", "audio")).tobytes()).hexdigest() == (
        hashlib.sha256(augment_audio(tone, rng_for(0, 0, "a", "audio")).tobytes()).hexdigest()
    )


def test_augment_media_names_the_media_that_are_augmented(world):
    from streamtune.config import DecodeConfig
    from streamtune.train.mm_train import MultimodalRun
    from streamtune.train.models import load_base
    from streamtune.train.trainer import TrainArgs

    media = DecodeConfig(
        clip_model=world["clip"], clip_pretrained=world["ckpt"], media_tokens=["image", "audio"]
    )
    model, tokenizer, _ = load_base(world["model"])
    row = {"sample_id": "x", "image": drawing((200, 40, 30)), "audio": speech("number one")}
    spec = {"image": {"dim": 64}, "audio": {"dim": 1920}}

    def encoded(epoch: int, **settings) -> dict:
        args = TrainArgs(model=world["model"], stage="align", media_source="online", **settings)
        return MultimodalRun(args, model, tokenizer, spec, media).media_of(dict(row), epoch, augment=True)

    only_audio = {e: encoded(e, augment_media=["audio"]) for e in (0, 1)}
    everything = {0: encoded(0)}
    plain = encoded(0, augment=False)
    np.testing.assert_array_equal(only_audio[0]["image"][0], plain["image"][0])
    np.testing.assert_array_equal(only_audio[1]["image"][0], plain["image"][0])
    assert not np.array_equal(only_audio[0]["audio"][0], plain["audio"][0])
    np.testing.assert_array_equal(only_audio[0]["audio"][0], everything[0]["audio"][0])
    assert not np.array_equal(everything[0]["image"][0], plain["image"][0])
