"""Raw shards -> feature shards (transcripts, CLIP embeddings, tags) plus a quarantine table.

One feature shard per raw shard, same file name. Each is keyed by the raw shard's checksum and the decode
settings (`DecodeConfig.key()`); a marker `_decode/<shard>.json` records the key, entry and quarantine
records once the shard is written, so a rerun skips decoded shards and a changed model re-decodes them.
`commit_features` writes `quarantine.parquet`, then `index.json` last. See README.md in this folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from streamtune import quarantine as quarantine_table
from streamtune import storage
from streamtune.config import DecodeConfig
from streamtune.decode.media import MediaError, decode_audio, decode_image, iter_audio_windows
from streamtune.quarantine import Reason
from streamtune.sniff import AUDIO_EXT, IMAGE_EXT, JSON_EXT, TEXT_EXT
from streamtune.stream.remote_file import ObjectChanged, open_ref

CODE_VERSION = "decode-3"  # 3: video segment columns, long audio streamed instead of quarantined
VIDEO_EXT = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
MARKER_DIR = "_decode"
QUARANTINE_NAME = "quarantine.parquet"
SAFE_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def local_fingerprint(ref: str | None) -> str | None:
    """Size and mtime of a local model's files, so replacing weights in place re-decodes."""
    if not ref or not os.path.exists(os.path.expanduser(ref)):
        return None
    path = os.path.expanduser(ref)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
    )  # fmt: skip
    return hashlib.sha256(
        "".join(
            f"{os.path.relpath(f, path)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))};" for f in files
        ).encode()
    ).hexdigest()[:16]


def features_schema(clip_dim: int, token_dims: dict[str, int] | None = None) -> pa.Schema:
    """Feature columns; with `token_dims` ({kind: width}) also `image_tokens` / `audio_tokens`:
    list<fixed_size_list<float16, width>>, one (tokens, width) tensor per sample (null without the medium)."""
    tokens = [pa.field(f"{k}_tokens", token_type(d)) for k, d in sorted((token_dims or {}).items())]
    return pa.schema(
        [
            pa.field("sample_id", pa.string()),
            pa.field("text", pa.string()),
            pa.field("meta", pa.string()),
            pa.field("sources", pa.list_(pa.string())),
            pa.field("transcript", pa.string()),
            pa.field("segments", pa.string()),
            pa.field("language", pa.string()),
            pa.field("audio_seconds", pa.float32()),
            pa.field("clip_embedding", pa.list_(pa.float32(), clip_dim)),
            pa.field("tags", pa.list_(pa.string())),
            pa.field("tag_scores", pa.list_(pa.float32())),
            # video segments (null for other rows): one row per segment, linked by sample_id + t0/t1
            pa.field("segment_index", pa.int32()),
            pa.field("t0", pa.float64()),
            pa.field("t1", pa.float64()),
            pa.field("frame_times", pa.list_(pa.float32())),
            pa.field("frame_embeddings", pa.list_(pa.list_(pa.float32(), clip_dim))),
            pa.field("thumbnails", pa.list_(pa.binary())),
            *tokens,
        ]
    )


def token_type(width: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float16(), int(width)))


def token_column(arrays: list[np.ndarray | None], width: int) -> pa.Array:
    """One row per sample: its (tokens, width) float16 array, or null."""
    lengths = [0 if a is None else len(a) for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [np.asarray(a, np.float16).reshape(-1, width) for a in arrays if a is not None]
    flat = np.concatenate(present) if present else np.zeros((0, width), np.float16)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), int(width))
    mask = pa.array([a is None for a in arrays])
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _new_stats() -> dict[str, float]:
    keys = ("samples", "features", "quarantined", "audio_files", "audio_seconds", "windows", "images",
            "texts", "model_seconds", "decode_seconds", "shards", "skipped_shards",
            "derived_shards", "videos", "segments", "video_seconds", "frames_sampled",
            "streamed_audio")  # fmt: skip
    return {k: 0 for k in keys}


