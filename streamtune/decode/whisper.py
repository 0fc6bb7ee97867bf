"""Batched Whisper transcription through mlx-whisper.

Models are resolved to local mlx-whisper folders by `whisper_convert.resolve_whisper` (hub ids,
`offline:NAME`, CTranslate2 / OpenAI / transformers checkpoints converted once into a cache).

A clip is transcribed as `mlx_whisper.transcribe(clip, temperature=0, condition_on_previous_text=False)`
does it, and gives the same text (tests/test_whisper_reference.py; `python -m bench.whisper_reference`):

- log-mel of the clip followed by 30 s of zeros, normalised over all of it (its max - 8 dB floor); a
  window shorter than 30 s is padded with zeros in the log-mel, not with the log-mel of silence;
- language (when none is set, on a multilingual model) detected once per clip, on the first 3000 frames
  of that padded log-mel;
- greedy decoding from `<|startoftranscript|><|lang|><|transcribe|>` with timestamps, up to 224 tokens, and
  mlx-whisper's logit filters in its order: blank/end-of-text suppressed at the start, `suppress_tokens=-1`
  (non-speech symbols and the special tokens), timestamps in pairs, the first one at most 1 s in, and
  timestamps forced where their total probability beats every text token, judged on the logits before the
  timestamp rules (as mlx-whisper 0.4.2 does; openai-whisper judges after them);
- windows: skipped as silence when no-speech probability > 0.6 and average log-probability <= -1; segments
  cut at timestamp pairs; the next window starts at the end of the window when the tokens end in a closed
  segment, else at the last closing timestamp; zero-length and empty segments are dropped from the text.

Measured with `python -m bench.whisper_reference` (espeak-ng sentences): tiny.en, 10 English clips: 10/10
identical to the reference (before these rules: 6/10, word error rate 0.16 against the spoken words where
the reference has 0.13); base, one clip each of en/de/es/fr/it: 5/5 identical (before: 1/5, 21 % of
characters differing), detected language 5/5 the reference's. Parity is not accuracy: on those base
clips the reference's word error rate is 0.41 and the earlier padding (log-mel of silence) gave 0.33.

Windows of several clips are greedy-decoded as one batch (a shared KV cache with cross-attention keys laid
out once); a window's log-mel does not depend on the batch, and a batch of one gives the same text. Memory:
the log-mel is computed a chunk of frames at a time (`log_mel`) and the encoder takes one window at a time
with its self-attention split over query rows (`encode_window`), both bit-identical to mlx-whisper's
(the encoder with `cpu_ops` off; on the CPU its numpy softmax differs in the last bits).

Deliberate differences, each only where the reference itself misbehaves or cannot batch:

- Monotonic timestamps: mlx-whisper 0.4.2's rule that timestamps never go back indexes token positions
  instead of token values, so it never masks anything; it is left out here too for identical text
  (`monotonic_timestamps = True` applies openai-whisper's rule).
- Loop guard: a window whose last 32+ tokens repeat with a period of at most 16 tokens (at least four
  periods) stops there, keeps one period, and its window counts as read (`stats["loops"]`). The reference
  at temperature 0 decodes such a loop to its 224-token cap, and its output then has a gzip compression
  ratio over 2.4, the threshold at which `mlx_whisper.transcribe` with its default temperatures rejects it
  and samples again. On the benchmark sentences neither side loops, so the texts are identical.
- A window whose only segment is still open at its end (no closing timestamp) and starts 1 s or more into
  the window, with audio after it: the next window starts where that segment began. The reference cuts the
  sentence at the window end instead (tiny.en then loses "quick brown fox jumps over the lazy dog" spoken
  across 30 s, tests/test_whisper.py). Only clips over 30 s can meet it.
- Clips longer than `piece_seconds` * 1.25 are cut at pauses into pieces (never inside speech) that are
  walked independently, so one long clip's windows batch together; each piece has its own log-mel
  normalisation and language detection, and the clip's language is the pieces' majority by duration.
"""

from __future__ import annotations

import time

import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before mlx)
from streamtune.decode.whisper_convert import resolve_whisper
from streamtune.decode.whisper_import import skip_package_init

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30
MAX_INITIAL_TIMESTAMP = 50  # 1 s in 20 ms steps, Whisper's default
FRAME = SAMPLE_RATE // 50  # 20 ms
HOP_LENGTH = 160  # samples per mel frame
N_FRAMES = WINDOW_SECONDS * SAMPLE_RATE // HOP_LENGTH  # mel frames in a window
INPUT_STRIDE = 2  # mel frames per timestamp step
NO_SPEECH_THRESHOLD = 0.6  # mlx_whisper.transcribe's defaults for skipping a silent window
LOGPROB_THRESHOLD = -1.0
LOOP_MIN_SPAN = 32  # loop guard: this many tokens repeating with a period of at most LOOP_MAX_PERIOD
LOOP_MAX_PERIOD = 16


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


