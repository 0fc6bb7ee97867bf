"""Agreement of streamtune's batched Whisper with `mlx_whisper.transcribe` on generated speech.

    python -m bench.whisper_reference [--models offline:tiny.en,offline:base] [--batch 8] [--per-language 10]

espeak-ng sentences (English for English-only models; English, German, Spanish, French and Italian for
multilingual ones) are transcribed by `mlx_whisper.transcribe` (fp32, temperature 0, no conditioning on
previous text, language given) one clip at a time, and by `Transcriber` in one batched call. The last
stdout line is a JSON object with, per model:

    exact           share of clips whose text is identical (whitespace normalised)
    char_diff       mean character edit distance / reference length
    wer_ours        word error rate of streamtune's text against the spoken words
    wer_reference   the same for mlx_whisper's text
    loops_ours      clips whose text compresses like a repetition loop (gzip ratio > 2.4)
    loops_reference the same for mlx_whisper
    language_agree  share of clips where detection (language=None) matches mlx_whisper's
    rtf_ours        audio seconds per wall second, batched
    rtf_reference   the same, one mlx_whisper.transcribe call per clip
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import zlib

import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before mlx)

SENTENCES = {
    "en": [
        "hello world this is a test",
        "the quick brown fox jumps over the lazy dog",
        "streaming data from object storage into fine tuning",
        "please call stella and ask her to bring these things with her from the store",
        "good morning everyone and welcome to the meeting",
        "the weather is nice today so we will walk to the park",
        "machine learning models need a lot of clean data",
        "she was buying apples and pears at the market on saturday",
        "the children played football in the garden until it got dark",
        "our train leaves at seven so we should get up early",
    ],
    "de": [
        "guten morgen und willkommen zu unserer kleinen besprechung",
        "der schnelle braune fuchs springt über den faulen hund",
        "heute ist das wetter schön und wir gehen in den park",
        "die kinder spielen im garten bis es dunkel wird",
    ],
    "es": [
        "buenos días a todos y bienvenidos a la reunión",
        "el rápido zorro marrón salta sobre el perro perezoso",
        "hoy hace buen tiempo y vamos a caminar al parque",
        "los niños juegan en el jardín hasta que oscurece",
    ],
    "fr": [
        "bonjour à tous et bienvenue à notre réunion",
        "le renard brun rapide saute par dessus le chien paresseux",
        "aujourd'hui il fait beau et nous allons marcher au parc",
        "les enfants jouent dans le jardin jusqu'à la nuit",
    ],
    "it": [
        "buongiorno a tutti e benvenuti alla nostra riunione",
        "la volpe marrone veloce salta sopra il cane pigro",
        "oggi il tempo è bello e andiamo a camminare al parco",
        "i bambini giocano in giardino fino a quando fa buio",
    ],
}


def speech(text: str, voice: str = "en") -> np.ndarray:
    from streamtune.decode.media import decode_audio

    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-w", "/dev/stdout", text], capture_output=True, check=True
    ).stdout
    return decode_audio(wav)


def normalise(text: str) -> str:
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def looped(text: str) -> bool:
    data = text.encode()
    return len(data) > 0 and len(data) / len(zlib.compress(data)) > 2.4


def compare(model: str, batch: int, detect: bool = True, per_language: int = 10) -> dict:
    import mlx.core as mx
    import mlx_whisper

    from streamtune.decode.whisper import Transcriber

    ours = Transcriber(model, language=None, batch_size=batch)
    langs = list(SENTENCES) if ours.model.is_multilingual else ["en"]
    n = per_language if ours.model.is_multilingual else None
    items = [(lang, s) for lang in langs for s in SENTENCES[lang][:n]]
    clips = [speech(s, lang) for lang, s in items]
    seconds = sum(c.size for c in clips) / 16000

    t0 = time.perf_counter()
    refs = [
        mlx_whisper.transcribe(
            c, path_or_hf_repo=ours.path, fp16=False, temperature=0, condition_on_previous_text=False,
            language=lang,
        )["text"]
        for c, (lang, _) in zip(clips, items, strict=True)
    ]  # fmt: skip
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    got = [r["text"] for r in ours.transcribe(clips, languages=[lang for lang, _ in items])]
    t_ours = time.perf_counter() - t0

    agree = None
    if detect and ours.model.is_multilingual:
        ours.language = None
        detected = [r["language"] for r in ours.transcribe(clips)]
        ref_lang = []
        for c in clips:
            mel = mlx_whisper.audio.log_mel_spectrogram(c, n_mels=ours.model.dims.n_mels, padding=480000)
            _, probs = ours.model.detect_language(mlx_whisper.audio.pad_or_trim(mel, 3000, axis=-2))
            ref_lang.append(max(probs, key=probs.get))
        agree = float(np.mean([a == b for a, b in zip(detected, ref_lang, strict=True)]))
    del mx

    rows = []
    for (lang, spoken), ref, our in zip(items, refs, got, strict=True):
        rows.append(
            {
                "lang": lang,
                "spoken": spoken,
                "reference": normalise(ref),
                "ours": normalise(our),
                "same": normalise(ref) == normalise(our),
            }
        )
    n_words = sum(len(words(s)) for _, s in items)
    return {
        "model": model,
        "clips": len(items),
        "exact": float(np.mean([r["same"] for r in rows])),
        "char_diff": float(
            np.mean([edit_distance(r["reference"], r["ours"]) / max(1, len(r["reference"])) for r in rows])
        ),
        "wer_ours": sum(edit_distance(words(s), words(g)) for (_, s), g in zip(items, got, strict=True))
        / n_words,
        "wer_reference": sum(edit_distance(words(s), words(r)) for (_, s), r in zip(items, refs, strict=True))
        / n_words,
        "loops_ours": sum(looped(g) for g in got),
        "loops_reference": sum(looped(r) for r in refs),
        "language_agree": agree,
        "audio_seconds": round(seconds, 1),
        "rtf_ours": seconds / t_ours,
        "rtf_reference": seconds / t_ref,
        "differences": [r for r in rows if not r["same"]],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="offline:tiny.en,offline:base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-detect", action="store_true")
    ap.add_argument(
        "--per-language", type=int, default=10, help="sentences per language, multilingual models"
    )
    args = ap.parse_args(argv)
    out = {}
    for model in args.models.split(","):
        res = compare(model, args.batch, detect=not args.no_detect, per_language=args.per_language)
        for d in res["differences"]:
            print(
                f"[{model} {d['lang']}] ref: {d['reference']!r}\n{' ' * (len(model) + 6)}ours: {d['ours']!r}"
            )
        out[model] = {k: v for k, v in res.items() if k != "differences"}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