class Decoder:
    """Decodes raw tables into feature tables. Models load on first use; `stats` counts model work.

    One Decoder may serve several threads (mapped tasks sharing loaded models): media decoding runs
    concurrently, model calls take turns.
    """

    # Model work is flushed once this much decoded audio or this many images are pending (bounded memory).
    pending_audio_seconds = 600.0
    read_range_bytes = 8 << 20  # raw shards stream in ranges of about this size (decode_shard)

    def __init__(self, cfg: DecodeConfig):
        self.cfg = cfg
        self._transcriber = None
        self._clip = None
        self._lock = threading.RLock()
        self.stats = _new_stats()
        self.clip_dim = _clip_dim(cfg.clip_model)
        self.spec = _media_spec(cfg)
        self.token_dims = {k: s["dim"] for k, s in self.spec.items()}
        self._image_tokens = self._audio_tokens = None
        self.peak_pcm_bytes = 0  # largest PCM buffer a streamed recording held

    @property
    def transcriber(self):
        with self._lock:
            if self._transcriber is None:
                from streamtune.decode.whisper import Transcriber

                self._transcriber = Transcriber(
                    self.cfg.whisper_model, self.cfg.language, self.cfg.audio_batch, self.cfg.cache_dir
                )
            return self._transcriber

    @property
    def clip(self):
        with self._lock:
            if self._clip is None:
                from streamtune.decode.clip import ClipEmbedder

                clip = ClipEmbedder(
                    self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.labels, self.cfg.image_batch
                )
                clip.release_text()  # decode embeds images only and tags them against fixed labels
                self._clip = clip
            return self._clip

    @property
    def image_tokens(self):
        with self._lock:
            if self._image_tokens is None:
                from streamtune.decode.tokens import ImageTokens

                cfg = self.cfg
                self._image_tokens = ImageTokens(self.clip, cfg.image_layer, cfg.image_pool, cfg.image_merge)
            return self._image_tokens

    @property
    def audio_tokens(self):
        with self._lock:
            if self._audio_tokens is None:
                from streamtune.decode.tokens import AudioTokens

                cfg = self.cfg
                self._audio_tokens = AudioTokens(
                    cfg.whisper_model, cfg.audio_layer, cfg.audio_factor, cfg.audio_pool, cfg.cache_dir,
                    whisper=self.transcriber.model, context=cfg.audio_context,
                )  # fmt: skip
            return self._audio_tokens

    def schema(self) -> pa.Schema:
        return features_schema(self.clip_dim, self.token_dims)

    def decode_table(self, raw: pa.Table, storage_options: dict | None = None) -> tuple[pa.Table, list[dict]]:
        """Decode every row; rows with any undecodable part become quarantine records instead.
        A video becomes one row per segment; `storage_options` open media referenced by URL (`refs`)."""
        table, quarantine, _ = self.decode_table_stats(raw, storage_options)
        return table, quarantine

    def decode_table_stats(
        self, raw: pa.Table, storage_options: dict | None = None
    ) -> tuple[pa.Table, list[dict], dict]:
        """`decode_table` plus the counters of this call alone."""
        t0 = time.perf_counter()
        stats = _new_stats()
        rows: list[dict] = []
        quarantine: list[dict] = []
        pending: list[dict] = []
        pending_seconds, pending_images = 0.0, 0
        for row in _iter_rows(raw):
            stats["samples"] += 1
            decoded, errors = self._decode_row(row, stats, storage_options)
            quarantine.extend(decoded.pop("notes", None) or [])  # the sample itself goes on
            if errors:
                quarantine.extend(errors)
                stats["quarantined"] += 1
                _close(decoded)
                continue
            pending.append(decoded)
            pending_seconds += decoded["audio"].size / 16000 if decoded["audio"] is not None else 0.0
            pending_images += decoded["pixels"] is not None
            streamed = decoded.get("video_src") is not None or decoded.get("audio_src") is not None
            full = pending_seconds >= self.pending_audio_seconds or pending_images >= 4 * self.cfg.image_batch
            if full or streamed:
                rows.extend(self._run_models(pending, stats, quarantine))
                pending, pending_seconds, pending_images = [], 0.0, 0
        rows.extend(self._run_models(pending, stats, quarantine))
        stats["features"] = len(rows)
        stats["decode_seconds"] = time.perf_counter() - t0
        with self._lock:
            for k, v in stats.items():
                self.stats[k] += v
        return self._to_table(rows), quarantine, stats

    def _decode_row(
        self, row: dict, stats: dict, storage_options: dict | None = None
    ) -> tuple[dict, list[dict]]:
        sid, sources = row["sample_id"], row["sources"]
        errors: list[dict] = []
        decoded = {"sample_id": sid, "sources": sources, "text": None, "meta": row["meta"]}
        decoded |= {"audio": None, "pixels": None, "audio_src": None, "video_src": None}

        def fail(modality: str, reason: Reason, message: str) -> None:
            key = _source_key(sources, modality, sid)
            errors.append(quarantine_table.record(sid, key, "decode", reason, message, modality=modality))

        if not sid:
            fail("row", Reason.BAD_ROW, "sample has no sample_id")
        text = None
        if row["text"] is not None:
            try:
                text = row["text"].decode("utf-8")
            except UnicodeDecodeError as e:
                fail("text", Reason.ENCODING, f"text is not valid UTF-8 ({e.reason} at byte {e.start})")
        meta = row["meta"]
        if meta is not None:
            try:
                parsed = json.loads(meta)
                if not isinstance(parsed, dict):
                    raise ValueError(f"expected a JSON object, got {type(parsed).__name__}")
            except (ValueError, UnicodeDecodeError) as e:
                fail("meta", Reason.BROKEN_SIDECAR, f"metadata row is unusable: {e}")
        media = {"audio": row["audio"], "image": row["image"], "video": row["video"]}
        for ref in row["refs"]:
            modality = ref.get("modality")
            if modality not in media or media[modality] is not None:
                fail(str(modality), Reason.MEDIA_REF, f"unusable reference {ref.get('key')!r}")
                continue
            try:
                media[modality] = open_ref(ref, storage_options)
            except ObjectChanged as e:
                fail(modality, Reason.SOURCE_CHANGED, str(e))
            except (OSError, ValueError) as e:
                fail(modality, Reason.UNREADABLE, f"{ref.get('url')}: {e}")
        audio = pixels = None
        if media["video"] is not None:
            decoded["video_src"] = media["video"]  # decoded with the models (`_run_models`)
            decoded["notes"] = self._extra_media(sid, sources, media)
        elif media["audio"] is not None:
            stats["audio_files"] += 1
            audio, decoded["audio_src"] = self._audio(media["audio"], fail)
        if media["image"] is not None and media["video"] is None:
            try:
                data = media["image"] if isinstance(media["image"], bytes) else media["image"].read()
                image = decode_image(data, self.cfg.max_pixels, min_side=self.clip.image_size)
                pixels = self.clip.prepare(image)
            except MediaError as e:
                fail("image", e.kind, e.reason)
        has_stream = decoded["audio_src"] is not None or decoded["video_src"] is not None
        if not errors and audio is None and pixels is None and not has_stream and not text and not meta:
            fail("row", Reason.EMPTY, "sample has no audio, image, video, text or metadata")
        return decoded | {"text": text, "audio": audio, "pixels": pixels}, errors

    @staticmethod
    def _extra_media(sid: str, sources: list[str], media: dict) -> list[dict]:
        """Records for a video sample's separate audio/image files, which are not decoded (the sample's
        rows are the video's segments); referenced ones are closed unread."""
        notes = []
        for modality in ("audio", "image"):
            if media[modality] is None:
                continue
            _close({"audio_src": media[modality]})
            key = _source_key(sources, modality, sid)
            message = f"{key}: the sample's video is decoded into segments, its separate {modality} is not"
            notes.append(
                quarantine_table.record(sid, key, "decode", Reason.EXTRA_MEDIA, message, modality=modality)
            )
        return notes

    def _audio(self, src, fail) -> tuple[np.ndarray | None, Any]:
        """Short audio decoded whole (as always); a recording longer than `audio_window_seconds`, or one
        read by reference, is left as a source to stream window by window in `_run_models`. Audio encoder
        tokens need the whole clip: with them, recordings up to `max_audio_seconds` are decoded whole."""
        if "audio" in self.spec:
            try:
                data = src if isinstance(src, bytes) else src.read()
                return decode_audio(data, 16000, max_seconds=self.cfg.max_audio_seconds), None
            except MediaError as e:
                fail("audio", e.kind, e.reason)
            except ObjectChanged as e:
                fail("audio", Reason.SOURCE_CHANGED, str(e))
            finally:
                _close({"audio_src": src})
            return None, None
        if not isinstance(src, bytes):
            return None, src
        try:
            return decode_audio(src, 16000, max_seconds=self.cfg.audio_window_seconds), None
        except MediaError as e:
            if e.kind == Reason.TOO_LONG:
                return None, src
            fail("audio", e.kind, e.reason)
        return None, None

    def _run_models(
        self, pending: list[dict], stats: dict, quarantine: list[dict] | None = None
    ) -> list[dict]:
        quarantine = quarantine if quarantine is not None else []
        out: list[dict] = []
        for r in pending:
            if r.get("audio_src") is not None:
                self._stream_audio(r, stats, quarantine)
            if r.get("video_src") is not None:
                out.extend(self._video(r, stats, quarantine))
            elif not r.get("failed"):
                out.append(r)
        pending = out
        with_audio = [r for r in pending if r["audio"] is not None]
        with_image = [r for r in pending if r["pixels"] is not None]
        with self._lock:
            if with_audio and not self.cfg.transcribe:
                for r in with_audio:  # no transcript: the duration only
                    seconds = r["audio"].size / 16000
                    r["asr"] = {"text": None, "segments": [], "language": None, "seconds": seconds}
                stats["audio_seconds"] += sum(r["asr"]["seconds"] for r in with_audio)
            elif with_audio:
                windows, seconds = self.transcriber.stats["windows"], self.transcriber.stats["model_seconds"]
                outs = self.transcriber.transcribe([r["audio"] for r in with_audio])
                for r, out in zip(with_audio, outs, strict=True):
                    r["asr"] = out
                stats["windows"] += self.transcriber.stats["windows"] - windows
                stats["model_seconds"] += self.transcriber.stats["model_seconds"] - seconds
                stats["audio_seconds"] += sum(o["seconds"] for o in outs)
            if with_audio and "audio" in self.spec:
                t0 = time.perf_counter()
                tokens = self.audio_tokens.encode_many([r["audio"] for r in with_audio])
                for r, t in zip(with_audio, tokens, strict=True):
                    r["audio_tokens"] = t
                stats["model_seconds"] += time.perf_counter() - t0
            if with_image:
                t0 = time.perf_counter()
                pixels = [r["pixels"] for r in with_image]
                if "image" in self.spec:
                    emb, tokens = self.image_tokens.encode(pixels)
                    for r, t in zip(with_image, tokens, strict=True):
                        r["image_tokens"] = t
                else:
                    emb = self.clip.embed_prepared(pixels)
                tags = self.clip.tag(emb, self.cfg.top_k)
                for r, e, t in zip(with_image, emb, tags, strict=True):
                    r["embedding"], r["tags"] = e, t
                stats["images"] += len(with_image)
                stats["model_seconds"] += time.perf_counter() - t0
        for r in pending:
            r["audio"] = r["pixels"] = None  # release decoded media early
        return pending

    def _stream_audio(self, r: dict, stats: dict, quarantine: list[dict]) -> None:
        """A long (or referenced) recording: decoded and transcribed window by window."""
        from streamtune.decode.longform import transcribe_stream

        cfg = self.cfg
        src, r["audio_src"] = r["audio_src"], None
        try:
            with self._lock:
                wstats: dict = {}
                windows, seconds = self._model_counters()
                win = iter_audio_windows(
                    src, cfg.audio_window_seconds, max_ratio=cfg.max_decode_ratio, stats=wstats
                )
                transcriber = self.transcriber if cfg.transcribe else None
                r["asr"] = transcribe_stream(transcriber, win, cfg.audio_window_seconds, wstats)
                self._count_models(stats, windows, seconds)
            _unchanged(src)
            stats["audio_seconds"] += r["asr"]["seconds"]
            stats["streamed_audio"] += 1
            self.peak_pcm_bytes = max(self.peak_pcm_bytes, wstats.get("peak_pcm_bytes", 0))
        except (MediaError, ObjectChanged) as e:
            e = _source_error(src, e)
            key = _source_key(r["sources"], "audio", r["sample_id"])
            quarantine.append(
                quarantine_table.record(r["sample_id"], key, "decode", e.kind, e.reason, modality="audio")
            )
            stats["quarantined"] += 1
            r["failed"] = True
        finally:
            _close({"audio_src": src})

    def _video(self, r: dict, stats: dict, quarantine: list[dict]) -> list[dict]:
        """One feature row per segment of the sample's video; a video that breaks off keeps the segments
        before the damage and adds a quarantine record naming where decoding stopped."""
        from streamtune.decode.video import decode_video

        src, r["video_src"] = r["video_src"], None
        key = _source_key(r["sources"], "video", r["sample_id"])
        stats["videos"] += 1
        try:
            with self._lock:
                windows, seconds = self._model_counters()
                clip_seconds = self.clip.stats["model_seconds"]
                transcriber = self.transcriber if self.cfg.transcribe else None
                result = decode_video(src, self.cfg, transcriber, self.clip)
                self._count_models(stats, windows, seconds)
                stats["model_seconds"] += self.clip.stats["model_seconds"] - clip_seconds
            _unchanged(src)
        except (MediaError, ObjectChanged) as e:
            e = _source_error(src, e)
            quarantine.append(
                quarantine_table.record(r["sample_id"], key, "decode", e.kind, e.reason, modality="video")
            )
            stats["quarantined"] += 1
            return []
        finally:
            _close({"video_src": src})
        if result.error is not None:
            err = result.error
            message = f"decoding stopped at {err.at:.2f} s: {err.reason}"
            quarantine.append(
                quarantine_table.record(r["sample_id"], key, "decode", err.kind, message, modality="video")
            )
            stats["quarantined"] += 1
        stats["segments"] += len(result.segments)
        stats["video_seconds"] += result.duration
        stats["audio_seconds"] += result.stats.get("audio_seconds", 0.0)
        stats["frames_sampled"] += result.stats.get("frames_sampled", 0)
        rows = []
        for seg in result.segments:
            asr = None
            if result.has_audio:
                asr = {"text": seg.transcript, "segments": seg.segments, "language": seg.language}
                asr["seconds"] = seg.t1 - seg.t0
            tags = seg.tags if seg.tags is not None else None
            rows.append(
                {
                    "sample_id": r["sample_id"], "sources": r["sources"], "text": r["text"], "meta": r["meta"],
                    "audio": None, "pixels": None, "asr": asr, "embedding": seg.embedding, "tags": tags,
                    "segment_index": seg.index, "t0": seg.t0, "t1": seg.t1, "frame_times": seg.frame_times,
                    "frame_embeddings": seg.frame_embeddings, "thumbnails": seg.thumbnails,
                }
            )  # fmt: skip
        return rows

    def _model_counters(self) -> tuple[int, float]:
        if self._transcriber is None:
            return 0, 0.0
        return self._transcriber.stats["windows"], self._transcriber.stats["model_seconds"]

    def _count_models(self, stats: dict, windows: int, seconds: float) -> None:
        now_windows, now_seconds = self._model_counters()
        stats["windows"] += now_windows - windows
        stats["model_seconds"] += now_seconds - seconds

    def _to_table(self, rows: list[dict]) -> pa.Table:
        schema = self.schema()
        dim = self.clip_dim
        flat = np.zeros((len(rows), dim), np.float32)
        has_image = np.zeros(len(rows), bool)
        for i, r in enumerate(rows):
            if r.get("embedding") is not None:
                flat[i], has_image[i] = r["embedding"], True
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1)), dim, mask=pa.array(~has_image)
        )
        asr = [r.get("asr") for r in rows]
        columns = {
            "sample_id": [r["sample_id"] for r in rows],
            "text": [r["text"] for r in rows],
            "meta": [r["meta"] for r in rows],
            "sources": [r["sources"] for r in rows],
            "transcript": [a["text"] if a else None for a in asr],
            "segments": [json.dumps(a["segments"], ensure_ascii=False) if a else None for a in asr],
            "language": [a["language"] if a else None for a in asr],
            "audio_seconds": [a["seconds"] if a else None for a in asr],
            "clip_embedding": embedding,
            "tags": [[t for t, _ in r["tags"]] if r.get("tags") is not None else None for r in rows],
            "tag_scores": [[s for _, s in r["tags"]] if r.get("tags") is not None else None for r in rows],
        }
        columns |= _video_columns(rows, dim)
        for kind, width in self.token_dims.items():
            columns[f"{kind}_tokens"] = token_column([r.get(f"{kind}_tokens") for r in rows], width)
        arrays = [
            columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)


