"""Decode throughput: batched Whisper and CLIP against the one-sample-at-a-time path, in one run.

    python bench/decode.py [--clips 8] [--long 1] [--images 32] [--whisper offline:tiny.en]

Audio: espeak-ng speech clips (plus long ones over several 30 s windows) go through `Transcriber` with
batching, through the same code one window at a time, and through `mlx_whisper.transcribe` one clip at a
time (what a plain script does). Images: JPEG bytes are decoded and embedded by `ClipEmbedder` in batches,
and one at a time. The last stdout line is a JSON object:

    audio_rtf               audio seconds transcribed per wall second, batched
    images_s                images decoded + embedded + tagged per second, batched
    ratio_audio_batched     naive mlx_whisper.transcribe wall time / batched wall time
    ratio_audio_vs_batch1   our unbatched path wall time / batched wall time
    ratio_image_batched     one-at-a-time wall time / batched wall time
    batched_equal           batched transcripts == unbatched, and embeddings within 1e-4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before mlx)

SENTENCES = [
    "hello world this is a test",
    "the quick brown fox jumps over the lazy dog",
    "streaming data from object storage into fine tuning",
    "please call stella and ask her to bring these things with her from the store",
    "one two three four five six seven eight nine ten",
    "good morning everyone and welcome to the meeting",
    "the weather is nice today so we will walk to the park",
    "machine learning models need a lot of clean data",
]


def speech(text: str) -> np.ndarray:
    from streamtune.decode.media import decode_audio

    wav = subprocess.run(["espeak-ng", "-w", "/dev/stdout", text], capture_output=True, check=True).stdout
    return decode_audio(wav)


def make_clips(n_short: int, n_long: int, long_seconds: float = 45.0) -> list[np.ndarray]:
    voices = [speech(s) for s in SENTENCES]
    clips = [voices[i % len(voices)] for i in range(n_short)]
    pause = np.zeros(8000, np.float32)
    for j in range(n_long):  # sentences back to back with short pauses
        parts, total = [], 0
        k = j
        while total < long_seconds * 16000:
            parts += [voices[k % len(voices)], pause]
            total += parts[-2].size + pause.size
            k += 1
        clips.append(np.concatenate(parts))
    return clips


def make_images(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.RandomState(0)
    out = []
    for i in range(n):
        w, h = 320 + 37 * (i % 7), 240 + 23 * (i % 5)
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([(x * (i + 1)) % 256, (y * 3 + i) % 256, rng.randint(0, 256, (h, w))], -1).astype(
            np.uint8
        )
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bench_audio(args) -> dict:
    import mlx_whisper

    from streamtune.decode.whisper import Transcriber

    clips = make_clips(args.clips, args.long, args.long_seconds)
    seconds = sum(c.size for c in clips) / 16000
    batched = Transcriber(args.whisper, batch_size=args.audio_batch, cache_dir=args.cache_dir)
    batched.piece_seconds = args.piece_seconds
    batched.transcribe([clips[0][:16000]])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    out_b = batched.transcribe(clips)
    t_batched = time.perf_counter() - t0

    single = Transcriber(args.whisper, batch_size=1, cache_dir=args.cache_dir)
    single.piece_seconds = args.piece_seconds
    t0 = time.perf_counter()
    out_1 = single.transcribe(clips)
    t_single = time.perf_counter() - t0

    t0 = time.perf_counter()
    for c in [] if args.skip_naive else clips:
        mlx_whisper.transcribe(c, path_or_hf_repo=batched.path, fp16=False, language="en", verbose=None)
    t_naive = None if args.skip_naive else time.perf_counter() - t0
    return {
        "audio_clips": len(clips),
        "audio_seconds": round(seconds, 2),
        "audio_windows": batched.stats["windows"] - 1,
        "audio_batches": batched.stats["batches"] - 1,
        "piece_seconds": args.piece_seconds,
        "audio_batched_s": round(t_batched, 2),
        "audio_batch1_s": round(t_single, 2),
        "audio_naive_s": t_naive and round(t_naive, 2),
        "audio_rtf": round(seconds / t_batched, 3),
        "audio_rtf_naive": t_naive and round(seconds / t_naive, 3),
        "ratio_audio_batched": t_naive and round(t_naive / t_batched, 3),
        "ratio_audio_vs_batch1": round(t_single / t_batched, 3),
        "audio_equal": [o["text"] for o in out_b] == [o["text"] for o in out_1],
    }


def bench_images(args) -> dict:
    from streamtune.decode.clip import ClipEmbedder
    from streamtune.decode.media import decode_image

    images = make_images(args.images)
    labels = ["person", "dog", "cat", "car", "tree", "food", "building", "sky", "water", "text document"]
    clip = ClipEmbedder(args.clip_model, args.clip_pretrained, labels=labels, batch_size=args.image_batch)
    clip.embed_images([decode_image(images[0])])  # warm-up

    t0 = time.perf_counter()
    emb_b = clip.embed_prepared([clip.prepare(decode_image(b)) for b in images])
    clip.tag(emb_b)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    emb_1 = []
    for b in images:
        e = clip.embed_images([decode_image(b)])
        clip.tag(e)
        emb_1.append(e)
    t_single = time.perf_counter() - t0
    return {
        "images": len(images),
        "images_batched_s": round(t_batched, 2),
        "images_single_s": round(t_single, 2),
        "images_s": round(len(images) / t_batched, 2),
        "images_s_naive": round(len(images) / t_single, 2),
        "ratio_image_batched": round(t_single / t_batched, 3),
        "image_equal": bool(np.abs(np.concatenate(emb_1) - emb_b).max() < 1e-4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=8, help="short speech clips")
    p.add_argument("--long", type=int, default=1, help="long clips (two 30 s windows each by default)")
    p.add_argument("--long-seconds", type=float, default=45.0)
    p.add_argument("--piece-seconds", type=float, default=120.0, help="Transcriber.piece_seconds")
    p.add_argument("--skip-naive", action="store_true", help="leave out mlx_whisper.transcribe")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--whisper", default="offline:tiny.en")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default=None, help="checkpoint path/tag; default: seeded random init")
    p.add_argument("--audio-batch", type=int, default=8)
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--cache-dir", default=os.environ.get("STREAMTUNE_CACHE") or tempfile.gettempdir())
    p.add_argument("--skip", choices=["audio", "images"], default=None)
    args = p.parse_args()

    result: dict = {"bench": "decode", "cpu_count": os.cpu_count()}
    if args.skip != "audio":
        result |= bench_audio(args)
        print(f"audio: {result['audio_seconds']} s in {result['audio_batched_s']} s batched", file=sys.stderr)
    if args.skip != "images":
        result |= bench_images(args)
    result["batched_equal"] = bool(result.get("audio_equal", True) and result.get("image_equal", True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
