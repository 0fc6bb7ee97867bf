import tracemalloc

import numpy as np
import pytest
from corpus import build, encode_audio, float_wav, png_bomb, tone

import streamtune  # noqa: F401
from streamtune.decode.media import MediaError, decode_audio, decode_image, sniff

CORPUS = build()
MEDIA = [it for it in CORPUS if it.column in ("audio", "image")]


def test_corpus_is_hostile_enough():
    assert sum(not it.ok for it in CORPUS) >= 20


@pytest.mark.parametrize("item", MEDIA, ids=[it.name for it in MEDIA])
def test_corpus_item_decodes_or_fails_with_reason(item):
    decode = decode_audio if item.column == "audio" else decode_image
    if item.ok:
        out = decode(item.data)
        if item.column == "audio":
            assert out.dtype == np.float32 and out.ndim == 1 and out.size > 8000
            assert np.isfinite(out).all() and 0 < np.abs(out).max() <= 1.5
        else:
            assert out.mode == "RGB"
            assert out.size == item.extra.get("size", out.size)
    else:
        with pytest.raises(MediaError) as err:
            decode(item.data)
        assert err.value.kind in item.expect, str(err.value)
        assert err.value.reason


def test_audio_is_resampled_to_16k_mono():
    pcm = np.stack([tone(1.5, 44100, 440.0), tone(1.5, 44100, 440.0)], axis=1)  # stereo 44.1 kHz
    data = encode_audio(pcm.mean(axis=1), 44100, "flac", "flac")
    audio = decode_audio(data)
    assert abs(audio.size - 24000) <= 64
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 440) < 5
    assert decode_audio(data, sample_rate=8000).size == pytest.approx(12000, abs=64)
    stereo = float_wav(pcm, 44100)
    assert decode_audio(stereo).size == pytest.approx(24000, abs=64)


def test_exif_orientation_and_gif_first_frame():
    rotated = next(it for it in CORPUS if it.name == "exif rotated")
    assert decode_image(rotated.data).size == (64, 96)
    gif = next(it for it in CORPUS if it.name == "animated gif")
    assert decode_image(gif.data).getpixel((5, 5)) == (255, 0, 0)


def test_transparent_images_are_composited_on_white():
    item = next(it for it in CORPUS if it.name == "palette png")
    img = decode_image(item.data)
    assert img.mode == "RGB"


def test_bomb_rejected_before_allocating():
    data = png_bomb(50_000, 50_000)  # 2.5 gigapixels declared
    tracemalloc.start()
    with pytest.raises(MediaError) as err:
        decode_image(data, max_pixels=64_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.kind == "bomb"
    assert peak < 8 << 20


def test_pixel_limit_is_configurable():
    item = next(it for it in CORPUS if it.name == "photo png" or it.name == "photo jpeg")
    with pytest.raises(MediaError) as err:
        decode_image(item.data, max_pixels=1000)
    assert err.value.kind == "bomb"


def test_audio_length_limit():
    item = next(it for it in CORPUS if it.name == "speech wav")
    with pytest.raises(MediaError) as err:
        decode_audio(item.data, max_seconds=0.5)
    assert err.value.kind == "too_long"


def test_sniff():
    kinds = {it.name: sniff(it.data) for it in CORPUS if isinstance(it.data, bytes) and it.data}
    for name in ("speech wav", "speech flac", "speech mp3", "speech opus", "speech m4a", "speech webm"):
        assert kinds[name] == "audio", name
    for name in ("photo jpeg", "rgba png", "photo webp", "animated gif", "photo bmp", "photo tiff"):
        assert kinds[name] == "image", name
    assert kinds["html named png"] == "text"
    assert sniff("naïve café ✓ ".encode() * 1000) == "text"  # multi-byte char cut at the 4 KiB window
    assert sniff(b"") is None and sniff(b"\x00\x01\x02\x03" * 10) is None
    assert sniff(b"BMW makes cars") == "text"
    assert sniff("café".encode("latin-1")) is None


def test_jpeg_draft_decodes_at_reduced_scale_but_never_below_min_side():
    from corpus import gradient, image_bytes

    data = image_bytes(gradient(1600, 1000), "JPEG", quality=90)
    full = decode_image(data)
    small = decode_image(data, min_side=224)
    assert full.size == (1600, 1000)
    assert small.size == (400, 250) and min(small.size) >= 224
    png = image_bytes(gradient(800, 600), "PNG")
    assert decode_image(png, min_side=224).size == (800, 600)  # only JPEG has DCT scaling