def _video_columns(rows: list[dict], dim: int) -> dict:
    """segment_index, t0, t1, frame_times, frame_embeddings, thumbnails; null for non-video rows."""
    is_video = [r.get("segment_index") is not None for r in rows]
    lengths = [len(r["frame_times"]) if v else 0 for r, v in zip(rows, is_video, strict=True)]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = [
        np.asarray(r["frame_embeddings"], np.float32).reshape(-1, dim)
        if v and r.get("frame_embeddings") is not None
        else np.zeros((n, dim), np.float32)  # no CLIP output for these frames: zeros keep the lengths
        for r, v, n in zip(rows, is_video, lengths, strict=True)
    ]
    values = np.concatenate(flat) if flat else np.zeros((0, dim), np.float32)
    frames = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
    mask = pa.array([not v for v in is_video], pa.bool_())  # typed: a shard can decode to no rows
    return {
        "segment_index": [r.get("segment_index") for r in rows],
        "t0": [r.get("t0") for r in rows],
        "t1": [r.get("t1") for r in rows],
        "frame_times": [r["frame_times"] if v else None for r, v in zip(rows, is_video, strict=True)],
        "frame_embeddings": pa.ListArray.from_arrays(offsets, frames, mask=mask),
        "thumbnails": [r["thumbnails"] if v else None for r, v in zip(rows, is_video, strict=True)],
    }


