"""A media corpus for decode tests: good files of every supported format plus hostile and broken ones.

Every item says which raw column it lands in and what decoding must do with it: "ok", or the set of
acceptable `MediaError.kind` / quarantine error values. Built in memory, deterministic, a few MB.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

SR = 16000


@dataclass
class Item:
    name: str  # also the sample_id stem
    column: str  # audio | image | text | meta
    data: bytes | str | None
    expect: str | frozenset = "ok"  # "ok" or acceptable error kinds
    ext: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.expect == "ok"


def speech(text: str, rate: int = 175) -> bytes:
    """espeak-ng speech as a WAV file (22.05 kHz mono 16-bit)."""
    out = subprocess.run(
        ["espeak-ng", "-s", str(rate), "-w", "/dev/stdout", text], capture_output=True, check=True
    )
    wav = out.stdout
    # espeak writes to a pipe, leaving placeholder sizes: fix them so the file is a plain valid WAV.
    data_at = wav.index(b"data") + 8
    return (
        wav[:4]
        + struct.pack("<I", len(wav) - 8)
        + wav[8 : data_at - 4]
        + struct.pack("<I", len(wav) - data_at)
        + wav[data_at:]
    )


def tone(seconds: float = 1.0, rate: int = 44100, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_audio(pcm: np.ndarray, rate: int, fmt: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        out_rate = 48000 if "opus" in codec else rate
        stream = container.add_stream(codec, rate=out_rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=out_rate)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        step = 1024 if codec != "libopus" else 960
        pending = [f for f in resampler.resample(frame)] + [f for f in resampler.resample(None)]
        for f in pending:
            arr = f.to_ndarray()
            for start in range(0, arr.shape[-1], step):
                chunk = np.ascontiguousarray(arr[..., start : start + step])
                sub = av.AudioFrame.from_ndarray(chunk, format=f.format.name, layout="mono")
                sub.sample_rate = out_rate
                for packet in stream.encode(sub):
                    container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def float_wav(pcm: np.ndarray, rate: int = SR) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 96, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def exif_rotated_jpeg() -> bytes:
    """A 96x64 JPEG whose EXIF says 'rotate 90 CW': decoded it must be 64x96."""
    img = gradient(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(img, "JPEG", exif=exif.tobytes(), quality=90)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG declaring 10 gigapixels; decoding it naively would allocate 30 GB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """GIF with a 65535x65535 logical screen and frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
    return header + descriptor + b"\x08\x02\x4c\x01\x00;"


