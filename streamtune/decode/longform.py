"""Transcribing a recording of any length from a stream of PCM windows, in bounded memory.

Windows from `media.iter_audio_windows` are gathered into a buffer of about `buffer_seconds`; the buffer
is cut at its last pause (`whisper.split_at_pauses`, as the transcriber cuts long clips into pieces) and
everything before the cut goes through `Transcriber.transcribe` as one clip (its pieces batched), while
the rest waits for the next windows. Speech is never cut mid-sentence unless a whole buffer holds no pause
(then the buffer goes through whole: pause-free audio never holds more than one buffer), and segment times
are absolute in the recording.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SAMPLE_RATE = 16000


def transcribe_stream(
    transcriber,
    windows: Iterable[tuple[float, np.ndarray]],
    buffer_seconds: float = 300.0,
    stats: dict | None = None,
) -> dict:
    """{text, segments [{start, end, text}], language, seconds} of the whole stream, like
    `Transcriber.transcribe` returns for one clip. `transcriber` None: durations only. `stats` gets
    `peak_pcm_bytes` (largest buffer held) and `chunks` (transcriber calls).

    An exception from `windows` (a stream that breaks) propagates after the audio before it has been
    transcribed; the partial result is then in `stats["partial"]`.
    """
    from streamtune.decode.whisper import split_at_pauses

    stats = stats if stats is not None else {}
    stats.setdefault("peak_pcm_bytes", 0)
    stats.setdefault("chunks", 0)
    limit = max(1, int(buffer_seconds * SAMPLE_RATE))
    piece = getattr(transcriber, "piece_seconds", 120.0)
    out = {"text": "", "segments": [], "language": None, "seconds": 0.0}
    votes: dict[str, float] = {}
    parts: list[np.ndarray] = []
    held = 0
    start = 0.0

    def run(pcm: np.ndarray, t0: float) -> None:
        out["seconds"] = t0 + pcm.size / SAMPLE_RATE
        if transcriber is None or pcm.size == 0:
            return
        stats["chunks"] += 1
        res = transcriber.transcribe([pcm])[0]
        for seg in res["segments"]:
            out["segments"].append(
                {"start": round(seg["start"] + t0, 2), "end": round(seg["end"] + t0, 2), "text": seg["text"]}
            )
        if res["text"]:
            out["text"] = " ".join([out["text"], res["text"]]).strip()
        if res["language"]:
            votes[res["language"]] = votes.get(res["language"], 0.0) + pcm.size
        out["language"] = max(votes, key=votes.get) if votes else res["language"]

    if transcriber is None:  # durations only: nothing to buffer
        for t0, pcm in windows:
            stats["peak_pcm_bytes"] = max(stats["peak_pcm_bytes"], pcm.nbytes)
            out["seconds"] = t0 + pcm.size / SAMPLE_RATE
        return out
    try:
        for t0, pcm in windows:
            if not held:
                start = t0
            parts.append(pcm)
            held += pcm.size
            stats["peak_pcm_bytes"] = max(stats["peak_pcm_bytes"], held * 4)
            if held < limit:
                continue
            buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts = []
            cuts = split_at_pauses(buf, piece)
            # no pause in a whole buffer (a tone, music): cut hard there rather than hold a second buffer
            cut = cuts[-1] if cuts else buf.size
            if cut:
                run(buf[:cut], start)
                start += cut / SAMPLE_RATE
            rest = buf[cut:]
            parts, held = ([rest] if rest.size else []), rest.size
        if held:
            run(np.concatenate(parts), start)
    except Exception:
        if held:
            run(np.concatenate(parts), start)
        stats["partial"] = out
        raise
    return out