def stft_pad(x: np.ndarray) -> np.ndarray:
    """The reflect padding mlx_whisper's stft puts on each side of a clip (N_FFT / 2 samples)."""
    from mlx_whisper.audio import N_FFT

    half = N_FFT // 2
    return np.concatenate([x[1 : half + 1][::-1], x, x[-(half + 1) : -1][::-1]])


def attention_heads(attn, h):
    """mlx_whisper's qkv_attention inputs: q (B, H, T, d), k (B, H, d, T), v (B, H, T, d), q and k
    each scaled by d ** -0.25."""
    b, n, d = h.shape
    scale = (d // attn.n_head) ** -0.25
    q = attn.query(h).reshape(b, n, attn.n_head, -1).transpose(0, 2, 1, 3) * scale
    k = attn.key(h).reshape(b, n, attn.n_head, -1).transpose(0, 2, 3, 1) * scale
    v = attn.value(h).reshape(b, n, attn.n_head, -1).transpose(0, 2, 1, 3)
    return q, k, v


def log_mel(audio: np.ndarray, n_mels: int, padding: int, chunk_frames: int = 3000):
    """`mlx_whisper.audio.log_mel_spectrogram(audio, n_mels, padding)`, bit for bit, computed
    `chunk_frames` frames at a time: the reference holds the whole clip's frames (400 samples each), their
    spectrum and its magnitudes at once, about 0.5 MB per second of audio (330 MB for a 10-minute piece);
    here only the (frames, n_mels) log-mel is whole, and the max - 8 dB floor is taken over all of it."""
    import mlx.core as mx
    from mlx_whisper.audio import N_FFT, hanning, mel_filters

    x = stft_pad(np.concatenate([np.asarray(audio, np.float32).reshape(-1), np.zeros(padding, np.float32)]))
    frames = (x.size - N_FFT) // HOP_LENGTH  # stft's frame count less its last frame, as the reference
    window, filters = hanning(N_FFT), mel_filters(n_mels).T
    parts = []
    for a in range(0, frames, chunk_frames):
        n = min(chunk_frames, frames - a)
        seg = mx.array(x[a * HOP_LENGTH : (a + n - 1) * HOP_LENGTH + N_FFT])
        spectrum = mx.fft.rfft(mx.as_strided(seg, shape=[n, N_FFT], strides=[HOP_LENGTH, 1]) * window)
        parts.append(mx.maximum(spectrum.abs().square() @ filters, 1e-10).log10())
        mx.eval(parts[-1])
    log_spec = mx.concatenate(parts) if len(parts) > 1 else parts[0]
    log_spec = mx.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def encode_window(model, mel, rows: int = 300):
    """`model.encoder(mel[None])` for one (3000, n_mels) log-mel window, bit for bit, with self-attention
    computed `rows` query positions at a time: mlx-whisper's encoder holds a layer's scores and their
    softmax for all 1500 x 1500 positions (2 x 54 MB for tiny's 6 heads, 72 MB each for base); here they
    are 2 x heads x rows x 1500 (11 MB for tiny). Softmax is per query row, so the rows are independent. On
    the CPU the softmax runs in numpy (`cpu_ops`; tiny.en's encoder took 2.1-2.8 s per window on 2 cores,
    1.3-1.5 s with it); with `cpu_ops.enabled(False)` the result is mlx-whisper's bit for bit."""
    import mlx.core as mx
    import mlx.nn as nn

    from streamtune import cpu_ops

    enc = model.encoder
    x = nn.gelu(enc.conv2(nn.gelu(enc.conv1(mel[None])))) + enc._positional_embedding
    for block in enc.blocks:
        attn = block.attn
        b, n, d = x.shape
        q, k, v = attention_heads(attn, block.attn_ln(x))  # split over query rows below
        mx.eval(q, k, v)
        out = []
        for r in range(0, n, rows):
            scores = q[:, :, r : r + rows] @ k
            probs = (
                cpu_ops.softmax(scores)
                if cpu_ops.active(scores)
                else mx.softmax(scores, axis=-1, precise=True)
            )
            out.append(probs @ v)
            mx.eval(out[-1])
        x = x + attn.out(mx.concatenate(out, axis=2).transpose(0, 2, 1, 3).reshape(b, n, d))
        x = x + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(x))))
        mx.eval(x)
    return enc.ln_post(x)


