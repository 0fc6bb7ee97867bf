import json
import os

import numpy as np
import pytest
from corpus import speech

import streamtune  # noqa: F401
from streamtune.decode.media import decode_audio
from streamtune.decode.whisper import Transcriber, split_at_pauses
from streamtune.decode.whisper_convert import offline_whisper_dir, resolve_whisper


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("whisper-cache"))


@pytest.fixture(scope="module")
def tiny_dir(cache):
    return offline_whisper_dir("tiny.en", cache)


def load_weights(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "weights.safetensors"))


def test_ct2_conversion_matches_mlx_whisper_model(tiny_dir, cache):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.load_models import load_model

    with open(os.path.join(tiny_dir, "config.json")) as f:
        dims = json.load(f)
    assert dims["n_vocab"] == 51864 and dims["n_audio_layer"] == 4 and dims["n_text_head"] == 6
    weights = load_weights(tiny_dir)
    model = load_model(tiny_dir, dtype=mx.float32)
    params = dict(tree_flatten(model.parameters()))
    params.pop("encoder._positional_embedding", None)
    params.pop("alignment_heads", None)  # set from config, not weights
    assert set(params) == set(weights)
    for name, value in weights.items():
        assert tuple(params[name].shape) == value.shape, name
        assert np.isfinite(value).all(), name
    # A second call reuses the cached conversion instead of converting again.
    mtime = os.path.getmtime(os.path.join(tiny_dir, "weights.safetensors"))
    assert offline_whisper_dir("tiny.en", cache) == tiny_dir
    assert os.path.getmtime(os.path.join(tiny_dir, "weights.safetensors")) == mtime