def _unchanged(src) -> None:
    """A referenced object (RemoteFile) must still be the version opened once decoded: otherwise nothing
    read from it is kept (MediaError SOURCE_CHANGED naming the URL)."""
    verify = getattr(src, "verify", None)
    if verify is not None:
        try:
            verify()
        except ObjectChanged as e:
            raise MediaError(Reason.SOURCE_CHANGED, str(e)) from None


def _source_error(src, error: Exception) -> MediaError:
    """The error to record for a failed decode: SOURCE_CHANGED when the object changed under the read
    (the damage a decoder saw is then no fault of the file)."""
    if isinstance(error, ObjectChanged):
        return MediaError(Reason.SOURCE_CHANGED, str(error))
    if not isinstance(error, MediaError) or error.kind == Reason.SOURCE_CHANGED:
        return error
    try:
        _unchanged(src)
    except MediaError as changed:
        return changed
    return error


def _close(decoded: dict) -> None:
    """Close file-likes opened for referenced media."""
    for name in ("audio_src", "video_src"):
        src = decoded.get(name)
        if src is not None and not isinstance(src, bytes | bytearray) and hasattr(src, "close"):
            src.close()


def _media_spec(cfg: DecodeConfig) -> dict:
    if not cfg.media_tokens:
        return {}
    from streamtune.decode.tokens import media_spec

    return media_spec(cfg, cfg.media_tokens)


