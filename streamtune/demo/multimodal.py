"""The multimodal part of `streamtune demo`: the model sees the picture and hears the sound.

Training samples are drawings of coloured shapes (random sizes, positions, background, pixel noise) and
espeak-ng voices saying a colour and a shape; each sample has one medium and a question, the answer is
"A {colour} {shape}.". They go through the same stages as everything else: object store -> manifest ->
raw shards -> decode (CLIP patch tokens, Whisper tiny.en encoder frames, kept as float16) -> streamed
feature rows -> stage 1 (projectors only) -> stage 2 (projectors + LoRA). `media_source="online"` instead
encodes the media in the data path, the voices augmented (speed, offset, gain, noise) afresh in every epoch
(slower than cached features on 2 cores). Held-out renderings (new sizes,
positions and noise; voices at other speeds and pitches, with noise) are then asked "What does this
picture show?" / "What shape and colour do you hear?" with only the medium in the prompt: the summary
reports colour and shape accuracy and the counterfactual loss ratio per modality, and one answer before
and after training.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from streamtune.demo.data import COLOURS, SHAPES, draw_shape

IMAGE_QUESTION = "What does this picture show?"
AUDIO_QUESTION = "What shape and colour do you hear?"
ANSWER = "A {colour} {shape}."
SYSTEM = "Answer briefly."
VOICES = ("en-us", "en-gb", "en-us+f2", "en-gb+m3")
# Whitening the picture token lets its projector learn shape; whitening the voices' tokens as much costs
# voice colour, and not at all left picture shape lower on average (3 seeds each, README).
WHITEN = {"image": 1.0, "audio": 3.0}


def render(shape: str, colour: str, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """A shape of 35-75 % of the canvas at a random place, on a light background with pixel noise."""
    bg = int(rng.integers(225, 256))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    s = int(size * rng.uniform(0.35, 0.75))
    x0, y0 = (int(rng.integers(2, size - s - 2)) for _ in range(2))
    fill = COLOURS[colour]
    draw_shape(d, shape, x0, y0, s, fill, bar=max(s // 7, 2))
    noise = rng.normal(0, rng.uniform(0, 12), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def _espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    import shutil
    import subprocess

    import soundfile as sf

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    return sf.read(io.BytesIO(wav), dtype="float32")


def say(colour: str, shape: str, rng: np.random.Generator, held_out: bool = False) -> bytes:
    """WAV bytes of a voice saying the colour and the shape; held-out voices speak at other speeds and
    pitches, with noise."""
    import soundfile as sf

    speed = int(rng.choice([125, 200])) if held_out else int(rng.integers(140, 181))
    pitch = int(rng.choice([20, 80])) if held_out else int(rng.integers(35, 66))
    voice = f"{VOICES[int(rng.integers(len(VOICES)))]}"
    audio, rate = _espeak(f"a {colour} {shape}", voice, speed, pitch)
    if held_out:
        audio = audio + rng.normal(0, 0.01, audio.size).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _label(rng: np.random.Generator) -> tuple[str, str]:
    return list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]


def write_source(out_dir: str, images: int, audio: int, seed: int = 0) -> int:
    """Training samples under out_dir/pictures and out_dir/voices, each folder with its metadata.jsonl
    (question, answer, colour, shape). Returns the number of samples."""
    rng = np.random.default_rng(seed)
    for folder, n, kind in (("pictures", images, "image"), ("voices", audio, "audio")):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        rows = []
        for i in range(n):
            colour, shape = _label(rng)
            if kind == "image":
                name, data, question = f"p{i:04d}.png", _png(render(shape, colour, rng)), IMAGE_QUESTION
            else:
                name, data, question = f"v{i:04d}.wav", say(colour, shape, rng), AUDIO_QUESTION
            with open(os.path.join(out_dir, folder, name), "wb") as f:
                f.write(data)
            answer = ANSWER.format(colour=colour, shape=shape)
            rows.append(
                {"file_name": name, "question": question, "answer": answer, "colour": colour, "shape": shape}
            )
        with open(os.path.join(out_dir, folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return images + audio


def held_out(n: int, seed: int = 1000) -> dict[str, list[dict]]:
    """In-memory held-out samples per medium: {"image": [...], "audio": [...]} rows with the raw bytes."""
    rng = np.random.default_rng(seed)
    out = {"image": [], "audio": []}
    for kind in out:
        for i in range(n):
            colour, shape = _label(rng)
            data = _png(render(shape, colour, rng, size=int(rng.choice([160, 200, 256])))) if kind == "image" else (
                say(colour, shape, rng, held_out=True)
            )  # fmt: skip
            question = IMAGE_QUESTION if kind == "image" else AUDIO_QUESTION
            answer = ANSWER.format(colour=colour, shape=shape)
            meta = json.dumps({"question": question, "answer": answer})
            out[kind].append(
                {
                    "sample_id": f"held-out/{kind}{i}",
                    kind: data,
                    "meta": meta,
                    "colour": colour,
                    "shape": shape,
                }
            )
    return out


def ingest(source_url: str, work_url: str, decode_cfg, storage_options=None, decode: bool = True) -> str:
    """Manifest -> raw shards -> (with `decode`) feature shards with encoder tokens; returns the URL
    training reads: the feature set, or the raw shards for online encoding."""
    from streamtune.decode.features import decode_shards
    from streamtune.ingest import commit_raw_shards, plan_shards, unusable_objects, write_raw_shard
    from streamtune.manifest import build_manifest
    from streamtune.storage import join

    table, _ = build_manifest(source_url, storage_options)
    raw, features = join(work_url, "shards"), join(work_url, "features")
    plans = plan_shards(table, max_shard_bytes=1 << 20)
    results = [write_raw_shard(source_url, table, p, raw, source_options=storage_options, out_options=storage_options) for p in plans]  # fmt: skip
    commit_raw_shards(raw, results, storage_options, append=False, problems=unusable_objects(table))
    if not decode:
        return raw
    decode_shards(raw, features, decode_cfg, storage_options)
    return features


def accuracy(mm, rows: list[dict], kind: str) -> dict:
    """Colour and shape named in the greedy answer to the sample's question, given only its medium."""
    requests = [{"prompt": json.loads(row["meta"])["question"], kind: row[kind]} for row in rows]
    answers = mm.generate_batch(requests, max_tokens=8)
    colour = sum(row["colour"] in text.lower() for row, text in zip(rows, answers, strict=True))
    shape = sum(row["shape"] in text.lower() for row, text in zip(rows, answers, strict=True))
    n = max(len(rows), 1)
    return {
        "colour_accuracy": colour / n,
        "shape_accuracy": shape / n,
        "samples": len(rows),
        "answers": answers,
    }


