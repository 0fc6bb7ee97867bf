"""Video -> timecoded segments: the audio track transcribed window by window, keyframes sampled every
`keyframe_every` seconds and at scene changes, embedded with CLIP, tagged and kept as small JPEGs.

Only what is needed is decoded: each sample time seeks to the keyframe before it (or decodes on when it
is close ahead), and the frames between two samples are decoded only when the two differ by more than
`scene_threshold` (mean absolute difference of small grayscale frames, 0..1), to find the first frame
of the new scene. The timeline is cut into segments of about `segment_seconds`, moved to the nearest
transcript segment boundary so speech is never split. A video that breaks off keeps the segments before
the damage; `VideoResult.error` (Reason.VIDEO_TRUNCATED) names the second where decoding stopped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from streamtune.config import DecodeConfig
from streamtune.decode.clip import bound_heap, trim_heap
from streamtune.decode.longform import transcribe_stream
from streamtune.decode.media import TRUNCATED_FRACTION, MediaError, iter_audio_windows, open_container
from streamtune.quarantine import Reason

GRAY_SIZE = (64, 36)  # scene-change score resolution
FRAME_BATCH = 16
THUMB_QUALITY = 75


@dataclass
class VideoSegment:
    index: int
    t0: float
    t1: float
    transcript: str | None = None
    segments: list[dict] = field(default_factory=list)  # speech, times absolute in the video
    language: str | None = None
    frame_times: list[float] = field(default_factory=list)
    thumbnails: list[bytes] = field(default_factory=list)
    frame_embeddings: np.ndarray | None = None  # (frames, dim), L2-normalised
    embedding: np.ndarray | None = None  # mean of frame_embeddings, re-normalised
    tags: list[tuple[str, float]] | None = None


@dataclass
class VideoResult:
    segments: list[VideoSegment]
    duration: float  # seconds decoded (the end of the last segment)
    has_audio: bool
    error: MediaError | None = None  # where decoding stopped, for a broken file
    stats: dict = field(default_factory=dict)


@dataclass
class _Sample:
    t: float
    gray: np.ndarray
    image: object  # PIL image about a CLIP input's size, dropped once embedded
    thumbnail: bytes
    scene: bool = False
    embedding: np.ndarray | None = None


class _Embedder:
    """CLIP embeddings of sampled frames, at most `FRAME_BATCH` at a time, so frames are not all held.
    ViT-B-32 on CPU embeds 16 frames per forward as fast as 32 (8: 3 % slower) and holds ~50 MB less
    activation memory; freed heap pages go back to the OS after each batch (`trim_heap`)."""

    def __init__(self, clip):
        self.clip = clip
        self.batch = min(clip.batch_size, FRAME_BATCH) if clip is not None else FRAME_BATCH
        self.pending: list[_Sample] = []

    def add(self, sample: _Sample) -> None:
        self.pending.append(sample)
        if self.clip is not None and len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.clip is not None and self.pending:
            emb = self.clip.embed_prepared([self.clip.prepare(s.image) for s in self.pending])
            for s, e in zip(self.pending, emb, strict=True):
                s.embedding = e
            trim_heap()
        for s in self.pending:
            s.image = None
        self.pending = []


def decode_video(
    src: bytes | BinaryIO,
    cfg: DecodeConfig,
    transcriber=None,
    clip=None,
) -> VideoResult:
    """Decode a video (bytes or a seekable binary file-like) into segments. `transcriber`
    (`whisper.Transcriber`) and `clip` (`clip.ClipEmbedder`) are optional: without them segments have no
    transcript / no embeddings and tags. Raises MediaError when nothing at all decodes."""
    stats = {"frames_sampled": 0, "frames_decoded": 0, "seeks": 0, "scene_changes": 0, "audio_seconds": 0.0}
    bound_heap()  # an hour of frames and PCM windows would otherwise grow the heap (bench.footage)
    with _open_video(src) as container:
        if not container.streams.video:
            raise MediaError(Reason.WRONG_CONTENT, f"no video stream in {container.format.name} container")
        has_audio = bool(container.streams.audio)
        declared = _declared_seconds(container)
    error: MediaError | None = None

    asr = {"text": "", "segments": [], "language": None, "seconds": 0.0}
    audio_end = None
    if has_audio:  # one pass: frames are sampled from the packets the audio pass demuxes anyway
        astats: dict = {}
        sampler = _PacketSampler(cfg, clip, stats)
        windows = iter_audio_windows(
            src, cfg.audio_window_seconds, max_ratio=cfg.max_decode_ratio, stats=astats, video=sampler.packet
        )  # fmt: skip
        try:
            asr = transcribe_stream(transcriber, windows, cfg.audio_window_seconds, astats)
        except MediaError as e:
            asr = astats.get("partial", asr)
            if e.kind == Reason.BOMB:
                raise
            audio_end = e.at if e.at is not None else asr["seconds"]
            error = MediaError(Reason.VIDEO_TRUNCATED, f"audio: {e.reason}", at=audio_end)
        stats["audio_seconds"] = asr["seconds"]
        stats["peak_pcm_bytes"] = astats.get("peak_pcm_bytes", 0)
        samples, video_end, verror = sampler.finish(declared)
    else:  # no audio to read the whole file for: seek from keyframe to keyframe
        samples, video_end, verror = _sample_frames(src, cfg, clip, declared, stats)
    if verror is not None and (error is None or verror.at < error.at):
        error = verror
    if not samples and error is None:
        raise MediaError(Reason.CORRUPT, "no video frame decodes")
    end = video_end
    if audio_end is not None:
        end = min(end, audio_end) if samples else audio_end
    elif error is None and asr["segments"]:
        end = max(end, asr["segments"][-1]["end"])
    speech = [s for s in asr["segments"] if s["start"] < end]
    segments = _cut(end, speech, cfg.segment_seconds)
    _fill(segments, speech, [s for s in samples if s.t < end], asr["language"], cfg, clip, stats)
    stats["segments"] = len(segments)
    return VideoResult(segments, end, has_audio, error, stats)


def _open_video(src):
    """The container; a file that looks like MP4/MOV or Matroska/WebM but does not open was cut off or
    damaged before its index (an MP4 whose `moov` was never written): VIDEO_TRUNCATED at 0 s."""
    try:
        return open_container(src)
    except MediaError as e:
        if e.kind != Reason.UNSUPPORTED:
            raise
        if isinstance(src, bytes | bytearray | memoryview):
            head = bytes(src[:12])
        else:
            src.seek(0)
            head = src.read(12)
        if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3":
            raise MediaError(
                Reason.VIDEO_TRUNCATED, f"decoding stopped at 0.00 s: {e.reason}", at=0.0
            ) from None
        raise


def _declared_seconds(container) -> float | None:
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


class _FrameReader:
    """Frames at requested times: decode on when the time is close ahead, else seek to the keyframe
    before it. `at(t)` is the first frame shown at or after `t` (half a frame's tolerance)."""

    def __init__(self, container, stats: dict, horizon: float):
        self.container = container
        self.stream = container.streams.video[0]
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.interval = 1.0 / float(rate) if rate else 1 / 25
        self.stats = stats
        self.horizon = horizon
        self.frames = None
        self.last = None  # (time, frame)
        self.end = 0.0  # end of the last frame seen (time + interval)
        self.key_t = None  # time of the last keyframe decoded
        self.gop = 0.0  # longest stretch seen without a keyframe: closer targets decode on, not seek

    def _seek(self, t: float) -> None:
        base = self.stream.time_base
        start = self.stream.start_time or 0
        self.container.seek(max(start, int(t / base) + start), stream=self.stream, backward=True)
        self.frames = self.container.decode(self.stream)
        self.last = self.key_t = None
        self.stats["seeks"] += 1

    def next(self):
        """The next decoded frame as (time, frame), or None at the end."""
        for frame in self.frames:
            if frame.time is None:
                continue
            self.stats["frames_decoded"] += 1
            self.last = (float(frame.time), frame)
            if frame.key_frame:
                self.key_t = self.last[0]
            elif self.key_t is not None:
                self.gop = max(self.gop, self.last[0] - self.key_t)
            self.end = max(self.end, self.last[0] + self.interval)
            return self.last
        return None

    def at(self, t: float):
        tol = self.interval / 2
        if (
            self.frames is None
            or self.last is None
            or self.last[0] > t + tol
            or t - self.last[0] > max(self.horizon, self.gop)
        ):
            self._seek(t)
        elif self.last[0] >= t - tol:
            return self.last
        while (got := self.next()) is not None:
            if got[0] >= t - tol:
                return got
        return None


def _sample_frames(src, cfg: DecodeConfig, clip, declared: float | None, stats: dict):
    import av

    samples: list[_Sample] = []
    error = None
    with open_container(src) as container:
        reader = _FrameReader(container, stats, horizon=min(2.0, cfg.keyframe_every))

        embedder = _Embedder(clip)

        def sample(t: float, frame, scene: bool = False) -> _Sample:
            return _make_sample(t, frame, cfg, clip, scene)

        def keep(s: _Sample) -> None:
            samples.append(s)
            embedder.add(s)

        t = 0.0
        try:
            while True:
                got = reader.at(t)
                if got is None:
                    break
                current = sample(got[0], got[1])
                if samples and _score(samples[-1].gray, current.gray) > cfg.scene_threshold:
                    change = _scan(reader, samples[-1], current, cfg.scene_threshold)
                    if change is not None:  # else a gradual change (motion, a fade): no cut to sample
                        if change[0] < current.t - reader.interval / 2:
                            keep(sample(change[0], change[1], scene=True))
                        else:
                            current.scene = True
                        stats["scene_changes"] += 1
                if not samples or current.t > samples[-1].t + reader.interval / 2:
                    keep(current)
                t = max(t + cfg.keyframe_every, current.t + reader.interval)
            # decode to the end, to know where the video stops (at most one sampling interval of frames)
            while reader.frames is not None and reader.next() is not None:
                pass
        except av.FFmpegError as e:
            error = MediaError(
                Reason.VIDEO_TRUNCATED, f"video breaks after {reader.end:.2f} s ({e})", at=reader.end
            )
        embedder.flush()
    end = reader.end
    if error is None and declared and declared > 1.0 and end < TRUNCATED_FRACTION * declared:
        error = MediaError(
            Reason.VIDEO_TRUNCATED, f"video decodes to {end:.2f} s of a declared {declared:.2f} s", at=end
        )
    stats["frames_sampled"] += len(samples)
    return samples, end, error


def _make_sample(t: float, frame, cfg: DecodeConfig, clip, scene: bool = False) -> _Sample:
    side = getattr(clip, "image_size", 224)
    image = frame.to_image()
    w, h = image.size
    scale = max(side, cfg.thumbnail_width) / max(1, min(w, h))
    if scale < 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    return _Sample(t, _gray(frame), image, _thumbnail(image, cfg.thumbnail_width), scene)


class _PacketSampler:
    """The keyframe sampling of `_sample_frames` from packets of the audio's demux pass (no second pass,
    no seeks). Packets are grouped by GOP (keyframe to keyframe); a finished GOP is decoded only when the
    next sample time falls in it, and the last GOP always (where the video stops). The GOPs since the
    last sample stay as packets, at most `SCAN_BYTES`, for the scene-change scan between two samples
    that differ, which runs once the GOP holding the later sample is done."""

    SCAN_BYTES = 64 << 20

    def __init__(self, cfg: DecodeConfig, clip, stats: dict):
        self.cfg, self.clip, self.stats = cfg, clip, stats
        self.embedder = _Embedder(clip)
        self.samples: list[_Sample] = []
        self.gops: list[list] = []  # packets since the GOP of the last sample, the current GOP last
        self.held = 0  # bytes of packets in `gops`
        self.stream = None
        self.interval = 1 / 25
        self.next_t = 0.0
        self.end = 0.0
        self.error: MediaError | None = None
        self.done = False
        import av

        self._av_error = av.FFmpegError

    def packet(self, packet) -> None:
        if self.done or self.error is not None:
            return
        if self.stream is None:
            self.stream = packet.stream
            rate = self.stream.average_rate or self.stream.guessed_rate
            self.interval = 1.0 / float(rate) if rate else 1 / 25
        try:
            if packet.size == 0:  # end of stream
                self._gop_done(final=True)
                self.done = True
                return
            if packet.pts is None:
                return
            if packet.is_keyframe and self.gops and self.gops[-1]:
                self._gop_done(final=False)
                self.gops.append([])
            elif not self.gops:
                self.gops.append([])
            self.gops[-1].append(packet)
            self.held += packet.size
            while self.held > self.SCAN_BYTES and len(self.gops) > 1:
                self.held -= sum(p.size for p in self.gops.pop(0))
        except (self._av_error, ValueError) as e:
            self.error = MediaError(
                Reason.VIDEO_TRUNCATED, f"video breaks after {self.end:.2f} s ({e})", at=self.end
            )

    def finish(self, declared: float | None) -> tuple[list[_Sample], float, MediaError | None]:
        """Samples (embedded), where the video ends, and the error where it broke off, if it did."""
        if not self.done and self.error is None and self.gops:  # the pass stopped early (audio broke)
            last = [float(p.pts * p.time_base) for p in self.gops[-1]]
            self.end = max([self.end, *(t + self.interval for t in last)])
        self.embedder.flush()
        self.gops, self.held = [], 0
        end, error = self.end, self.error
        if error is None and declared and declared > 1.0 and end < TRUNCATED_FRACTION * declared:
            error = MediaError(
                Reason.VIDEO_TRUNCATED, f"video decodes to {end:.2f} s of a declared {declared:.2f} s", at=end
            )
        self.samples.sort(key=lambda s: s.t)
        self.stats["frames_sampled"] += len(self.samples)
        return self.samples, end, error

    def _frames(self, gops: list[list]):
        """Decoded (time, frame) of consecutive GOPs, in presentation order."""
        cc = self.stream.codec_context
        cc.flush_buffers()
        for gop in gops:
            for packet in gop:
                for frame in cc.decode(packet):
                    yield from self._timed(frame)
        for frame in cc.decode(None):
            yield from self._timed(frame)

    def _timed(self, frame):
        if frame.pts is None:
            return
        t = float(frame.pts * self.stream.time_base)
        self.stats["frames_decoded"] += 1
        self.end = max(self.end, t + self.interval)
        yield t, frame

    def _gop_done(self, final: bool) -> None:
        if not self.gops or not self.gops[-1]:
            return
        gop = self.gops[-1]
        tol = self.interval / 2
        last = max(float(p.pts * p.time_base) for p in gop)
        if not final and last < self.next_t - tol:  # no sample in it: not decoded
            self.end = max(self.end, last + self.interval)
            return
        cfg, samples = self.cfg, self.samples
        scans, kept = [], False
        for t, frame in self._frames([gop]):
            if t < self.next_t - tol:
                continue
            current = _make_sample(t, frame, cfg, self.clip)
            if samples and _score(samples[-1].gray, current.gray) > cfg.scene_threshold:
                scans.append((samples[-1], current))
            if not samples or current.t > samples[-1].t + tol:
                self._keep(current)
                kept = True
            self.next_t = max(self.next_t + cfg.keyframe_every, current.t + self.interval)
        for before, after in scans:
            change = self._scan(before, after)
            if change is None:  # a gradual change (motion, a fade): no cut to sample
                continue
            if change[0] < after.t - tol:
                self._keep(_make_sample(change[0], change[1], cfg, self.clip, scene=True))
            else:
                after.scene = True
            self.stats["scene_changes"] += 1
        if kept:  # later scans start at this GOP's sample: no earlier GOP is needed
            self.gops, self.held = [gop], sum(p.size for p in gop)

    def _keep(self, sample: _Sample) -> None:
        self.samples.append(sample)
        self.embedder.add(sample)

    def _scan(self, before: _Sample, after: _Sample):
        """`_scan` over the GOPs held as packets: the largest jump between neighbouring frames."""
        tol = self.interval / 2
        first = 0
        for i, gop in enumerate(self.gops):
            if min(float(p.pts * p.time_base) for p in gop) <= before.t + tol:
                first = i
        prev, best, best_score = None, None, self.cfg.scene_threshold
        for t, frame in self._frames(self.gops[first:]):
            if t < before.t - tol:
                continue
            if t > after.t + tol:
                break
            gray = _gray(frame)
            if prev is not None:
                score = _score(prev, gray)
                if score > best_score:
                    best, best_score = (t, frame), score
            prev = gray
            if t >= after.t - tol:
                break
        return best


def _scan(reader: _FrameReader, before: _Sample, after: _Sample, threshold: float):
    """The first frame of the new scene between two samples that differ: decode the frames between them
    and take the largest jump between neighbours. Leaves the reader at `after`."""
    got = reader.at(before.t)
    prev = _gray(got[1]) if got else before.gray
    best, best_score = None, threshold
    while (got := reader.next()) is not None and got[0] <= after.t + reader.interval / 2:
        gray = _gray(got[1])
        score = _score(prev, gray)
        if score > best_score:
            best, best_score = (got[0], got[1]), score
        prev = gray
        if got[0] >= after.t - reader.interval / 2:
            break
    return best


def _gray(frame) -> np.ndarray:
    return frame.reformat(width=GRAY_SIZE[0], height=GRAY_SIZE[1], format="gray").to_ndarray()


def _score(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255.0


def _cut(end: float, speech: list[dict], target: float) -> list[VideoSegment]:
    """Segments of about `target` seconds over [0, end]; a cut inside speech moves to the nearer edge
    of that speech segment (the later one if the earlier would make an empty segment)."""
    cuts = [0.0]
    while cuts[-1] + target < end - target / 4:
        at = cuts[-1] + target
        for s in speech:
            if s["start"] < at < s["end"]:
                near = s["start"] if at - s["start"] < s["end"] - at else s["end"]
                at = near if near > cuts[-1] + 1.0 else s["end"]
                break
        if at >= end:
            break
        cuts.append(at)
    cuts.append(max(end, cuts[-1]))
    return [
        VideoSegment(i, round(a, 3), round(b, 3))
        for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
    ]


def _fill(
    segments: list[VideoSegment], speech: list[dict], samples: list[_Sample], language, cfg, clip, stats
) -> None:
    for seg in segments:
        last = seg is segments[-1]

        def inside(t: float, seg=seg, last=last) -> bool:
            return seg.t0 <= t < seg.t1 or (last and t >= seg.t1)

        seg.segments = [s for s in speech if inside(s["start"])]
        seg.transcript = (
            " ".join(s["text"] for s in seg.segments).strip() if language or seg.segments else None
        )
        seg.language = language
        picked = [i for i, s in enumerate(samples) if inside(s.t)]
        seg.frame_times = [round(samples[i].t, 4) for i in picked]
        seg.thumbnails = [samples[i].thumbnail for i in picked]
        if clip is not None and picked:
            seg.frame_embeddings = np.stack([samples[i].embedding for i in picked])
            mean = seg.frame_embeddings.mean(axis=0)
            seg.embedding = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
            seg.tags = clip.tag(seg.embedding[None, :], cfg.top_k)[0]


def _thumbnail(image, width: int) -> bytes:
    w, h = image.size
    small = image.resize((width, max(1, round(h * width / w))))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()