def _clip_dim(model_name: str) -> int:
    from streamtune.decode.clip import embed_dim

    return embed_dim(model_name)


def _iter_rows(raw: pa.Table):
    """Rows as dicts with text as raw bytes (validated later) and absent columns as None."""
    n = raw.num_rows

    def column(name: str, as_binary: bool = False) -> list:
        if name not in raw.column_names:
            return [None] * n
        col = raw.column(name)
        if as_binary and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
        return col.to_pylist()

    ids = column("sample_id")
    texts, metas = column("text", as_binary=True), column("meta")
    audios, images, videos = column("audio"), column("image"), column("video")
    sources, refs = column("sources"), column("refs")
    for i in range(n):
        yield {
            "sample_id": ids[i],
            "text": texts[i],
            "meta": metas[i],
            "audio": audios[i],
            "image": images[i],
            "video": videos[i],
            "refs": [r for r in (refs[i] or []) if r is not None],
            "sources": [s for s in (sources[i] or []) if s is not None],
        }


def _source_key(sources: list[str], modality: str, fallback: str | None) -> str:
    exts = {
        "audio": tuple(AUDIO_EXT),
        "image": tuple(IMAGE_EXT),
        "video": VIDEO_EXT,
        "text": tuple(TEXT_EXT | JSON_EXT),
    }.get(modality)
    if exts:
        for s in sources:
            if s.lower().endswith(exts):
                return s
    if modality == "meta":
        for s in sources:
            if posixpath.basename(s).startswith("metadata."):
                return s
    return sources[0] if len(sources) == 1 else (fallback or ";".join(sources))