def test_openai_and_transformers_checkpoints_convert_to_the_same_weights(tiny_dir, tmp_path):
    import torch
    from safetensors.numpy import save_file

    weights = load_weights(tiny_dir)
    with open(os.path.join(tiny_dir, "config.json")) as f:
        dims = {k: v for k, v in json.load(f).items() if k != "model_type"}

    # OpenAI layout: mlp.0/mlp.2, conv weights (out, in, k), a stored encoder positional embedding.
    state = {}
    for key, value in weights.items():
        if "conv" in key and value.ndim == 3:
            value = value.transpose(0, 2, 1)
        state[key.replace(".mlp1.", ".mlp.0.").replace(".mlp2.", ".mlp.2.")] = torch.from_numpy(value.copy())
    state["encoder.positional_embedding"] = torch.zeros(dims["n_audio_ctx"], dims["n_audio_state"])
    torch.save({"dims": dims, "model_state_dict": state}, tmp_path / "tiny.pt")
    converted = load_weights(resolve_whisper(str(tmp_path / "tiny.pt"), str(tmp_path / "cache")))
    assert set(converted) == set(weights)
    for key in weights:
        np.testing.assert_array_equal(converted[key], weights[key])

    # transformers layout.
    renames = [
        ("encoder.ln_post.", "model.encoder.layer_norm."),
        ("decoder.ln.", "model.decoder.layer_norm."),
        ("decoder.token_embedding.", "model.decoder.embed_tokens."),
        ("decoder.positional_embedding", "model.decoder.embed_positions.weight"),
        (".cross_attn_ln.", ".encoder_attn_layer_norm."),
        (".attn_ln.", ".self_attn_layer_norm."),
        (".mlp_ln.", ".final_layer_norm."),
        (".cross_attn.", ".encoder_attn."),
        (".attn.", ".self_attn."),
        (".query.", ".q_proj."),
        (".key.", ".k_proj."),
        (".value.", ".v_proj."),
        (".out.", ".out_proj."),
        (".mlp1.", ".fc1."),
        (".mlp2.", ".fc2."),
        (".blocks.", ".layers."),
    ]
    hf = {}
    for key, value in weights.items():
        new = key
        for old, repl in renames:
            new = new.replace(old, repl)
        if not new.startswith("model."):
            new = "model." + new
        hf[new] = value.transpose(0, 2, 1).copy() if "conv" in key and value.ndim == 3 else value
    hf["proj_out.weight"] = weights["decoder.token_embedding.weight"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(hf, str(hf_dir / "model.safetensors"))
    config = {
        "model_type": "whisper",
        "num_mel_bins": dims["n_mels"],
        "max_source_positions": dims["n_audio_ctx"],
        "d_model": dims["n_audio_state"],
        "encoder_attention_heads": dims["n_audio_head"],
        "encoder_layers": dims["n_audio_layer"],
        "vocab_size": dims["n_vocab"],
        "max_target_positions": dims["n_text_ctx"],
        "decoder_attention_heads": dims["n_text_head"],
        "decoder_layers": dims["n_text_layer"],
    }
    (hf_dir / "config.json").write_text(json.dumps(config))
    converted = load_weights(resolve_whisper(str(hf_dir), str(tmp_path / "cache")))
    assert set(converted) == set(weights)
    for key in weights:
        np.testing.assert_array_equal(converted[key], weights[key])


def test_bad_model_references(tmp_path):
    with pytest.raises(ValueError, match="no offline whisper"):
        resolve_whisper("offline:large-v9")
    with pytest.raises(ValueError, match="not found"):
        resolve_whisper(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an mlx-whisper"):
        resolve_whisper(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="English-only"):
        Transcriber("offline:tiny.en", language="de", cache_dir=str(tmp_path))


SENTENCES = ["hello world this is a test", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def clips():
    audios = [decode_audio(speech(s)) for s in SENTENCES]
    # A long clip: speech, 33 s of silence, speech again -> two 30 s windows.
    long = np.concatenate([audios[0], np.zeros(33 * 16000, np.float32), audios[1]])
    return audios + [long]


@pytest.fixture(scope="module")
def transcripts(tiny_dir, clips):
    batched = Transcriber(tiny_dir, batch_size=8)
    single = Transcriber(tiny_dir, batch_size=1)
    return batched.transcribe(clips), single.transcribe(clips), batched, single


@pytest.mark.slow
def test_espeak_speech_keywords_tiny_en(transcripts):
    out = transcripts[0]
    assert "world" in out[0]["text"].lower() and "test" in out[0]["text"].lower()
    # tiny.en hears "the quick roundfire stump over the lazy dog", as mlx_whisper.transcribe does
    assert "quick" in out[1]["text"].lower() and "dog" in out[1]["text"].lower()
    for r in out:
        assert r["language"] == "en" and r["segments"]
        for s in r["segments"]:
            assert 0 <= s["start"] <= s["end"] <= r["seconds"] + 0.01


@pytest.mark.slow
def test_batched_equals_unbatched(transcripts):
    batched, single, b_model, s_model = transcripts
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    for a, b in zip(batched, single, strict=True):
        assert len(a["segments"]) == len(b["segments"])
        for x, y in zip(a["segments"], b["segments"], strict=True):
            assert x["text"] == y["text"]
            assert abs(x["start"] - y["start"]) <= 0.02 and abs(x["end"] - y["end"]) <= 0.02
    assert b_model.stats["windows"] == s_model.stats["windows"] == 4
    # the long clip's second window starts where its first one's transcript says: a second round
    assert b_model.stats["batches"] == 2 and s_model.stats["batches"] == 4


@pytest.mark.slow
def test_long_audio_has_absolute_timestamps(transcripts):
    long = transcripts[0][2]
    assert long["seconds"] > 35
    text = long["text"].lower()
    assert "world" in text and "fox" in text
    late = [s for s in long["segments"] if s["start"] >= 30]
    assert late and any("fox" in s["text"].lower() for s in late)
    assert all(s["end"] < 30.5 for s in long["segments"] if "world" in s["text"].lower())


@pytest.mark.slow
def test_speech_across_a_window_boundary_is_transcribed_whole(transcripts):
    """A sentence from 27.5 s to 32.7 s: the first window ends inside it, so the next starts where it began.
    (Cut at a fixed 30 s instead, tiny.en loses "quick brown fox jumps over the lazy dog" altogether.)"""
    model = transcripts[2]
    sentence = decode_audio(speech(SENTENCES[1] + " and then it runs far away into the green forest"))
    quiet = 1e-4 * np.random.default_rng(0).standard_normal(int(27.5 * 16000)).astype(np.float32)
    out = model.transcribe([np.concatenate([quiet, sentence, np.zeros(16000, np.float32)])])[0]
    assert "dog" in out["text"].lower() and "forest" in out["text"].lower()
    across = [s for s in out["segments"] if s["start"] < 30 < s["end"]]
    assert across and "dog" in across[0]["text"].lower()


def test_long_audio_is_cut_only_at_pauses():
    rng = np.random.default_rng(0)
    talk = lambda seconds: 0.3 * rng.standard_normal(int(seconds * 16000)).astype(np.float32)  # noqa: E731
    hush = lambda seconds: 0.002 * rng.standard_normal(int(seconds * 16000)).astype(np.float32)  # noqa: E731
    parts, pauses, at = [], [], 0
    for _ in range(12):  # 12 x (9 s of "speech" + 0.8 s pause) = 117.6 s
        parts += [talk(9), hush(0.8)]
        at += 9 * 16000
        pauses.append((at, at + int(0.8 * 16000)))
        at += int(0.8 * 16000)
    audio = np.concatenate(parts)
    cuts = split_at_pauses(audio, 30)
    assert 2 <= len(cuts) <= 4
    assert all(any(lo <= c <= hi for lo, hi in pauses) for c in cuts), "every cut lies in a pause"
    assert all(abs(b - a - 30 * 16000) <= 8 * 16000 for a, b in zip([0, *cuts], cuts, strict=False))
    assert split_at_pauses(talk(120), 30) == [], "no pause, no cut"
    assert split_at_pauses(audio[: 20 * 16000], 30) == [], "short clips stay whole"


@pytest.mark.slow
def test_pieces_of_a_long_clip_are_decoded_together(tiny_dir):
    voices = [decode_audio(speech(s)) for s in SENTENCES]
    pause = np.zeros(16000, np.float32)
    clip = np.concatenate([part for k in range(12) for part in (voices[k % 2], pause)])
    model = Transcriber(tiny_dir, batch_size=8)
    model.piece_seconds = 10.0
    out = model.transcribe([clip])[0]
    assert model.stats["windows"] >= 3 and model.stats["batches"] <= 2, model.stats
    text = out["text"].lower()
    assert text.count("fox") >= 3 and text.count("world") >= 3
    starts = [s["start"] for s in out["segments"]]
    assert starts == sorted(starts) and out["segments"][-1]["end"] <= out["seconds"] + 0.01


@pytest.mark.slow
def test_multilingual_base_detects_english(tmp_path):
    clip = decode_audio(speech("hello world this is a test"))
    base = Transcriber("offline:base", language=None, cache_dir=str(tmp_path))
    assert base.model.is_multilingual
    out = base.transcribe([clip])[0]
    assert out["language"] == "en"
    assert "hello" in out["text"].lower() and "world" in out["text"].lower()


def test_cached_decoder_step_matches_mlx_whisper_decoder(tiny_dir):
    import mlx.core as mx
    from mlx_whisper.load_models import load_model

    from streamtune.decode.whisper import cross_attention_cache, decoder_step

    model = load_model(tiny_dir, dtype=mx.float32)
    features = mx.random.normal((3, 1500, 384), key=mx.random.key(0)) * 0.5
    prompt = mx.array([[50257, 50363, 464, 2068]] * 3)
    ref, ref_cache, _ = model.decoder(prompt, features)
    cross = cross_attention_cache(model, features)
    got, cache = decoder_step(model, prompt, cross, None)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-3)
    step = mx.array([[7586], [318], [257]])
    ref, _, _ = model.decoder(step, features, kv_cache=ref_cache)
    got, _ = decoder_step(model, step, cross, cache)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-3)


def test_chunked_log_mel_and_encoder_are_bit_identical_to_mlx_whisper(tiny_dir, clips):
    # log-mel 777 frames at a time and self-attention 300 query rows at a time hold a fraction of the
    # reference's memory; the text can only stay the same if the numbers do
    import mlx.core as mx
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram
    from mlx_whisper.load_models import load_model

    from streamtune import cpu_ops
    from streamtune.decode.whisper import encode_window, log_mel

    model = load_model(tiny_dir, dtype=mx.float32)
    for audio in (clips[-1], clips[0][:401]):
        ref = log_mel_spectrogram(mx.array(audio), n_mels=80, padding=N_SAMPLES)
        mel = log_mel(audio, 80, N_SAMPLES, chunk_frames=777)
        assert mel.shape == ref.shape and mx.array_equal(mel, ref).item()
    window = log_mel(clips[-1], 80, N_SAMPLES)[3000:6000]  # speech after the silence
    reference = model.encoder(window[None])
    with cpu_ops.enabled(False):  # MLX's own softmax: mlx-whisper's encoder bit for bit
        assert mx.array_equal(encode_window(model, window), reference).item()
    # numpy's softmax on the CPU: the last bits differ
    assert mx.allclose(encode_window(model, window), reference, rtol=1e-4, atol=1e-4).item()


def test_transcriber_imports_mlx_whisper_without_its_transcribe_module(tiny_dir):
    # the package __init__ would import mlx_whisper.transcribe -> timing -> numba + scipy (~150 MB)
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from streamtune.decode.whisper import Transcriber\n"
        f"Transcriber({tiny_dir!r})\n"
        "print(sorted(m for m in ('numba', 'scipy', 'mlx_whisper.transcribe') if m in sys.modules))\n"
        "import mlx_whisper\n"
        "print(callable(mlx_whisper.transcribe), 'numba' in sys.modules, mlx_whisper.__version__ != '')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True True True"]


def test_pause_free_audio_is_cut_after_one_buffer():
    from streamtune.decode.longform import transcribe_stream

    class Lengths:  # records the clips the stream hands over; no model needed for the cutting rule
        piece_seconds = 4.0

        def __init__(self):
            self.clips = []

        def transcribe(self, audios):
            self.clips.append(audios[0].size / 16000)
            return [{"text": "", "segments": [], "language": "en", "seconds": self.clips[-1]}]

    t = np.arange(35 * 16000) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    windows = [(a / 16000, tone[a : a + 5 * 16000]) for a in range(0, tone.size, 5 * 16000)]
    rec, stats = Lengths(), {}
    out = transcribe_stream(rec, windows, buffer_seconds=10.0, stats=stats)
    assert rec.clips == [10.0, 10.0, 10.0, 5.0] and out["seconds"] == 35.0
    assert stats["peak_pcm_bytes"] == 10 * 16000 * 4, "never more than one buffer held"
