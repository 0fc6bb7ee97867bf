"""Modality detection: content sniffing first (magic bytes), file extension second."""

from __future__ import annotations

import posixpath

AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac", ".webm", ".weba", ".mp4a"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TEXT_EXT = {".txt", ".md"}
JSON_EXT = {".json", ".jsonl"}
SIDECARS = {"metadata.jsonl", "metadata.csv"}
SNIFF_BYTES = 64


def sniff_bytes(head: bytes) -> str | None:
    """Return "audio" or "image" from the first bytes of a file, or None if not recognised."""
    if len(head) < 4:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3" or head[:4] == b"FORM":
        return "audio"
    if head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2") or head[:2] in (b"\xff\xf1", b"\xff\xf9"):
        return "audio"  # MPEG-1/2 layer III frame sync, ADTS AAC
    if head[4:8] == b"ftyp" and head[8:12] in (b"M4A ", b"M4B ", b"mp42", b"isom", b"dash"):
        return "audio"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "audio"  # Matroska/WebM: treated as audio (video tracks are not decoded)
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image"
    return None


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
    by_content = sniff_bytes(head) if head else None
    if by_content:
        return by_content, "content"
    if by_name:
        return by_name, "extension"
    return "unknown", "unknown"