# ---------------------------------------------------------------------------------------------- shards


def _safe_name(entry: dict) -> str:
    name = str(entry.get("path", ""))
    if not SAFE_SHARD_NAME.match(name) or name.endswith(".json"):
        raise ValueError(f"refusing unsafe shard name {name!r} from the index")
    return name


def shard_key(entry: dict, cfg: DecodeConfig) -> str:
    return hashlib.sha256(f"{entry['checksum']}|{cfg.key()}".encode()).hexdigest()[:24]


def decode_shard(
    raw_prefix: str,
    entry: dict,
    out_prefix: str,
    cfg: DecodeConfig,
    storage_options: dict[str, Any] | None = None,
    decoder: Decoder | None = None,
) -> dict:
    """Decode one raw shard into a feature shard of the same name under `out_prefix`.

    Returns {"entry", "quarantine", "stats", "skipped", "schema"}; JSON-serialisable, so it can be a
    persisted task result. Skips all model work when the marker says this shard was decoded with this key.
    """
    from streamtune.shards import ShardError, write_shard
    from streamtune.shards.format import schema_to_json

    name = _safe_name(entry)
    key = shard_key(entry, cfg)
    marker_url = storage.join(out_prefix, MARKER_DIR, f"{name}.json")
    done = _decoded(out_prefix, name, key, storage_options)
    if done:
        stats = _new_stats() | {"shards": 1, "skipped_shards": 1}
        return {**done, "stats": stats, "skipped": True}

    derived = _derive(entry, out_prefix, cfg, storage_options)
    if derived is not None:
        storage.write_json(marker_url, {**derived, "key": key}, storage_options)
        rows = derived["entry"]["rows"]
        stats = _new_stats() | {"shards": 1, "derived_shards": 1, "samples": rows, "features": rows}
        return {**derived, "key": key, "stats": stats, "skipped": False}

    decoder = decoder or Decoder(cfg)
    try:
        features, quarantine, stats = _decode_stream(decoder, raw_prefix, entry, storage_options)
    except ShardError as e:
        # A missing or corrupt raw shard: an empty feature shard keeps the set consistent, the record says
        # why, and no marker is written, so the next run tries again.
        features = decoder.schema().empty_table()
        quarantine = [
            quarantine_table.record(
                None, name, "read", Reason.CORRUPT_SHARD, str(e), modality="shard", shard=name
            )
        ]
        out_entry = write_shard(features, storage.join(out_prefix, name), storage_options)
        out_entry |= {"key": None, "source": {"path": name, "checksum": entry.get("checksum")}}
        stats = _new_stats() | {"shards": 1, "quarantined": 1}
        result = {"entry": out_entry, "quarantine": quarantine, "key": None, "config_key": cfg.key()}
        result["media_tokens"] = decoder.spec
        return result | {"schema": schema_to_json(features.schema), "stats": stats, "skipped": False}
    for q in quarantine:
        q["shard"] = name
    out_entry = write_shard(features, storage.join(out_prefix, name), storage_options)
    out_entry |= {"key": key, "source": {"path": name, "checksum": entry["checksum"]}}
    stats |= {"shards": 1, "skipped_shards": 0}
    result = {
        "entry": out_entry,
        "quarantine": quarantine,
        "key": key,
        "config_key": cfg.key(),
        "schema": schema_to_json(features.schema),
        "media_tokens": decoder.spec,
    }
    storage.write_json(marker_url, result, storage_options)  # written after the shard: the shard's commit
    return {**result, "stats": stats, "skipped": False}


