"""Seeded data augmentation for online multimodal training.

Every draw comes from `rng_for(seed, epoch, sample_id, kind)`, so a sample is augmented the same way in
any process, on any rank and after a resume, and differently in every epoch.

- Images: random resized crop (70-100 % of the area, aspect 3/4-4/3, back to the original size),
  horizontal flip, brightness / contrast / saturation jitter of +-20 %. Hue is left alone: colour names
  are often what is learned.
- Audio (16 kHz mono): speed 0.9-1.1 (resampled, pitch follows), crop of up to 5 % at either end, a
  random offset of 0-0.2 s of silence in front, gain of +-6 dB, white noise at an SNR of 10-30 dB.

`prepare_medium` is the CPU part of online training's data path for one medium (decode, augment, the
image tower's pixel geometry); it runs in a thread or a worker process.
"""

from __future__ import annotations

import numpy as np
import xxhash
from PIL import Image, ImageEnhance

SAMPLE_RATE = 16000
KIND_CODE = {"image": 1, "audio": 2}


def rng_for(seed: int, epoch: int, sample_id: str, kind: str) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    key = xxhash.xxh64_intdigest(str(sample_id).encode())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), key, KIND_CODE[kind]])


def augment_image(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    scale = rng.uniform(0.7, 1.0)
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(round(min(w, np.sqrt(scale * w * h * ratio))))
    ch = int(round(min(h, np.sqrt(scale * w * h / ratio))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    image = image.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.8, 1.2)))
    return image


def augment_audio(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    audio = np.asarray(audio, np.float32).reshape(-1)
    speed = rng.uniform(0.9, 1.1)
    n = max(1, int(round(audio.size / speed)))
    audio = np.interp(np.arange(n) * speed, np.arange(audio.size), audio).astype(np.float32)
    head, tail = (int(rng.uniform(0, 0.05) * audio.size) for _ in range(2))
    audio = audio[head : max(head + 1, audio.size - tail)]
    offset = np.zeros(int(rng.uniform(0, 0.2) * SAMPLE_RATE), np.float32)
    audio = np.concatenate([offset, audio]) * np.float32(10 ** (rng.uniform(-6, 6) / 20))
    power = float(np.mean(audio**2)) or 1e-8
    snr = rng.uniform(10, 30)
    noise = rng.standard_normal(audio.size).astype(np.float32) * np.float32(np.sqrt(power / 10 ** (snr / 10)))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def prepare_medium(kind, data: bytes, sid, sources, epoch: int, augment: bool, opts: dict) -> tuple:
    """("ok", image pixels or 16 kHz audio) or ("quarantined", record): one medium decoded and, if
    `augment` and its kind is in `opts["augment"]`, augmented from (seed, epoch, sample id). A plain
    function of its arguments, so a thread or a process pool can run it."""
    from streamtune.decode.media import MediaError, decode_audio, decode_image
    from streamtune.decode.tokens import image_pixels

    augment = augment and kind in opts["augment"]
    try:
        if kind == "image":
            image = decode_image(data, opts["max_pixels"], min_side=opts["min_side"])
            if augment:
                image = augment_image(image, rng_for(opts["seed"], epoch, sid, kind))
            return "ok", image_pixels(image, opts["pixels"])
        audio = decode_audio(data, 16000, max_seconds=opts["max_audio_seconds"])
        if augment:
            audio = augment_audio(audio, rng_for(opts["seed"], epoch, sid, kind))
        return "ok", audio
    except MediaError as e:
        from streamtune import quarantine
        from streamtune.decode.features import _source_key

        key = _source_key(sources, kind, sid)
        return "quarantined", quarantine.record(sid, key, "train", e.kind, e.reason, modality=kind)
