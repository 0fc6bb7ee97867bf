"""Media bytes -> arrays, in memory.

Audio of any container/codec FFmpeg knows (wav, flac, mp3, ogg/opus, m4a/aac, webm) becomes 16 kHz mono
float32 through PyAV; images (jpeg, png, webp, gif, bmp, tiff) become RGB through Pillow. Nothing touches
disk and nothing spawns a process. Every failure is a `MediaError` whose `kind` says why, so callers can
quarantine the file with a reason instead of crashing.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from streamtune.quarantine import Reason
from streamtune.sniff import sniff

_FLOAT_FORMATS = frozenset({"flt", "fltp", "dbl", "dblp"})

# A file that decodes to noticeably less than its header declares is truncated.
TRUNCATED_FRACTION = 0.9


class MediaError(ValueError):
    """Undecodable media. `kind` is the quarantine `Reason` (empty, truncated, unsupported, bomb,
    wrong_content, too_long or corrupt), `reason` the detail, `at` the second where decoding stopped
    (streamed media only)."""

    def __init__(self, kind: Reason, message: str, at: float | None = None):
        if not isinstance(kind, Reason):
            raise TypeError(f"MediaError kind must be a Reason, not {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.reason = message
        self.at = at


# ------------------------------------------------------------------------------------------------ audio


def decode_audio(data: bytes, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Decode any common audio container to mono float32 at `sample_rate`, in memory."""
    if not data:
        raise MediaError(Reason.EMPTY, "zero-byte audio")
    kind = sniff(data)
    if kind in ("image", "text"):
        raise MediaError(Reason.WRONG_CONTENT, f"expected audio, bytes look like {kind}")
    _check_wav_size(data)
    try:
        return _decode_av(data, sample_rate, max_seconds)
    except MediaError as err:
        if err.kind not in (Reason.UNSUPPORTED, Reason.CORRUPT):
            raise
        first = err
    try:  # libsndfile knows a few WAV/AIFF sub-formats FFmpeg's demuxers reject
        audio = _decode_soundfile(data, sample_rate, max_seconds)
    except MediaError:
        raise first from None
    if not np.isfinite(audio).all():
        raise MediaError(Reason.CORRUPT, "audio contains NaN or infinite samples")
    return audio


def _check_wav_size(data: bytes) -> None:
    """FFmpeg silently decodes a cut WAV; its `data` chunk header says how many bytes should follow."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WAVE"):
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"data":
            # Streaming writers leave 0 or 0x7fff.../0xffff... when the length was unknown.
            if 0 < size < 0x7FFF0000 and len(data) - (pos + 8) < TRUNCATED_FRACTION * size:
                raise MediaError(
                    Reason.TRUNCATED, f"WAV declares {size} data bytes, {len(data) - pos - 8} present"
                )
            return
        pos += 8 + size + (size & 1)
    if pos > len(data) + 8:
        raise MediaError(Reason.TRUNCATED, "WAV chunk list runs past the end of the file")


def _decode_av(data: bytes, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(Reason.UNSUPPORTED, f"not a readable audio container ({e})") from None
    with container:
        if not container.streams.audio:
            raise MediaError(Reason.WRONG_CONTENT, f"no audio stream in {container.format.name} container")
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise MediaError(Reason.TOO_LONG, f"{declared:.1f} s exceeds the {max_seconds:.0f} s limit")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        limit = None if max_seconds is None else int(max_seconds * sample_rate) + sample_rate
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples; broken timestamps must not matter
                if frame.format.name in _FLOAT_FORMATS and not np.isfinite(frame.to_ndarray()).all():
                    raise MediaError(Reason.CORRUPT, "audio contains NaN or infinite samples")
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if limit is not None and total > limit:
                    raise MediaError(Reason.TOO_LONG, f"more than {max_seconds:.0f} s of audio")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            if not chunks:
                raise MediaError(Reason.CORRUPT, f"audio stream does not decode ({e})") from None
            raise MediaError(
                Reason.TRUNCATED, f"audio stream breaks after {total / sample_rate:.2f} s ({e})"
            ) from None
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise MediaError(Reason.TRUNCATED if declared else Reason.EMPTY, "no audio samples decoded")
    got = audio.size / sample_rate
    if declared and declared > 0.5 and got < TRUNCATED_FRACTION * declared:
        raise MediaError(Reason.TRUNCATED, f"decoded {got:.2f} s of a declared {declared:.2f} s")
    if not np.isfinite(audio).all():
        raise MediaError(Reason.CORRUPT, "audio contains NaN or infinite samples")
    return audio


def open_container(src: bytes | BinaryIO):
    """A PyAV input container over bytes or a seekable binary file-like (rewound first)."""
    import av

    if isinstance(src, bytes | bytearray | memoryview):
        if not len(src):
            raise MediaError(Reason.EMPTY, "zero-byte media")
        fileobj: BinaryIO = io.BytesIO(bytes(src))
    else:
        fileobj = src
        fileobj.seek(0)
    try:
        return av.open(fileobj, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(Reason.UNSUPPORTED, f"not a readable media container ({e})") from None


def source_size(src: bytes | BinaryIO) -> int:
    """Byte size of bytes or of a seekable file-like (its position is kept)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return len(src)
    size = getattr(src, "size", None)
    if isinstance(size, int):
        return size
    here = src.tell()
    try:
        return src.seek(0, io.SEEK_END)
    finally:
        src.seek(here)