def _decode_stream(
    decoder: Decoder, raw_prefix: str, entry: dict, storage_options
) -> tuple[pa.Table, list[dict], dict]:
    """Decode a raw shard range by range as it streams in (`iter_shard_tables`: ranged GETs, one range
    ahead), so memory follows the range size, not the shard's. Raises ShardError for a missing or corrupt
    shard (its whole-file checksum is known once the last range is read: nothing is kept before that)."""
    from streamtune.stream.shard_reader import iter_shard_tables

    parts, quarantine, stats = [], [], _new_stats()
    for raw in iter_shard_tables(raw_prefix, entry, storage_options, range_bytes=decoder.read_range_bytes):
        features, problems, counts = decoder.decode_table_stats(raw, storage_options)
        del raw
        parts.append(features)
        quarantine += problems
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
    features = pa.concat_tables(parts) if parts else decoder.schema().empty_table()
    return features, quarantine, stats


def _derive(entry: dict, out_prefix: str, cfg: DecodeConfig, storage_options) -> dict | None:
    """Features of a raw shard that an incremental run wrote again minus some samples (`derived_from`):
    the earlier shard's features minus the same samples, with no model work. None when that shard was not
    decoded with this config or its feature shard is gone (then it is decoded as usual)."""
    from streamtune.shards import ShardError, read_shard_table, write_shard

    origin = entry.get("derived_from")
    if not isinstance(origin, dict):
        return None
    old = _decoded(out_prefix, _safe_name(origin), shard_key(origin, cfg), storage_options)
    if old is None:
        return None
    try:
        table = read_shard_table(out_prefix, old["entry"], storage_options)
    except ShardError:
        return None
    dropped = set(origin.get("dropped") or [])
    keep = [i for i, sid in enumerate(table.column("sample_id").to_pylist()) if sid not in dropped]
    name = _safe_name(entry)
    out_entry = write_shard(table.take(keep), storage.join(out_prefix, name), storage_options)
    out_entry |= {"key": shard_key(entry, cfg), "source": {"path": name, "checksum": entry["checksum"]}}
    quarantine = [q | {"shard": name} for q in old.get("quarantine", []) if q.get("sample_id") not in dropped]
    return {
        "entry": out_entry,
        "quarantine": quarantine,
        "config_key": cfg.key(),
        "schema": old["schema"],
        "media_tokens": old.get("media_tokens") or {},
    }


