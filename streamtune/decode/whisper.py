"""Batched Whisper transcription through mlx-whisper.

Models are resolved to local mlx-whisper folders by `whisper_convert.resolve_whisper` (hub ids,
`offline:NAME`, CTranslate2 / OpenAI / transformers checkpoints converted once into a cache).

Transcription walks each clip in 30 s windows the way Whisper does: when a window ends inside a segment
(speech runs past its end), the open segment is dropped and the next window starts where that segment
began, so a sentence across a window boundary is transcribed whole. That makes a clip's windows
sequential, so long clips are first cut into pieces of about `piece_seconds` at pauses (never inside
speech) and the pieces are walked independently. Windows of several pieces or clips are encoded and
greedy-decoded as one batch, and segments get absolute timestamps. A batch of one is the unbatched path;
both give the same text.
"""

from __future__ import annotations

import time

import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before mlx)
from streamtune.decode.whisper_convert import resolve_whisper

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30
MAX_INITIAL_TIMESTAMP = 50  # 1 s in 20 ms steps, Whisper's default
MAX_TOKENS_PER_SECOND = 10  # fast speech is ~4 text tokens/s plus two timestamps per segment
FRAME = SAMPLE_RATE // 50  # 20 ms


def split_at_pauses(
    audio: np.ndarray, piece_seconds: float, search_seconds: float = 8.0, pause_seconds: float = 0.3
) -> list[int]:
    """Cut points (sample offsets) splitting `audio` into pieces of about `piece_seconds`, each at the
    quietest `pause_seconds` within `search_seconds` of the target. A spot counts as a pause only if it is
    much quieter than the clip's typical frame; where none is, no cut is made there."""
    piece = int(piece_seconds * SAMPLE_RATE)
    if audio.size <= piece + piece // 4:
        return []
    frames = audio[: audio.size // FRAME * FRAME].reshape(-1, FRAME)
    rms = np.sqrt(np.einsum("ij,ij->i", frames, frames) / FRAME)  # no squared copy of an hour of audio
    span = max(1, int(pause_seconds * 50))
    quiet = np.convolve(rms, np.ones(span) / span, mode="valid")  # mean RMS of each span start
    loud = max(float(np.median(rms)), 1e-4)
    reach = int(search_seconds * 50)
    cuts: list[int] = []
    target = piece // FRAME
    while target + piece // FRAME // 4 < rms.size:
        lo, hi = max(target - reach, (cuts[-1] // FRAME if cuts else 0) + 50), min(target + reach, quiet.size)
        if hi > lo:
            best = lo + int(np.argmin(quiet[lo:hi]))
            if quiet[best] < 0.2 * loud:
                cuts.append((best + span // 2) * FRAME)
                target = best + piece // FRAME
                continue
        target += piece // FRAME
    return cuts


def _logsumexp(x: np.ndarray) -> np.ndarray:
    peak = x.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - peak).sum(axis=-1, keepdims=True)) + peak)[..., 0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _heads(x, n_head: int):
    """(B, T, D) -> (B, H, T, D/H)."""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


def cross_attention_cache(model, features) -> list:
    """Per decoder block, cross-attention keys as (B, H, d, S), pre-scaled, and values as (B, H, S, d).

    mlx-whisper's own decoder re-splits, transposes and re-scales the cached keys on every step, which
    costs B x 1500 x D element work per layer per token; laying them out once makes a step's cost
    independent of the encoder length apart from two small matmuls.
    """
    import mlx.core as mx

    cache = []
    for block in model.decoder.blocks:
        attn = block.cross_attn
        k = _heads(attn.key(features), attn.n_head)
        scale = k.shape[-1] ** -0.5
        cache.append(
            (
                mx.contiguous(k.transpose(0, 1, 3, 2) * scale),
                mx.contiguous(_heads(attn.value(features), attn.n_head)),
            )
        )
    mx.eval(cache)
    return cache


def decoder_step(model, tokens, cross: list, cache: list | None):
    """One pass of mlx-whisper's text decoder over `tokens` (B, T) with the layouts above.

    Same weights and operations as `model.decoder` (logits agree to float tolerance); returns
    (logits (B, T, vocab), self-attention cache).
    """
    import mlx.core as mx
    import mlx.nn as nn

    dec = model.decoder
    offset = cache[0][0].shape[2] if cache else 0
    n = tokens.shape[1]
    h = dec.token_embedding(tokens) + dec.positional_embedding[offset : offset + n]
    mask = nn.MultiHeadAttention.create_additive_causal_mask(n).astype(h.dtype) if n > 1 else None
    new_cache = []
    for i, block in enumerate(dec.blocks):
        attn, b = block.attn, h.shape[0]
        a = block.attn_ln(h)
        q, k, v = (_heads(proj(a), attn.n_head) for proj in (attn.query, attn.key, attn.value))
        if cache:
            k = mx.concatenate([cache[i][0], k], axis=2)
            v = mx.concatenate([cache[i][1], v], axis=2)
        new_cache.append((k, v))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(0, 1, 3, 2)
        if mask is not None:
            scores = scores + mask
        out = mx.softmax(scores, axis=-1, precise=True) @ v
        h = h + attn.out(out.transpose(0, 2, 1, 3).reshape(b, n, -1))
        cross_attn = block.cross_attn
        q = _heads(cross_attn.query(block.cross_attn_ln(h)), cross_attn.n_head)
        out = mx.softmax(q @ cross[i][0], axis=-1, precise=True) @ cross[i][1]
        h = h + cross_attn.out(out.transpose(0, 2, 1, 3).reshape(b, n, -1))
        h = h + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(h))))
    return dec.token_embedding.as_linear(dec.ln(h)), new_cache


