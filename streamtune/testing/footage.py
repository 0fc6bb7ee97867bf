"""Generated footage for tests and benchmarks (PyAV encoders: libx264, libvpx-vp9, aac, libopus).

`encode_clip` encodes every frame (small clips in memory). `write_long_video` encodes one GOP and one
audio chunk once and repeats their packets with rising timestamps, so an hour of 720p costs seconds of
encoding; the result is a valid file that decoders play through (the picture loops every GOP).
"""

from __future__ import annotations

import io
from typing import BinaryIO

import av
import numpy as np

AUDIO_RATE = 48000


def _frame(i: int, width: int, height: int, seed: int = 0) -> av.VideoFrame:
    """A square moving over a still gradient (an interview-like shot: no scene change), plus a little
    noise so encoders spend bits."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = x * 255 // max(1, width - 1)
    img[..., 1] = (y * 255 // max(1, height - 1)) % 256
    img[..., 2] = 128
    side = max(4, min(width, height) // 4)
    left = (i * 4) % max(1, width - side)
    img[height // 3 : height // 3 + side, left : left + side] = (255, 255, 255)
    rng = np.random.default_rng(seed + i)
    img ^= rng.integers(0, 16, img.shape, np.uint8)
    return av.VideoFrame.from_ndarray(img, format="rgb24")


def _tone(start: int, n: int, rate: int) -> av.AudioFrame:
    t = np.arange(start, start + n) / rate
    pcm = (0.2 * np.sin(2 * np.pi * (300 + 200 * ((t // 1) % 3)) * t)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
    frame.sample_rate, frame.pts = rate, start
    return frame


def _add_video(container, codec: str, fps: int, width: int, height: int, gop: int, bit_rate: int | None):
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.gop_size = gop
    if bit_rate:
        stream.bit_rate = bit_rate
    if codec == "libx264":
        stream.options = {"preset": "ultrafast", "bf": "0", "keyint": str(gop), "min-keyint": str(gop)}
    elif codec == "libvpx-vp9":
        stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    return stream


def _add_audio(container, codec: str):
    stream = container.add_stream(codec, rate=AUDIO_RATE)
    stream.layout = "mono"
    return stream


def encode_clip(
    fmt: str = "mp4",
    video: str | None = "libx264",
    audio: str | None = "aac",
    *,
    seconds: float = 2.0,
    width: int = 64,
    height: int = 48,
    fps: int = 10,
    gop: int | None = None,
    bit_rate: int | None = None,
) -> bytes:
    """A whole clip in memory: `fmt` "mp4", "webm", "matroska", "ipod" (m4a), ...; None drops a track."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        vs = _add_video(container, video, fps, width, height, gop or fps, bit_rate) if video else None
        aus = _add_audio(container, audio) if audio else None
        if vs is not None:
            for i in range(int(seconds * fps)):
                container.mux(vs.encode(_frame(i, width, height)))
            container.mux(vs.encode(None))
        if aus is not None:
            chunk = 960 if audio == "libopus" else 1024
            for start in range(0, int(seconds * AUDIO_RATE), chunk):
                container.mux(aus.encode(_tone(start, chunk, AUDIO_RATE)))
            container.mux(aus.encode(None))
    return buf.getvalue()


def write_long_video(
    out: BinaryIO,
    *,
    seconds: float,
    width: int = 1280,
    height: int = 720,
    fps: int = 25,
    gop_seconds: float = 2.0,
    video_bit_rate: int = 2_500_000,
    audio: bool = True,
    fmt: str = "mp4",
) -> dict:
    """Write a long H.264 (+ AAC) video to a seekable binary file by repeating one encoded GOP (remuxed
    with rising timestamps). Returns {"seconds", "keyframes", "video_packets", "audio_packets"}."""
    gop = max(1, int(round(gop_seconds * fps)))
    # one GOP plus a little: the audio encoder's priming packets are dropped below
    clip = encode_clip(
        fmt, "libx264", "aac" if audio else None, seconds=gop_seconds + 0.2, width=width, height=height,
        fps=fps, gop=gop, bit_rate=video_bit_rate,
    )  # fmt: skip
    src = av.open(io.BytesIO(clip))
    vin = src.streams.video[0]
    ain = src.streams.audio[0] if audio else None
    vpkts, apkts = [], []
    for p in src.demux():
        if p.size == 0:
            continue
        if p.stream is vin and len(vpkts) < gop:
            vpkts.append((bytes(p), p.pts, p.dts, p.is_keyframe))
        elif ain is not None and p.stream is ain:
            apkts.append((bytes(p), p.pts, p.duration))
    v_tb, span = vin.time_base, int(round(gop_seconds / vin.time_base))
    a_tb = ain.time_base if ain is not None else None
    if ain is not None:  # whole packets covering exactly one GOP after the first two (priming)
        step = apkts[1][2] or 1024
        per_gop = int(round(gop_seconds / (step * a_tb)))
        apkts = apkts[2 : 2 + per_gop]
    counts = {"video_packets": 0, "audio_packets": 0, "keyframes": 0}
    repeats = max(1, int(np.ceil(seconds / gop_seconds)))
    with av.open(out, "w", format=fmt) as container:
        vs = container.add_stream_from_template(vin)
        aus = container.add_stream_from_template(ain) if ain is not None else None
        a_next = 0
        for r in range(repeats):
            for data, pts, dts, key in vpkts:
                p = av.Packet(data)
                p.stream, p.time_base = vs, v_tb
                p.pts, p.dts = pts + r * span, dts + r * span
                p.is_keyframe = key
                container.mux(p)
                counts["video_packets"] += 1
                counts["keyframes"] += key
            if aus is not None:
                for data, _, duration in apkts:
                    p = av.Packet(data)
                    p.stream, p.time_base = aus, a_tb
                    p.pts = p.dts = a_next
                    p.duration = duration
                    a_next += duration
                    container.mux(p)
                    counts["audio_packets"] += 1
    src.close()
    return {"seconds": repeats * gop_seconds, **counts}
