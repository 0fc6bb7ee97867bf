import tracemalloc

import numpy as np
import pytest
from corpus import build, png_bomb

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
    item = next(it for it in CORPUS if it.name == "tone flac")  # 1.5 s at 44.1 kHz
    audio = decode_audio(item.data)
    assert abs(audio.size - 24000) <= 64
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 440) < 5
    assert decode_audio(item.data, sample_rate=8000).size == pytest.approx(12000, abs=64)


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
    for name in ("speech wav", "tone flac", "tone mp3", "tone opus", "tone m4a", "tone webm"):
        assert kinds[name] == "audio", name
    for name in ("photo jpeg", "rgba png", "photo webp", "animated gif", "photo bmp", "photo tiff"):
        assert kinds[name] == "image", name
    assert kinds["html named png"] == "text"
    assert sniff("naïve café ✓ ".encode() * 1000) == "text"  # multi-byte char cut at the 4 KiB window
    assert sniff(b"") is None and sniff(b"\x00\x01\x02\x03" * 10) is None
    assert sniff(b"BMW makes cars") == "text"
    assert sniff("café".encode("latin-1")) is None