class Transcriber:
    """Batched greedy Whisper transcription of 16 kHz mono float32 arrays."""

    piece_seconds = 120.0  # long clips are cut at pauses into pieces of about this length (see module doc)

    def __init__(
        self, model: str, language: str | None = None, batch_size: int = 8, cache_dir: str | None = None
    ):
        import mlx.core as mx
        from mlx_whisper.load_models import load_model
        from mlx_whisper.tokenizer import get_tokenizer

        self.model_ref = model
        self.path = resolve_whisper(model, cache_dir)
        self.model = load_model(self.path, dtype=mx.float32)
        self.batch_size = max(1, int(batch_size))
        if not self.model.is_multilingual and language not in (None, "en"):
            raise ValueError(f"{model} is English-only; language {language!r} is not available")
        self.language = language if self.model.is_multilingual else "en"
        self.tokenizer = get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages, language=self.language
        )
        self.stats = {
            "windows": 0,
            "batches": 0,
            "audio_seconds": 0.0,
            "model_seconds": 0.0,
            "encoder_seconds": 0.0,
        }

    def transcribe(self, audios: list[np.ndarray]) -> list[dict]:
        """One dict per clip: text, segments [{start, end, text}] in seconds, language, seconds."""
        audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        step = WINDOW_SECONDS * SAMPLE_RATE
        sliver = SAMPLE_RATE // 50  # a trailing piece under 20 ms is not worth a window
        results = [
            {"text": "", "segments": [], "language": self.language, "seconds": a.size / SAMPLE_RATE}
            for a in audios
        ]
        votes: list[dict[str, int]] = [{} for _ in audios]
        pieces = []  # [clip, seek, end] in samples, in clip order
        for i, a in enumerate(audios):
            bounds = [0, *split_at_pauses(a, self.piece_seconds), a.size]
            pieces += [[i, lo, hi] for lo, hi in zip(bounds, bounds[1:], strict=False) if hi - lo >= sliver]
        found: list[list[tuple[float, float, str]]] = [[] for _ in pieces]
        todo = list(range(len(pieces)))
        while todo:
            # one window per piece and round: where a piece's next window starts depends on this one
            batch = todo[: self.batch_size]
            chunks = [
                audios[pieces[p][0]][pieces[p][1] : min(pieces[p][1] + step, pieces[p][2])] for p in batch
            ]
            for p, chunk, (res, segments) in zip(batch, chunks, self._decode_batch(chunks), strict=True):
                i, at, end = pieces[p]
                advance = chunk.size
                open_start = segments[-1][0] if segments and not segments[-1][3] else 0.0
                if at + chunk.size < end and open_start >= 1.0:
                    segments = segments[:-1]  # speech runs on past the window: redo it from its start
                    advance = int(round(open_start * SAMPLE_RATE))
                pieces[p][1] += advance
                if res["no_speech_prob"] > 0.6 and res["avg_logprob"] < -1.0:
                    continue  # silence: Whisper's own no-speech rule
                votes[i][res["language"]] = votes[i].get(res["language"], 0) + advance
                offset, stop = at / SAMPLE_RATE, (at + chunk.size) / SAMPLE_RATE
                found[p] += [(offset + a, min(offset + b, stop), text) for a, b, text, _ in segments if text]
            todo = [p for p in todo if pieces[p][2] - pieces[p][1] >= sliver]
        for (i, _, _), segments in zip(pieces, found, strict=True):
            results[i]["segments"] += [
                {"start": round(a, 2), "end": round(b, 2), "text": t} for a, b, t in segments
            ]
            if segments:
                results[i]["text"] = " ".join([results[i]["text"], *(t for _, _, t in segments)]).strip()
        for i, v in enumerate(votes):
            if v:
                results[i]["language"] = max(v, key=v.get)
        self.stats["audio_seconds"] += sum(r["seconds"] for r in results)
        return results

    def _decode_batch(self, chunks: list[np.ndarray]) -> list[tuple[dict, list]]:
        """Encode a batch of windows at once, then greedy-decode them together with a shared KV cache.

        Rows that reach end-of-text leave the batch (their cache rows are dropped), so a long window
        does not make the finished ones pay for extra steps.
        """
        import mlx.core as mx
        from mlx.utils import tree_map
        from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram, pad_or_trim
        from mlx_whisper.decoding import detect_language

        t0 = time.perf_counter()
        tok = self.tokenizer
        n_mels = self.model.dims.n_mels
        mel = mx.stack(
            [log_mel_spectrogram(pad_or_trim(mx.array(c), N_SAMPLES), n_mels=n_mels) for c in chunks]
        )
        features = self.model.encoder(mel)
        mx.eval(features)
        self.stats["encoder_seconds"] += time.perf_counter() - t0
        n = len(chunks)
        initial = np.tile(np.array(tok.sot_sequence, dtype=np.int64), (n, 1))
        languages = [self.language or "en"] * n
        if self.model.is_multilingual and self.language is None:
            lang_tokens, lang_probs = detect_language(self.model, features, tok)
            languages = [max(p, key=p.get) for p in lang_probs]
            initial[:, 1] = np.array(lang_tokens)
        sample_begin = initial.shape[1]
        # Whisper's cap is n_text_ctx // 2 tokens a window; short windows get a proportional cap, so a
        # repetition loop on a 2 s clip costs a few dozen steps, not hundreds.
        limit = [min(self.model.dims.n_text_ctx // 2, 16 + int(MAX_TOKENS_PER_SECOND * c.size / SAMPLE_RATE))
                 for c in chunks]  # fmt: skip
        tokens = [list(map(int, row)) for row in initial]
        sum_logprobs = np.zeros(n)
        no_speech = np.full(n, np.nan)
        active = list(range(n))
        x, cache, cross = mx.array(initial), None, cross_attention_cache(self.model, features)
        while active:
            logits, cache = decoder_step(self.model, x, cross, cache)
            if x.shape[1] > 1 and self._no_speech is not None:
                first = np.array(logits[:, tok.sot_sequence.index(tok.sot)].astype(mx.float32))
                no_speech[active] = _softmax(first)[:, self._no_speech]
            last = np.array(logits[:, -1].astype(mx.float32))
            last = self._filter(last, [tokens[i] for i in active], sample_begin)
            nxt = last.argmax(axis=-1)
            logprobs = last[np.arange(len(active)), nxt] - _logsumexp(last)
            keep = []
            for j, i in enumerate(active):
                tokens[i].append(int(nxt[j]))
                sum_logprobs[i] += logprobs[j]
                if nxt[j] != tok.eot and len(tokens[i]) < sample_begin + limit[i]:
                    keep.append(j)
            if len(keep) < len(active) and keep:
                rows = mx.array(keep)
                cache, cross = tree_map(lambda a, rows=rows: a[rows], (cache, cross))
            active = [active[j] for j in keep]
            x = mx.array([[tokens[i][-1]] for i in active]) if active else x
        self.stats["windows"] += n
        self.stats["batches"] += 1
        self.stats["model_seconds"] += time.perf_counter() - t0
        out = []
        for i in range(n):
            sampled = tokens[i][sample_begin:]
            if sampled and sampled[-1] == tok.eot:
                sampled = sampled[:-1]
            res = {
                "tokens": sampled,
                "language": languages[i],
                "avg_logprob": float(sum_logprobs[i] / (len(sampled) + 1)),
                "no_speech_prob": float(no_speech[i]),
            }
            out.append((res, self._segments(sampled)))
        return out

    @property
    def _no_speech(self) -> int | None:
        try:
            return self.tokenizer.no_speech
        except KeyError:
            return None

    def _suppress_mask(self) -> np.ndarray:
        if getattr(self, "_mask", None) is None:
            tok = self.tokenizer
            ids = set(tok.non_speech_tokens) | {
                tok.transcribe,
                tok.translate,
                tok.sot,
                tok.sot_prev,
                tok.sot_lm,
            }
            if self._no_speech is not None:
                ids.add(self._no_speech)
            if tok.no_timestamps is not None:
                ids.add(tok.no_timestamps)
            mask = np.zeros(self.model.dims.n_vocab, np.float32)
            mask[sorted(ids)] = -np.inf
            self._mask = mask
        return self._mask

    def _filter(self, logits: np.ndarray, seqs: list[list[int]], sample_begin: int) -> np.ndarray:
        """Whisper's greedy logit rules: suppressed tokens, no blank start, paired monotonic timestamps."""
        tok = self.tokenizer
        ts, eot = tok.timestamp_begin, tok.eot
        logits = logits + self._suppress_mask()
        for k, seq in enumerate(seqs):
            sampled = seq[sample_begin:]
            row = logits[k]
            if not sampled:
                row[tok.encode(" ") + [eot]] = -np.inf
                row[:ts] = -np.inf  # the first token is a timestamp, at most 1 s in
                row[ts + MAX_INITIAL_TIMESTAMP + 1 :] = -np.inf
                continue
            last_ts = sampled[-1] >= ts
            penultimate_ts = len(sampled) < 2 or sampled[-2] >= ts
            if last_ts:
                if penultimate_ts:
                    row[ts:] = -np.inf  # a pair just closed: text must follow
                else:
                    row[:eot] = -np.inf  # a segment just ended: timestamp or end of text
            stamps = [t for t in sampled if t >= ts]
            if stamps:
                floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
                row[ts:floor] = -np.inf  # timestamps never go back; segments have nonzero length
            logprobs = row - _logsumexp(row[None])[0]
            if _logsumexp(logprobs[None, ts:])[0] > logprobs[:ts].max():
                row[:ts] = -np.inf  # timestamps together outweigh any single text token
        return logits

    def _segments(self, tokens: list[int]) -> list[tuple[float, float, str, bool]]:
        """Split a window's tokens at timestamp tokens into (start, end, text, closed) tuples. The last one is
        open (closed=False) when the window ended inside it: text with no closing timestamp, or a start
        timestamp with nothing after it (the model saw speech begin there but not end)."""
        begin = self.tokenizer.timestamp_begin
        segments, text, start = [], [], None
        for t in tokens:
            if t >= begin:
                seconds = (t - begin) * 0.02
                if start is not None and text:
                    segments.append((start, seconds, self.tokenizer.decode(text).strip(), True))
                    text, start = [], None
                else:
                    start = seconds
            elif t < self.tokenizer.eot:
                text.append(t)
        segments = [s for s in segments if s[2]]
        words = self.tokenizer.decode(text).strip() if text else ""
        if words or (start is not None and segments and start > segments[-1][0]):
            segments.append((start or 0.0, float(WINDOW_SECONDS), words, False))
        return segments