def run(
    work_url: str,
    workdir: str,
    *,
    storage_options: dict | None = None,
    images: int = 192,
    audio: int = 192,
    test: int = 16,
    align_iters: int = 24,
    instruct_iters: int = 36,
    batch_size: int = 2,
    lora_lr: float = 1e-4,
    projector: str | dict = "linear",
    projector_lr: tuple[float, float] = (2e-3, 2e-3),
    media_lr: tuple[dict, dict] = ({"image": 1e-2}, {"image": 5e-3}),
    projector_whiten: float | dict | None = WHITEN,
    model: str = "offline:smollm2",
    media_source: str = "cached",
    augment_media: tuple[str, ...] = ("audio",),
    decode_overrides: dict | None = None,
    train_overrides: dict | None = None,
    log=print,
) -> dict:
    """The whole multimodal part; returns the `multimodal` section of summary.json."""
    from streamtune import CloudStreamingDataset
    from streamtune.config import DecodeConfig
    from streamtune.demo.data import upload_dir
    from streamtune.storage import join
    from streamtune.train.data import Template
    from streamtune.train.mm_generate import load_multimodal
    from streamtune.train.trainer import TrainArgs, train

    started = time.perf_counter()
    seconds = {}
    local = os.path.join(workdir, "multimodal-source")
    log(f"multimodal: {images} drawings and {audio} spoken descriptions in {local}")
    write_source(local, images, audio)
    source = join(work_url, "multimodal/raw")
    upload_dir(local, source, storage_options)
    seconds["generate_upload"] = time.perf_counter() - started
    # One image token: block-0 patch features of the (random-init) tower, max-pooled over the whole 7 x 7
    # grid. Probed on these drawings, that says colour and shape (ridge probe, held-out: 1.00 / 0.88) where
    # the 16 stacked 2 x 2 tokens of block 1 said shape at 0.52, and a sample is 15 tokens shorter.
    decode_cfg = DecodeConfig(
        **{
            "media_tokens": ["image", "audio"],
            "transcribe": False,
            "image_layer": 0,
            "image_pool": 7,
            "image_merge": "max",
            "labels": ["circle", "square", "triangle", "cross"],
            **(decode_overrides or {}),
        }
    )
    t0 = time.perf_counter()
    online = media_source == "online"
    log(
        "multimodal: manifest -> shards -> "
        + ("encoders in the data path" if online else "decode (CLIP patch tokens, Whisper encoder frames)")
    )
    rows_url = ingest(source, join(work_url, "multimodal"), decode_cfg, storage_options, decode=not online)
    seconds["ingest_decode"] = time.perf_counter() - t0

    template = Template(prompt="{image}\n{audio}\n{meta_question}", completion="{meta_answer}", system=SYSTEM)
    common = dict(model=model, template=template, batch_size=batch_size, seq_len=256, save_every=0, seed=0)
    common |= dict(num_layers=8, rank=8, warmup=1, storage_options=storage_options, media_source=media_source)
    common |= dict(projector=projector, projector_whiten=projector_whiten)
    common |= dict(augment_media=list(augment_media), **(train_overrides or {}))
    media = decode_cfg if online else None
    stage1, stage2 = os.path.join(workdir, "multimodal-stage1"), os.path.join(workdir, "multimodal-stage2")
    stream = dict(storage_options=storage_options, shuffle=True, seed=0)
    t0 = time.perf_counter()
    log(f"multimodal: stage 1, projectors only, {align_iters} steps")
    align = train(
        TrainArgs(
            stage="align",
            adapter_path=stage1,
            iters=align_iters,
            projector_lr=projector_lr[0],
            media_lr=media_lr[0],
            **common,
        ),
        CloudStreamingDataset(rows_url, **stream),
        media=media,
    )
    seconds["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"multimodal: stage 2, projectors + LoRA, {instruct_iters} steps")
    instruct = train(
        TrainArgs(
            stage="instruct", adapter_path=stage2, init_adapter=stage1, iters=instruct_iters, lr=lora_lr,
            projector_lr=projector_lr[1], media_lr=media_lr[1], **common,
        ),
        CloudStreamingDataset(rows_url, **stream),
        media=media,
    )  # fmt: skip
    seconds["stage2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"multimodal: asking about {test} held-out pictures and {test} held-out voices")
    tests = held_out(test)
    seconds["held_out_generate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    before = _untrained(model, stage1)
    mm = load_multimodal(model, stage2)
    seconds["evaluate_load"] = time.perf_counter() - t1
    report = {}
    for kind in ("image", "audio"):
        question = IMAGE_QUESTION if kind == "image" else AUDIO_QUESTION
        sample = tests[kind][0]
        t1 = time.perf_counter()
        report[kind] = accuracy(mm, tests[kind], kind)
        seconds[f"evaluate_{kind}_answers"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        report[kind] |= {
            "counterfactual": mm.counterfactual(tests[kind], seq_len=256),
            "question": question,
            "expected": json.loads(sample["meta"])["answer"],
            "before": before.generate(question, **{kind: sample[kind]}, max_tokens=16),
            "after": mm.generate(question, **{kind: sample[kind]}, max_tokens=16),
        }
        seconds[f"evaluate_{kind}_counterfactual"] = time.perf_counter() - t1
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    return {
        "samples": {"train_images": images, "train_audio": audio, "held_out_per_medium": test},
        "recipe": {
            "steps": [align_iters, instruct_iters],
            "rows": batch_size,
            "seq_len": 256,
            "projector": projector,
            "projector_lr": list(projector_lr),
            "media_lr": list(media_lr),
            "projector_whiten": projector_whiten,
            "lora_lr": lora_lr,
            "media_source": media_source,
            "augment_media": list(augment_media) if online else [],
        },
        "encoders": json.loads(open(os.path.join(stage2, "multimodal.json")).read())["media"],
        "stage1": _brief(align),
        "stage2": _brief(instruct),
        **report,
        "adapter_path": stage2,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _brief(result: dict) -> dict:
    keep = ("steps", "loss_first", "loss_last", "tokens", "samples", "tokens_per_s", "seconds")
    return {k: result.get(k) for k in keep}


def _untrained(model: str, trained_dir: str):
    """The base LM with freshly initialised projectors (what the model 'sees' before training)."""
    from streamtune.train.mm_generate import MultimodalModel
    from streamtune.train.models import load_base
    from streamtune.train.multimodal import attach_from_meta, read_meta

    meta = read_meta(trained_dir)
    net, tokenizer, _ = load_base(model, dequantize=True)
    attach_from_meta(net, meta, seed=0)
    net.eval()
    return MultimodalModel(net, tokenizer, meta)