def video_only_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def build() -> list[Item]:
    """The corpus: good files first, then hostile ones."""
    hello = speech("hello world this is a test")
    import soundfile as sf

    pcm, rate = sf.read(io.BytesIO(speech("good morning")), dtype="float32")
    mp3 = encode_audio(pcm, rate, "mp3", "libmp3lame")
    flac = encode_audio(pcm, rate, "flac", "flac")
    jpeg = image_bytes(gradient(), "JPEG", quality=90)
    png = image_bytes(gradient(), "PNG")
    tiff = image_bytes(gradient(), "TIFF")
    rgba = gradient().convert("RGBA")
    rgba.putalpha(128)
    palette = gradient().convert("P")
    palette.info["transparency"] = 0
    gray16 = Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 10).astype(np.uint16))

    bad = frozenset
    items = [
        Item("speech wav", "audio", hello, ext=".wav", extra={"words": ("world", "test")}),
        Item("speech flac", "audio", flac, ext=".flac"),
        Item("speech mp3", "audio", mp3, ext=".mp3"),
        Item("speech opus", "audio", encode_audio(pcm, rate, "ogg", "libopus"), ext=".opus"),
        Item("speech m4a", "audio", encode_audio(pcm, rate, "ipod", "aac"), ext=".m4a"),
        Item("speech webm", "audio", encode_audio(pcm, rate, "webm", "libopus"), ext=".webm"),
        Item("float wav", "audio", float_wav(tone(1.0, SR)), ext=".wav", extra={"tone": 440}),
        Item("photo jpeg", "image", jpeg, ext=".jpg"),
        Item("exif rotated", "image", exif_rotated_jpeg(), ext=".jpg", extra={"size": (64, 96)}),
        Item("rgba png", "image", image_bytes(rgba, "PNG"), ext=".png"),
        Item("palette png", "image", image_bytes(palette, "PNG"), ext=".png"),
        Item("gray16 png", "image", image_bytes(gray16, "PNG"), ext=".png"),
        Item("cmyk jpeg", "image", image_bytes(gradient().convert("CMYK"), "JPEG"), ext=".jpg"),
        Item("photo webp", "image", image_bytes(gradient(), "WEBP"), ext=".webp"),
        Item("animated gif", "image", animated_gif(), ext=".gif", extra={"first": (255, 0, 0)}),
        Item("photo bmp", "image", image_bytes(gradient(), "BMP"), ext=".bmp"),
        Item("photo tiff", "image", tiff, ext=".tiff"),
        Item("plain text", "text", "a caption with unicode: naïve café ✓", ext=".txt"),
        # hostile and broken
        Item("zero wav", "audio", b"", bad({"empty"}), ".wav"),
        Item("zero jpg", "image", b"", bad({"empty"}), ".jpg"),
        Item("cut wav", "audio", hello[: len(hello) // 3], bad({"truncated"}), ".wav"),
        Item("wav header only", "audio", hello[:44], bad({"truncated", "empty"}), ".wav"),
        Item("cut mp3", "audio", mp3[: len(mp3) // 2], bad({"truncated"}), ".mp3"),
        Item("cut flac", "audio", flac[: len(flac) // 2], bad({"truncated"}), ".flac"),
        Item("cut jpeg", "image", jpeg[: len(jpeg) // 2], bad({"truncated", "corrupt"}), ".jpg"),
        Item("cut png", "image", png[: len(png) // 2], bad({"truncated", "corrupt"}), ".png"),
        Item("cut tiff", "image", tiff[: len(tiff) // 2], bad({"truncated", "corrupt"}), ".tiff"),
        Item("jpeg named wav", "audio", jpeg, bad({"wrong_content"}), ".wav"),
        Item("wav named jpg", "image", hello, bad({"wrong_content"}), ".jpg"),
        Item("text named mp3", "audio", b"this is not audio at all\n" * 20, bad({"wrong_content"}), ".mp3"),
        Item(
            "html named png",
            "image",
            b"<html><body>404 Not Found</body></html>",
            bad({"wrong_content"}),
            ".png",
        ),
        Item(
            "noise audio",
            "audio",
            np.random.RandomState(1).bytes(4096),
            bad({"unsupported", "corrupt"}),
            ".ogg",
        ),
        Item("noise image", "image", np.random.RandomState(2).bytes(4096), bad({"unsupported"}), ".webp"),
        Item("png bomb", "image", png_bomb(), bad({"bomb"}), ".png"),
        Item("gif bomb", "image", gif_bomb(), bad({"bomb"}), ".gif"),
        Item("video only mp4", "audio", video_only_mp4(), bad({"wrong_content"}), ".mp4"),
        Item("nan wav", "audio", float_wav(np.full(SR, np.nan, np.float32)), bad({"corrupt"}), ".wav"),
        Item("latin1 text", "text", "caf\xe9 cr\xe8me".encode("latin-1"), bad({"encoding"}), ".txt"),
        Item("broken sidecar", "meta", '{"file_name": "x.wav", "text": ', bad({"broken_sidecar"})),
        Item("sidecar not object", "meta", '["x.wav", "text"]', bad({"broken_sidecar"})),
        Item("nothing at all", "none", None, bad({"empty"})),
    ]
    return items


ODD_IDS = (
    "dir with spaces/clip one",
    "ünïcødé/日本語/音声",
    "../../../../tmp/escape",
    "/absolute/key",
    "deep/" + "x" * 300,
)


def raw_table(items: list[Item], ids: list[str] | None = None) -> pa.Table:
    """A raw-shard table (RAW_SCHEMA) holding one sample per item; text may be deliberately invalid UTF-8."""
    from streamtune.shards import RAW_SCHEMA

    ids = ids or [f"corpus/{it.name}" for it in items]
    cols: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
    for sid, it in zip(ids, items, strict=True):
        cols["sample_id"].append(sid)
        cols["audio"].append(it.data if it.column == "audio" else None)
        cols["image"].append(it.data if it.column == "image" else None)
        text = it.data if it.column == "text" else None
        cols["text"].append(text.encode() if isinstance(text, str) else text)
        cols["meta"].append(
            it.data if it.column == "meta" else (json.dumps({"name": it.name}) if it.ok else None)
        )
        cols["sources"].append([sid + it.ext] if it.ext else [])
    for name in ("video", "refs"):
        cols[name] = [None] * len(ids)
    arrays = []
    for f in RAW_SCHEMA:
        if f.name == "text":  # build as binary, then view as string: a writer that skipped validation
            arrays.append(pa.array(cols["text"], pa.binary()).view(pa.string()))
        else:
            arrays.append(pa.array(cols[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)


TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_clip_config(folder) -> str:
    """Write a small open_clip config (2-layer towers, 64-d) and return its path; open_clip builds it."""
    import os

    path = os.path.join(str(folder), "tiny-clip-test.json")
    with open(path, "w") as f:
        json.dump(TINY_CLIP, f)
    return path
