"""Generated footage for the demo and tests: moving drawn shapes in the demo's colours, shot by shot,
with espeak-ng narration naming them, encoded in memory by PyAV (H.264/AAC in MP4, VP9/Opus in WebM, or
any codec pair FFmpeg's libraries here encode). Nothing touches disk but espeak-ng's pipe.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from streamtune.demo.data import COLOURS, SHAPES, draw_shape

FORMATS = {  # container -> (video codec, audio codec)
    "mp4": ("libx264", "aac"),
    "webm": ("libvpx-vp9", "libopus"),
    "matroska": ("libx264", "aac"),
}
SAMPLE_RATE = 16000


@dataclass
class Shot:
    start: float  # seconds
    colour: str
    shape: str
    background: tuple[int, int, int] = (235, 235, 235)


def frame(shot: Shot, t: float, size: tuple[int, int]) -> np.ndarray:
    """RGB frame of `shot` at `t` seconds into it: the shape slides left to right, one pass per 4 s."""
    w, h = size
    img = Image.new("RGB", size, shot.background)
    d = ImageDraw.Draw(img)
    s = h // 2
    x0 = int((w - s) * ((t / 4.0) % 1.0))
    y0 = (h - s) // 2
    fill = COLOURS[shot.colour]
    draw_shape(d, shot.shape, x0, y0, s, fill, bar=max(s // 7, 2))
    return np.asarray(img)


def speak(text: str, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """espeak-ng speech as 16 kHz mono float32."""
    import soundfile as sf

    from streamtune.decode.media import decode_audio
    from streamtune.demo.data import speak as espeak

    audio, rate = espeak(text, voice, speed)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return decode_audio(buf.getvalue(), SAMPLE_RATE)


def narration_track(seconds: float, lines: list[tuple[float, str]]) -> np.ndarray:
    """A quiet track of `seconds` with each (offset, text) spoken at its offset."""
    track = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    for at, text in lines:
        pcm = speak(text)
        i = int(at * SAMPLE_RATE)
        n = max(0, min(pcm.size, track.size - i))
        track[i : i + n] += pcm[:n]
    return track


def make_video(
    shots: list[Shot],
    seconds: float,
    narration: list[tuple[float, str]] | None = None,
    fmt: str = "mp4",
    size: tuple[int, int] = (160, 96),
    fps: int = 10,
    audio: bool = True,
    gop: int | None = None,
    audio_pcm: np.ndarray | None = None,
    options: dict | None = None,
) -> bytes:
    """Encode the shots (each runs until the next one starts) and, with `audio`, the narration (or
    `audio_pcm`, 16 kHz mono) into one file of container `fmt`. `gop`: frames between keyframes;
    `options`: muxer options (e.g. {"movflags": "frag_keyframe+empty_moov"} for fragmented MP4)."""
    import av

    vcodec, acodec = FORMATS[fmt]
    pcm = None
    if audio:
        pcm = audio_pcm if audio_pcm is not None else narration_track(seconds, narration or [])
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        if vcodec == "libx264":
            vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        elif vcodec == "libvpx-vp9":
            vs.options = {"deadline": "realtime", "cpu-used": "8"}
        if gop:
            vs.gop_size = gop
        streams = [(vs, _video_frames(shots, seconds, size, fps))]
        if pcm is not None:
            rate = 48000 if acodec == "libopus" else SAMPLE_RATE
            aus = out.add_stream(acodec, rate=rate)
            aus.layout = "mono"
            streams.append((aus, _audio_frames(pcm, rate)))
        for stream, frames in streams:
            for f in frames:
                for packet in stream.encode(f):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    return buf.getvalue()


def _video_frames(shots: list[Shot], seconds: float, size, fps: int):
    import av

    for i in range(int(round(seconds * fps))):
        t = i / fps
        shot = max((s for s in shots if s.start <= t + 1e-9), key=lambda s: s.start)
        f = av.VideoFrame.from_ndarray(frame(shot, t - shot.start, size), format="rgb24")
        f.pts = i
        yield f


def _audio_frames(pcm: np.ndarray, rate: int, chunk: int = 1024):
    import av

    if rate != SAMPLE_RATE:
        pcm = np.interp(np.arange(int(pcm.size * rate / SAMPLE_RATE)) * SAMPLE_RATE / rate,
                        np.arange(pcm.size), pcm).astype(np.float32)  # fmt: skip
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    for at in range(0, pcm16.size, chunk):
        f = av.AudioFrame.from_ndarray(pcm16[None, at : at + chunk], format="s16", layout="mono")
        f.sample_rate, f.pts = rate, at
        yield f


def demo_clip(rng: np.random.Generator, seconds: float = 12.0, shots: int = 3) -> tuple[bytes, list[Shot]]:
    """An MP4 (H.264/AAC) of `shots` shots of random colours and shapes, each named by the narrator as it
    appears; returns the bytes and the shots."""
    names = list(COLOURS)
    starts = [round(i * seconds / shots, 1) for i in range(shots)]
    picked = [(names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(len(SHAPES)))]) for _ in starts]
    backgrounds = [(235, 235, 235), (60, 60, 60), (200, 220, 240)]
    plan = [
        Shot(t, c, s, backgrounds[i % 3]) for i, (t, (c, s)) in enumerate(zip(starts, picked, strict=True))
    ]
    lines = [(shot.start + 0.5, f"now a {shot.colour} {shot.shape}") for shot in plan]
    return make_video(plan, seconds, lines, fmt="mp4"), plan
