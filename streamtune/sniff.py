"""Modality detection: content sniffing first (magic bytes), file extension second."""

from __future__ import annotations

import posixpath
import re
import struct

AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac", ".webm", ".weba", ".mp4a"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
TEXT_EXT = {".txt", ".md"}
JSON_EXT = {".json", ".jsonl"}
VIDEO_EXT = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".3gp"}
SIDECARS = {"metadata.jsonl", "metadata.csv"}
# Head bytes the manifest reads: enough for Matroska's track list and MP4s whose index (moov) comes first.
SNIFF_BYTES = 8192
MORE_BYTES = 65536  # read where an MP4's index starts when it follows the media data
# Audio-only containers of the MP4 family, by extension, when the tracks are out of sight.
_ISO_AUDIO_EXT = {".m4a", ".m4b", ".m4p", ".mp4a", ".aac", ".3ga"}
_EBML_AUDIO_EXT = {".weba", ".mka", ".opus", ".ogg", ".oga"}


_AUDIO_FTYP = (b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B ")
_VIDEO_FTYP = (b"M4V ", b"M4VH", b"M4VP", b"F4V ", b"F4P ")
_ISO_CONTAINERS = {b"moov", b"trak", b"mdia"}
_EBML_TRACK = re.compile(rb"\x86[\x81-\xbf]([VAS])_")  # CodecID element: "V_VP9", "A_OPUS", "S_TEXT/UTF8"
_IMAGE_FTYP = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")
_BMP_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)


def sniff(data: bytes) -> str | None:
    """Classify bytes by magic numbers: "audio", "image", "video", "text" or None."""
    return _sniff(data)[0]


def _sniff(data: bytes) -> tuple[str | None, bool]:
    """(kind, certain): containers whose tracks lie beyond `data` are guessed "video", uncertain."""
    if not data:
        return None, True
    kind = _sniff_container(data)
    if kind is not None:
        return kind
    return _sniff_magic(data), True


def _sniff_container(data: bytes) -> tuple[str, bool] | None:
    """MP4/MOV (ISO-BMFF) and Matroska/WebM: video when a video track is seen, audio when only audio."""
    head = bytes(data[:12])
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_FTYP:
            return "image", True
        if brand in _AUDIO_FTYP:
            return "audio", True
        if brand in _VIDEO_FTYP:
            return "video", True
        handlers, _ = iso_handlers(data)
        if b"vide" in handlers:
            return "video", True
        if b"soun" in handlers:
            return "audio", True
        return "video", False
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        tracks = {m.group(1) for m in _EBML_TRACK.finditer(bytes(data[:SNIFF_BYTES]))}
        if b"V" in tracks:
            return "video", True
        if b"A" in tracks:
            return "audio", True
        return "video", False
    return None


def iso_handlers(data: bytes, offset: int = 0) -> tuple[set[bytes], int | None]:
    """Track handler types ("vide", "soun", ...) of the ISO-BMFF boxes in `data` (which starts at byte
    `offset` of the file), and the file offset of the first top-level box past `data` when the index
    (moov) was not reached, else None."""
    found: set[bytes] = set()
    view = memoryview(data)

    def walk(start: int, end: int, top: bool) -> int | None:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack_from(">I4s", view, pos)
            header = 8
            if size == 1:
                if pos + 16 > len(view):
                    return None
                size, header = struct.unpack_from(">Q", view, pos + 8)[0], 16
            elif size == 0:
                size = len(view) - pos
            if size < header:
                return None
            if kind in _ISO_CONTAINERS:
                walk(pos + header, min(pos + size, len(view)), False)
                if top:
                    return None
            elif kind == b"hdlr" and pos + header + 12 <= len(view):
                found.add(bytes(view[pos + header + 8 : pos + header + 12]))
            pos += size
        return offset + pos if top else None

    beyond = walk(0, len(view), True)
    return found, beyond


def more_bytes_at(head: bytes, size: int) -> int | None:
    """Where to read `MORE_BYTES` more to find an MP4's tracks when its index follows the media data."""
    if bytes(head[4:8]) != b"ftyp" or len(head) >= size or _sniff(head)[1]:
        return None
    _, beyond = iso_handlers(head)
    return beyond if beyond is not None and beyond < size else None


def _sniff_magic(data: bytes) -> str | None:
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image"
    if head[:6] in (b"GIF87a", b"GIF89a") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio"
    if head.startswith((b"fLaC", b"OggS", b"ID3", b"#!AMR", b".snd")):
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
    if ext in VIDEO_EXT:
        return "video"
    if ext in AUDIO_EXT:
        return "audio"
    if ext in IMAGE_EXT:
        return "image"
    if ext in TEXT_EXT:
        return "text"
    if ext in JSON_EXT:
        return "json"
    return None


def detect_modality(
    key: str, head: bytes | None, more: bytes | None = None, more_at: int = 0
) -> tuple[str, str]:
    """(modality, how) where how is "content", "extension" or "unknown". `more` holds bytes read at
    `more_at` (see `more_bytes_at`) for MP4s whose track list follows the media data."""
    by_name = modality_from_name(key)
    if by_name in ("sidecar", "text", "json"):
        return by_name, "extension"
    by_content, certain = _sniff(head) if head else (None, True)
    if more and by_content and not certain:
        handlers, _ = iso_handlers(more, more_at)
        if handlers & {b"vide", b"soun"}:
            by_content, certain = ("video" if b"vide" in handlers else "audio"), True
    if by_content and not certain:  # a container whose tracks are out of sight: the extension decides
        ext = posixpath.splitext(key)[1].lower()
        audio_ext = _ISO_AUDIO_EXT if bytes(head[4:8]) == b"ftyp" else _EBML_AUDIO_EXT
        return ("audio" if ext in audio_ext else "video"), "content"
    if by_content in ("audio", "image", "video"):
        return by_content, "content"
    if by_name:
        return by_name, "extension"
    return "unknown", "unknown"