def release_memory() -> None:
    """Hand MLX's cache of freed buffers and glibc's freed heap pages back to the OS between calls: the
    log-mel, encoder and decoder buffers of one call (~100-250 MB) would otherwise stay resident while the
    caller decodes video frames and runs CLIP."""
    import mlx.core as mx

    from streamtune.decode.clip import trim_heap

    mx.clear_cache()
    trim_heap()


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


class _Piece:
    """One independently walked stretch of a clip: its log-mel (reference layout) and where it has got to."""

    def __init__(self, clip: int, start: int, audio: np.ndarray, language: str | None):
        self.clip, self.start, self.audio, self.language = clip, start, audio, language
        self.frames = audio.size // HOP_LENGTH  # content frames, as mlx_whisper counts them
        self.seek = 0
        self.mel = None
        self.tokens: list[int] = []
        self.segments: list[tuple[float, float, str]] = []
        self.seconds = 0.0  # audio that counted towards the language vote


def repeating_tail(
    tokens: list[int], min_span: int = LOOP_MIN_SPAN, max_period: int = LOOP_MAX_PERIOD
) -> int | None:
    """Where a repetition loop at the end of `tokens` starts (one period kept), or None: the last
    max(min_span, 4 x period) tokens repeat with a period of at most `max_period` tokens."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = max(min_span, 4 * p)
        if n < span:
            continue
        tail = tokens[n - span :]
        if tail[:-p] == tail[p:]:
            start = n - span
            while start > 0 and tokens[start - 1] == tokens[start - 1 + p]:
                start -= 1
            return start + p
    return None


class Transcriber:
    """Batched greedy Whisper transcription of 16 kHz mono float32 arrays (see the module docstring)."""

    piece_seconds = 120.0  # long clips are cut at pauses into pieces of about this length (see module doc)
    loop_guard = True  # stop a window at a repetition loop (see module doc); False: decode to the token cap
    monotonic_timestamps = False  # openai-whisper's rule; mlx-whisper 0.4.2 leaves it out (see module doc)

    def __init__(
        self, model: str, language: str | None = None, batch_size: int = 8, cache_dir: str | None = None
    ):
        import mlx.core as mx

        skip_package_init()  # mlx_whisper.transcribe's numba + scipy (~150 MB) are not needed here
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
            "loops": 0,
        }

    def transcribe(self, audios: list[np.ndarray], languages: list[str | None] | None = None) -> list[dict]:
        """One dict per clip: text, segments [{start, end, text}] in seconds, language, seconds.
        `languages`: one per clip (None: detected) instead of the transcriber's `language`."""
        audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        if not self.model.is_multilingual:
            langs = ["en"] * len(audios)
        else:
            langs = list(languages) if languages is not None else [self.language] * len(audios)
        results = [
            {"text": "", "segments": [], "language": lang, "seconds": a.size / SAMPLE_RATE}
            for a, lang in zip(audios, langs, strict=True)
        ]
        pieces: list[_Piece] = []
        for i, a in enumerate(audios):
            bounds = [0, *split_at_pauses(a, self.piece_seconds), a.size]
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                if (hi - lo) // HOP_LENGTH > 0:
                    pieces.append(_Piece(i, lo, a[lo:hi], langs[i]))
        todo = list(range(len(pieces)))
        while todo:
            # one window per piece and round: where a piece's next window starts depends on this one
            batch = [pieces[p] for p in todo[: self.batch_size]]
            for piece, res in zip(batch, self._decode_batch(batch), strict=True):
                self._advance(piece, res)
                if piece.seek >= piece.frames:
                    piece.mel = piece.audio = None
            todo = [p for p in todo if pieces[p].seek < pieces[p].frames]
        tokens: list[list[int]] = [[] for _ in audios]
        votes: list[dict[str, float]] = [{} for _ in audios]
        for piece in pieces:
            offset = piece.start / SAMPLE_RATE
            end = offset + piece.frames * HOP_LENGTH / SAMPLE_RATE
            results[piece.clip]["segments"] += [
                {"start": round(min(offset + a, end), 2), "end": round(min(offset + b, end), 2), "text": t}
                for a, b, t in piece.segments
            ]
            tokens[piece.clip] += piece.tokens
            votes[piece.clip][piece.language] = votes[piece.clip].get(piece.language, 0.0) + piece.frames
        for i, res in enumerate(results):
            res["text"] = self.tokenizer.decode(tokens[i]).strip()
            if votes[i]:
                res["language"] = max(votes[i], key=votes[i].get)
        self.stats["audio_seconds"] += sum(r["seconds"] for r in results)
        release_memory()
        return results

    def _advance(self, piece: _Piece, res: dict) -> None:
        """mlx_whisper.transcribe's bookkeeping after one window: skip silence, cut the tokens into segments
        at timestamp pairs, and seek to the end of the window or to the last closed segment."""
        tok = self.tokenizer
        size = min(N_FRAMES, piece.frames - piece.seek)
        offset = piece.seek * HOP_LENGTH / SAMPLE_RATE
        if res["no_speech_prob"] > NO_SPEECH_THRESHOLD and not res["avg_logprob"] > LOGPROB_THRESHOLD:
            piece.seek += size
            return
        tokens = res["tokens"]
        stamp = [t >= tok.timestamp_begin for t in tokens]
        single_ending = stamp[-2:] == [False, True]
        consecutive = [k + 1 for k in range(len(tokens) - 1) if stamp[k] and stamp[k + 1]]
        spans = []  # (start, end, tokens)
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cut in slices:
                part = tokens[last:cut]
                spans.append(
                    ((part[0] - tok.timestamp_begin) * 0.02, (part[-1] - tok.timestamp_begin) * 0.02, part)
                )
                last = cut
            advance = size if single_ending else (tokens[last - 1] - tok.timestamp_begin) * INPUT_STRIDE
        else:
            duration = size * HOP_LENGTH / SAMPLE_RATE
            stamps = [t for t, s in zip(tokens, stamp, strict=True) if s]
            if stamps and stamps[-1] != tok.timestamp_begin:
                duration = (stamps[-1] - tok.timestamp_begin) * 0.02
            advance = size
            first = stamps[0] - tok.timestamp_begin if stamps and stamp[0] else 0
            if (
                not single_ending
                and not res["looped"]
                and piece.seek + size < piece.frames
                and first >= MAX_INITIAL_TIMESTAMP
            ):
                # deliberate difference (module doc): the window's only segment is still open at its end;
                # start the next window where that segment began instead of cutting it at the window end
                piece.seek += first * INPUT_STRIDE
                return
            spans.append((0.0, duration, tokens))
        if advance <= 0:  # a closed segment at 0.00 s only: the reference would decode this window forever
            advance = size
        piece.seek += advance
        for start, end, part in spans:
            text = [t for t in part if t < tok.eot]
            words = tok.decode(text).strip()
            if start == end or not words:
                continue  # mlx_whisper blanks these and leaves their tokens out of the text
            piece.tokens += text
            piece.segments.append((offset + start, offset + end, words))

    def _sot(self, language: str) -> list[int]:
        tok = self.tokenizer
        if not self.model.is_multilingual:
            return list(tok.sot_sequence)
        return [tok.sot, tok.to_language_token(language), tok.transcribe]

    def _encode(self, mels: list) -> object:
        """Encoder features (B, 1500, D) of 30 s log-mel windows (3000, n_mels), one window at a time
        (`encode_window`): a batch of 8 held 8 x 2 x heads x 1500 x 1500 f32 (0.9 GB for tiny) at once."""
        import mlx.core as mx

        features = [encode_window(self.model, mel) for mel in mels]
        return mx.concatenate(features) if len(features) > 1 else features[0]

    def _decode_batch(self, batch: list[_Piece]) -> list[dict]:
        """Encode one window of each piece at once, then greedy-decode them together with a shared KV cache.

        Rows that reach end-of-text leave the batch (their cache rows are dropped), so a long window
        does not make the finished ones pay for extra steps.
        """
        import mlx.core as mx
        from mlx.utils import tree_map
        from mlx_whisper.audio import N_SAMPLES
        from mlx_whisper.decoding import detect_language

        t0 = time.perf_counter()
        tok = self.tokenizer
        n_mels = self.model.dims.n_mels
        segments, detect = [], []
        for piece in batch:
            if piece.mel is None:  # mlx_whisper's layout: mel of the audio + 30 s of zeros, (frames, n_mels)
                piece.mel = log_mel(piece.audio, n_mels, N_SAMPLES)
            size = min(N_FRAMES, piece.frames - piece.seek)
            seg = piece.mel[piece.seek : piece.seek + size]
            segments.append(mx.pad(seg, [(0, N_FRAMES - size), (0, 0)]) if size < N_FRAMES else seg)
            if piece.language is None and self.model.is_multilingual:
                detect.append(piece)
        features = self._encode(segments)
        if detect:
            # mlx_whisper detects once per clip, on the first 30 s of the padded mel (zeros' log-mel, not
            # zeros, past the end of a short clip)
            detect_features = self._encode([p.mel[:N_FRAMES] for p in detect])
            _, probs = detect_language(self.model, detect_features, tok)
            for piece, p in zip(detect, probs, strict=True):
                piece.language = max(p, key=p.get)
        mx.eval(features)
        self.stats["encoder_seconds"] += time.perf_counter() - t0
        n = len(batch)
        initial = np.array([self._sot(p.language) for p in batch], dtype=np.int64)
        sample_begin = initial.shape[1]
        sot_index = 0
        limit = self.model.dims.n_text_ctx // 2  # mlx_whisper's sample_len
        tokens = [list(map(int, row)) for row in initial]
        sum_logprobs = np.zeros(n)
        no_speech = np.full(n, np.nan)
        looped = [False] * n
        active = list(range(n))
        x, cache, cross = mx.array(initial), None, cross_attention_cache(self.model, features)
        while active:
            logits, cache = decoder_step(self.model, x, cross, cache)
            if x.shape[1] > 1 and self._no_speech is not None:
                first = np.array(logits[:, sot_index].astype(mx.float32))
                no_speech[active] = _softmax(first)[:, self._no_speech]
            last = np.array(logits[:, -1].astype(mx.float32))
            last = self._filter(last, [tokens[i][sample_begin:] for i in active])
            nxt = last.argmax(axis=-1)
            logprobs = last[np.arange(len(active)), nxt] - _logsumexp(last)
            keep = []
            for j, i in enumerate(active):
                tokens[i].append(int(nxt[j]))
                sum_logprobs[i] += logprobs[j]
                if nxt[j] == tok.eot or len(tokens[i]) >= sample_begin + limit:
                    continue
                if self.loop_guard and (cut := repeating_tail(tokens[i][sample_begin:])) is not None:
                    del tokens[i][sample_begin + cut :]
                    looped[i] = True
                    continue
                keep.append(j)
            if len(keep) < len(active) and keep:
                rows = mx.array(keep)
                cache, cross = tree_map(lambda a, rows=rows: a[rows], (cache, cross))
            active = [active[j] for j in keep]
            x = mx.array([[tokens[i][-1]] for i in active]) if active else x
        self.stats["windows"] += n
        self.stats["batches"] += 1
        self.stats["loops"] += sum(looped)
        self.stats["model_seconds"] += time.perf_counter() - t0
        out = []
        for i in range(n):
            sampled = tokens[i][sample_begin:]
            if tok.eot in sampled:
                sampled = sampled[: sampled.index(tok.eot)]
            out.append(
                {
                    "tokens": sampled,
                    "language": batch[i].language,
                    "avg_logprob": float(sum_logprobs[i] / (len(sampled) + 1)),
                    "no_speech_prob": float(no_speech[i]),
                    "looped": looped[i],
                }
            )
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
            mask = np.zeros(self.model.dims.n_vocab, np.float32)
            mask[sorted(ids)] = -np.inf
            self._mask = mask
        return self._mask

    def _filter(self, logits: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        """mlx_whisper's greedy logit filters, in its order: SuppressBlank, SuppressTokens,
        ApplyTimestampRules. `seqs` are the sampled tokens of each row (all the same length)."""
        tok = self.tokenizer
        ts, eot = tok.timestamp_begin, tok.eot
        logits = logits + self._suppress_mask()
        start = not seqs[0]
        if start:
            logits[:, tok.encode(" ") + [eot]] = -np.inf
        mask = np.zeros_like(logits)
        if tok.no_timestamps is not None:
            mask[:, tok.no_timestamps] = -np.inf
        for k, seq in enumerate(seqs):
            last_ts = len(seq) >= 1 and seq[-1] >= ts
            penultimate_ts = len(seq) < 2 or seq[-2] >= ts
            if last_ts:
                if penultimate_ts:
                    mask[k, ts:] = -np.inf  # a pair just closed: text must follow
                else:
                    mask[k, :eot] = -np.inf  # a segment just ended: timestamp or end of text
            if self.monotonic_timestamps:
                stamps = [t for t in seq if t >= ts]
                if stamps:
                    floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
                    mask[k, ts:floor] = -np.inf
        if start:
            mask[:, :ts] = -np.inf  # the first token is a timestamp, at most 1 s in
            mask[:, ts + MAX_INITIAL_TIMESTAMP + 1 :] = -np.inf
        # timestamps together outweigh any single text token: judged before this filter's own mask
        logprobs = logits - _logsumexp(logits)[:, None]
        mask[_logsumexp(logprobs[:, ts:]) > logprobs[:, :ts].max(axis=-1), :ts] = -np.inf
        return logits + mask
