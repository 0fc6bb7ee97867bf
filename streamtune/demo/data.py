"""Generate the demo source set: spoken descriptions (espeak-ng) + matching drawings (Pillow) + captions.

Each sample `clips/sNN` has an audio file saying what the picture shows (WAV, FLAC or OGG), a PNG or JPEG
drawing of it, and a caption row in `clips/metadata.jsonl`; optional `clips/vNN.mp4` videos show moving
shapes with a narrator naming them (`footage.py`). Two deliberately broken files show quarantine.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "black": (15, 15, 15),
    "purple": (130, 40, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
AUDIO_FORMATS = ("wav", "flac", "ogg")
IMAGE_FORMATS = ("png", "jpg")


def speak(text: str, voice: str = "en-us", speed: int = 150) -> tuple[np.ndarray, int]:
    """Synthesize speech with espeak-ng; returns (float32 mono samples, sample rate)."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    wav = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def draw_shape(d: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, s: int, fill, bar: int = 0) -> None:
    """One of SHAPES in the s x s box at (x0, y0); a cross's arms are 2 * bar wide."""
    if shape == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(x0 + s // 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=fill)
    else:
        d.rectangle([x0 + s // 2 - bar, y0, x0 + s // 2 + bar, y0 + s], fill=fill)
        d.rectangle([x0, y0 + s // 2 - bar, x0 + s, y0 + s // 2 + bar], fill=fill)


def draw(shape: str, colour: str, size: int = 224) -> Image.Image:
    img = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    m = size // 5
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fill)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=fill)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    else:
        w = size // 8
        d.rectangle([size // 2 - w, m, size // 2 + w, size - m], fill=fill)
        d.rectangle([m, size // 2 - w, size - m, size // 2 + w], fill=fill)
    d.text((6, size - 16), f"{colour} {shape}", fill=(90, 90, 90))
    return img


def _encode_audio(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "wav":
        sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    elif fmt == "flac":
        sf.write(buf, audio, rate, format="FLAC")
    else:
        sf.write(buf, audio, rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


def _encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
    return buf.getvalue()


def generate_demo_source(
    out_dir: str, n: int = 24, seed: int = 0, broken: bool = True, videos: int = 0
) -> list[str]:
    """Write the demo set under `out_dir`; returns the relative keys written. `videos`: that many 15 s
    narrated clips of moving shapes (`clips/vNN.mp4`, H.264/AAC) join the set, with caption rows."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(out_dir, "clips")
    os.makedirs(folder, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(combos))
    keys: list[str] = []
    captions = []
    for i in range(n):
        colour, shape = combos[order[i % len(combos)]]
        sid = f"s{i:02d}"
        sentence = f"A {colour} {shape} on a white background."
        audio, rate = speak(f"This picture shows a {colour} {shape}.")
        afmt, ifmt = AUDIO_FORMATS[i % len(AUDIO_FORMATS)], IMAGE_FORMATS[i % len(IMAGE_FORMATS)]
        for name, data in (
            (f"{sid}.{afmt}", _encode_audio(audio, rate, afmt)),
            (f"{sid}.{ifmt}", _encode_image(draw(shape, colour), ifmt)),
        ):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            keys.append(f"clips/{name}")
        captions.append({"file_name": f"{sid}.{ifmt}", "caption": sentence, "colour": colour, "shape": shape})
    if videos:
        from streamtune.demo.footage import demo_clip

        for i in range(videos):
            data, shots = demo_clip(rng, seconds=15.0)
            name = f"v{i:02d}.mp4"
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            keys.append(f"clips/{name}")
            said = ", then ".join(f"a {s.colour} {s.shape}" for s in shots)
            captions.append({"file_name": name, "caption": f"A video of {said}.", "shots": len(shots)})
    if broken:
        good = _encode_audio(*speak("This one is cut short."), "flac")
        with open(os.path.join(folder, "broken01.flac"), "wb") as f:
            f.write(good[: len(good) // 3])
        with open(os.path.join(folder, "broken02.png"), "wb") as f:
            f.write(b"this is not a picture")
        keys += ["clips/broken01.flac", "clips/broken02.png"]
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in captions:
            f.write(json.dumps(row) + "\n")
    keys.append("clips/metadata.jsonl")
    return keys


def upload_dir(local_dir: str, url: str, storage_options: dict | None = None) -> int:
    """Upload every file under `local_dir` to the prefix `url`; returns bytes uploaded."""
    from streamtune import storage

    total = 0
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                data = f.read()
            storage.write_bytes(storage.join(url, rel), data, storage_options)
            total += len(data)
    return total
