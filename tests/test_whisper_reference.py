"""streamtune's batched Whisper says what `mlx_whisper.transcribe` says (greedy, fp32, no conditioning on
previous text) on generated speech: identical text, whitespace aside, batched or one clip at a time."""

import subprocess

import numpy as np
import pytest

import streamtune  # noqa: F401
from streamtune.decode.media import decode_audio
from streamtune.decode.whisper import Transcriber, repeating_tail

ENGLISH = [
    "hello world this is a test",
    "the quick brown fox jumps over the lazy dog",
    "please call stella and ask her to bring these things with her from the store",
    "the weather is nice today so we will walk to the park",
]
OTHERS = {
    "de": "der schnelle braune fuchs springt über den faulen hund",
    "es": "hoy hace buen tiempo y vamos a caminar al parque",
    "fr": "les enfants jouent dans le jardin jusqu'à la nuit",
    "it": "buongiorno a tutti e benvenuti alla nostra riunione",
}


def voice(text: str, lang: str = "en") -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", lang, "-w", "/dev/stdout", text], capture_output=True, check=True
    ).stdout
    return decode_audio(wav)


def reference(model: Transcriber, clip: np.ndarray, language: str | None) -> dict:
    import mlx_whisper

    return mlx_whisper.transcribe(
        clip,
        path_or_hf_repo=model.path,
        fp16=False,
        temperature=0,
        condition_on_previous_text=False,
        language=language,
    )


def same(a: str) -> str:
    return " ".join(a.split())


@pytest.mark.slow
def test_tiny_en_matches_mlx_whisper(model_cache):
    clips = [voice(s) for s in ENGLISH[:2]]
    # just over 30 s: sentences back to back, so a window ends inside speech and the next seeks back to
    # the last closed segment
    pause = np.zeros(4000, np.float32)
    sentences = [voice(s) for s in ENGLISH[1:]]
    long = np.concatenate([part for k in range(10) for part in (sentences[k % 3], pause)])
    clips.append(long[: 32 * 16000])
    model = Transcriber("offline:tiny.en", batch_size=8, cache_dir=model_cache)
    batched = model.transcribe(clips)
    assert model.stats["batches"] < model.stats["windows"]
    for clip, got in zip(clips, batched, strict=True):
        assert same(got["text"]) == same(reference(model, clip, "en")["text"])
    model.batch_size = 1
    assert [r["text"] for r in model.transcribe(clips[1:])] == [r["text"] for r in batched[1:]]
    assert batched[-1]["seconds"] > 30 and batched[-1]["text"].lower().count("lazy dog") >= 2
    starts = [s["start"] for s in batched[-1]["segments"]]
    assert starts == sorted(starts) and any(s > 25 for s in starts)


@pytest.mark.heavy  # offline:base on four languages: about a minute idle, ten on a busy machine
def test_base_matches_mlx_whisper_in_four_languages(model_cache):
    langs = list(OTHERS)
    clips = [voice(OTHERS[lang], lang) for lang in langs]
    model = Transcriber("offline:base", language=None, batch_size=8, cache_dir=model_cache)
    batched = model.transcribe(clips, languages=langs)
    assert model.stats["batches"] == 1
    for lang, clip, got in zip(langs, clips, batched, strict=True):
        assert got["language"] == lang
        assert same(got["text"]) == same(reference(model, clip, lang)["text"])
    # one clip at a time, language detected as mlx_whisper detects it: the same language and text
    model.batch_size = 1
    alone = model.transcribe(clips[:1])[0]
    assert alone["language"] == "de" and alone["text"] == batched[0]["text"]


def test_repetition_loops_are_found_at_their_start():
    text = [11, 12, 13, 14, 15]
    assert repeating_tail(text + [7] * 31) is None
    assert repeating_tail(text + [7] * 32) == len(text) + 1  # one period kept
    loop = [21, 22, 23]
    assert repeating_tail(text + loop * 11) == len(text) + 3
    assert repeating_tail(text + [1, 2] * 8) is None  # "no no no" is speech, not a loop