def iter_audio_windows(
    src: bytes | BinaryIO,
    window_s: float,
    sample_rate: int = 16000,
    *,
    max_ratio: float | None = None,
    min_bomb_bytes: int = 256 << 20,
    stats: dict | None = None,
    video: Callable[[object], None] | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Stream the first audio track of any container (a video's too) as (t0, mono float32) windows of
    `window_s` seconds (the last one shorter); t0 counts resampled samples, like `decode_audio`, whose
    output equals the windows concatenated. At most one window plus one decoded frame is held.

    Decompression-bomb guard: more than `max_ratio` decoded bytes per input byte (once past
    `min_bomb_bytes`) raises BOMB. A stream that breaks, or ends well before its declared duration, raises
    TRUNCATED after the windows before the damage, with `at` = seconds decoded. `stats` (optional) gets
    `peak_pcm_bytes`, `seconds`, `input_bytes`.

    `video` (optional) receives every packet of the first video stream from the same demux pass, in file
    order, the stream's end-of-stream packet (size 0) last: a video's frames are sampled from the bytes
    the audio needs anyway (the tracks are interleaved across the whole file). It must not raise.
    """
    import av

    window = max(1, int(round(window_s * sample_rate)))
    in_bytes = max(1, source_size(src))
    stats = stats if stats is not None else {}
    stats.setdefault("peak_pcm_bytes", 0)
    stats["input_bytes"] = in_bytes
    container = open_container(src)
    with container:
        if not container.streams.audio:
            raise MediaError(Reason.WRONG_CONTENT, f"no audio stream in {container.format.name} container")
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        streams = [stream, *(container.streams.video[:1] if video is not None else [])]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        held = emitted = 0

        def take(outs) -> Iterator[tuple[float, np.ndarray]]:
            nonlocal held, emitted
            for out in outs:
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                held += chunks[-1].size
                stats["peak_pcm_bytes"] = max(stats["peak_pcm_bytes"], held * 4)
                out_bytes = (emitted + held) * 4
                if max_ratio is not None and out_bytes > min_bomb_bytes and out_bytes > max_ratio * in_bytes:
                    raise MediaError(
                        Reason.BOMB,
                        f"{out_bytes} decoded bytes from {in_bytes} input bytes exceed {max_ratio:g}x",
                        at=emitted / sample_rate,
                    )
                while held >= window:
                    pcm = np.concatenate(chunks)
                    head, rest = pcm[:window], pcm[window:]
                    chunks[:] = [rest] if rest.size else []
                    held = rest.size
                    if not np.isfinite(head).all():
                        raise MediaError(Reason.CORRUPT, "audio contains NaN or infinite samples")
                    yield emitted / sample_rate, head
                    emitted += head.size

        try:
            for packet in container.demux(*streams):
                if packet.stream.index != stream.index:
                    video(packet)
                    continue
                for frame in packet.decode():
                    frame.pts = None  # the resampler counts samples; broken timestamps must not matter
                    yield from take(resampler.resample(frame))
            yield from take(resampler.resample(None))
        except av.FFmpegError as e:
            got = (emitted + held) / sample_rate
            if held:
                yield emitted / sample_rate, np.concatenate(chunks)
                emitted += held
            if not emitted:
                raise MediaError(Reason.CORRUPT, f"audio stream does not decode ({e})", at=0.0) from None
            raise MediaError(
                Reason.TRUNCATED, f"audio stream breaks after {got:.2f} s ({e})", at=got
            ) from None
        if held:
            tail = np.concatenate(chunks)
            if not np.isfinite(tail).all():
                raise MediaError(Reason.CORRUPT, "audio contains NaN or infinite samples")
            yield emitted / sample_rate, tail
            emitted += held
    got = emitted / sample_rate
    stats["seconds"] = got
    if emitted == 0:
        raise MediaError(Reason.TRUNCATED if declared else Reason.EMPTY, "no audio samples decoded", at=0.0)
    if declared and declared > 0.5 and got < TRUNCATED_FRACTION * declared:
        raise MediaError(Reason.TRUNCATED, f"decoded {got:.2f} s of a declared {declared:.2f} s", at=got)


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if stream.frames and stream.sample_rate:
        return stream.frames / stream.sample_rate
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _decode_soundfile(data: bytes, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    import av
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if max_seconds is not None and f.frames > (max_seconds + 1) * f.samplerate:
                seconds = f.frames / f.samplerate
                raise MediaError(Reason.TOO_LONG, f"{seconds:.1f} s exceeds {max_seconds:.0f} s")
            pcm = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(Reason.UNSUPPORTED, f"libsndfile cannot read it ({e})") from None
    mono = np.ascontiguousarray(pcm.mean(axis=1, dtype=np.float32))
    if mono.size == 0:
        raise MediaError(Reason.EMPTY, "no audio samples decoded")
    if rate == sample_rate:
        return mono
    frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    outs = list(resampler.resample(frame)) + list(resampler.resample(None))
    return np.concatenate([o.to_ndarray().reshape(-1) for o in outs]).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, max_pixels: int = 64_000_000, min_side: int | None = None) -> Image.Image:
    """Decode an image to RGB with EXIF orientation applied (first frame of animations).

    The declared size is checked against `max_pixels` from the header, before any pixel is allocated.
    With `min_side`, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    at least that long: a model that resizes to 224 px need not decode all 12 MP of a photo.
    """
    if not data:
        raise MediaError(Reason.EMPTY, "zero-byte image")
    kind = sniff(data)
    if kind in ("audio", "text"):
        raise MediaError(Reason.WRONG_CONTENT, f"expected an image, bytes look like {kind}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise MediaError(Reason.CORRUPT, f"image declares {width}x{height} pixels")
            if width * height > max_pixels:
                raise MediaError(Reason.BOMB, f"{width}x{height} exceeds the {max_pixels} pixel limit")
            img.seek(0)
            if min_side and img.format == "JPEG":
                img.draft(None, (min_side, min_side))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(Reason.BOMB, str(e)) from None
    except Image.UnidentifiedImageError:
        raise MediaError(Reason.UNSUPPORTED, "not an image format Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        text = str(e)
        kind = Reason.TRUNCATED if "truncated" in text or isinstance(e, EOFError) else Reason.CORRUPT
        raise MediaError(kind, f"image does not decode ({text or type(e).__name__})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        peak = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
