"""Modality detection: content sniffing first (magic bytes), file extension second."""

from __future__ import annotations

import posixpath

AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac", ".webm", ".weba", ".mp4a"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TEXT_EXT = {".txt", ".md"}
JSON_EXT = {".json", ".jsonl"}
SIDECARS = {"metadata.jsonl", "metadata.csv"}
SNIFF_BYTES = 64


_AUDIO_FTYP = (
    b"M4A ",
    b"M4B ",
    b"M4P ",
    b"mp41",
    b"mp42",
    b"isom",
    b"iso2",
    b"dash",
    b"3gp4",
    b"3gp5",
    b"qt  ",
)
_IMAGE_FTYP = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")
_BMP_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)


def sniff(data: bytes) -> str | None:
    """Classify bytes by magic numbers: "audio", "image", "text" or None."""
    if not data:
        return None
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image"
    if head[:6] in (b"GIF87a", b"GIF89a") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_FTYP:
            return "image"
        return "audio"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio"
    if head.startswith((b"fLaC", b"OggS", b"ID3", b"\x1a\x45\xdf\xa3", b"#!AMR", b".snd")):
        return "audio"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06) != 0:
        return "audio"  # MPEG audio frame sync (mp3) or ADTS AAC
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "audio"  # ADTS AAC (layer bits 00)
    return "text" if _looks_like_text(bytes(data[:4096]), cut=len(data) > 4096) else None


def _looks_like_text(chunk: bytes, cut: bool) -> bool:
    if b"\x00" in chunk:
        return False
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut by the 4 KiB window is still text.
        if not cut or e.start < len(chunk) - 3:
            return False
        text = chunk[: e.start].decode("utf-8")
    if not text:
        return False
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f")
    return controls <= len(text) // 100


def modality_from_name(key: str) -> str | None:
    name = posixpath.basename(key)
    if name in SIDECARS:
        return "sidecar"
    ext = posixpath.splitext(name)[1].lower()
    if ext in AUDIO_EXT:
        return "audio"
    if ext in IMAGE_EXT:
        return "image"
    if ext in TEXT_EXT:
        return "text"
    if ext in JSON_EXT:
        return "json"
    return None


def detect_modality(key: str, head: bytes | None) -> tuple[str, str]:
    """(modality, how) where how is "content", "extension" or "unknown"."""
    by_name = modality_from_name(key)
    if by_name in ("sidecar", "text", "json"):
        return by_name, "extension"
    by_content = sniff(head) if head else None
    if by_content in ("audio", "image"):
        return by_content, "content"
    if by_name:
        return by_name, "extension"
    return "unknown", "unknown"