def _decoded(out_prefix: str, name: str, key: str, storage_options) -> dict | None:
    """The marker of feature shard `name` if it was decoded with `key` and its file is still whole."""
    marker = _read_marker(storage.join(out_prefix, MARKER_DIR, f"{name}.json"), storage_options)
    if marker and marker.get("key") == key and _shard_present(out_prefix, marker["entry"], storage_options):
        return marker
    return None


def _read_marker(url: str, storage_options) -> dict | None:
    try:
        marker = storage.read_json(url, storage_options)
    except (FileNotFoundError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "entry" in marker else None


def _shard_present(prefix: str, entry: dict, storage_options) -> bool:
    fs, path = storage.get_fs(storage.join(prefix, entry["path"]), storage_options)
    try:
        return fs.size(path) == entry["bytes"]
    except (FileNotFoundError, OSError):
        return False


def commit_features(
    out_prefix: str,
    results: list[dict],
    storage_options: dict[str, Any] | None = None,
    *,
    clip_dim: int | None = None,
) -> dict:
    """Write quarantine.parquet next to the feature shards, then index.json (the commit point).

    `clip_dim` is the configured CLIP model's embedding width (`Decoder.clip_dim`): the index schema's
    `clip_embedding` width, which every result must have. Without it the width comes from the results, and
    from the default CLIP model (ViT-B-32) when there are none.
    """
    from streamtune.shards import commit_index

    schema = _index_schema(results, clip_dim)
    records = [q for r in results for q in r.get("quarantine", [])]
    quarantine_table.write_quarantine(storage.join(out_prefix, QUARANTINE_NAME), records, storage_options)

    totals = _new_stats()
    for r in results:
        for k, v in r.get("stats", {}).items():
            totals[k] = totals.get(k, 0) + v
    by_error: dict[str, int] = {}
    for q in records:
        by_error[q["error"]] = by_error.get(q["error"], 0) + 1
    extra = {
        "kind": "features",
        "media_tokens": _media_tokens(results),
        "config_keys": sorted({r["config_key"] for r in results if r.get("config_key")}),
        "quarantine": {"path": QUARANTINE_NAME, "rows": len(records), "by_error": by_error},
        "stats": totals,
    }
    return commit_index(out_prefix, [r["entry"] for r in results], schema, storage_options, extra=extra)


def _media_tokens(results: list[dict]) -> dict:
    """The encoder-token spec every shard was decoded with (one spec per feature set)."""
    specs = {json.dumps(r.get("media_tokens") or {}, sort_keys=True) for r in results}
    if len(specs) > 1:
        raise ValueError(f"feature shards were decoded with different encoder tokens: {sorted(specs)}")
    return json.loads(specs.pop()) if specs else {}


def _index_schema(results: list[dict], clip_dim: int | None) -> pa.Schema:
    """The feature set's schema: `features_schema` at `clip_dim`, checked against every shard's."""
    from streamtune.shards.format import schema_from_json

    schemas = [schema_from_json(r["schema"]) for r in results]
    if clip_dim is None:
        clip_dim = schemas[0].field("clip_embedding").type.list_size if schemas else _clip_dim("ViT-B-32")
    want = pa.list_(pa.float32(), clip_dim)
    for r, s in zip(results, schemas, strict=True):
        got = s.field("clip_embedding").type
        if got != want:
            raise ValueError(f"feature shard {r['entry']['path']} has clip_embedding {got}, expected {want}")
    dims = {k: s["dim"] for k, s in _media_tokens(results).items()}
    return features_schema(clip_dim, dims)


def read_quarantine(out_prefix: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    return quarantine_table.read_quarantine(storage.join(out_prefix, QUARANTINE_NAME), storage_options)


def decode_shards(
    raw_prefix: str,
    out_prefix: str,
    cfg: DecodeConfig,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Decode a whole raw shard set, one shard after another, and commit the feature set."""
    from streamtune.shards import read_index

    index = read_index(raw_prefix, storage_options)
    decoder = Decoder(cfg)
    results = []
    for i, entry in enumerate(index["shards"]):
        results.append(decode_shard(raw_prefix, entry, out_prefix, cfg, storage_options, decoder))
        if progress is not None:
            progress(i + 1, len(index["shards"]), results[-1])
    return commit_features(out_prefix, results, storage_options, clip_dim=decoder.clip_dim)
