"""An output's real format: the extension from its magic bytes, else what the transport says.

A file gets the extension of its content, not of whatever name the caller or the model
suggested; `content_type_for` gives the MIME type reported for that extension.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from urllib.parse import urlsplit

_EXT_TO_MIME: Mapping[str, str] = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".avif": "image/avif",
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".txt": "text/plain",
    ".json": "application/json",
    ".bin": "application/octet-stream",
}
_MIME_TO_EXT: Mapping[str, str] = {
    **{mime: ext for ext, mime in _EXT_TO_MIME.items()},
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/mp3": ".mp3",
    "audio/x-flac": ".flac",
    "audio/x-m4a": ".m4a",
    "application/ogg": ".ogg",
}
_EXT_ALIASES: Mapping[str, str] = {".jpeg": ".jpg", ".jpe": ".jpg", ".oga": ".ogg"}
# Servers use these when they do not know; they say nothing about the format.
_UNINFORMATIVE_MIME = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_SIMPLE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
)
_FTYP_BRANDS: Mapping[bytes, str] = {
    b"qt  ": ".mov",
    b"M4A ": ".m4a",
    b"M4B ": ".m4a",
    b"avif": ".avif",
    b"avis": ".avif",
}
HEAD_BYTES = 512  # enough for every signature above, incl. the Matroska DocType


def sniff_extension(
    head: bytes,
    content_type: str | None = None,
    url: str | None = None,
    fallback: str | None = None,
) -> str:
    """Return ".ext" from magic bytes, else Content-Type, URL path, fallback, ".bin"."""
    return (
        _ext_from_magic(head)
        or _ext_from_content_type(content_type)
        or _ext_from_url(url)
        or normalise_fallback(fallback)
        or ".bin"
    )


def content_type_for(ext: str) -> str:
    """The MIME type of a sniffed extension."""
    return _EXT_TO_MIME.get(ext, "application/octet-stream")


def _ext_from_magic(head: bytes) -> str | None:
    for magic, ext in _SIMPLE_MAGIC:
        if head.startswith(magic):
            return ext
    if head.startswith(b"RIFF"):
        return {b"WEBP": ".webp", b"WAVE": ".wav"}.get(head[8:12])
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], ".mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM is a Matroska profile
        return ".mkv" if b"matroska" in head[:64] else ".webm"
    return _ext_from_mpeg_sync(head)


def _ext_from_mpeg_sync(head: bytes) -> str | None:
    """Recognise a bare MPEG audio frame (MP3 without ID3) or an ADTS AAC frame."""
    if len(head) < 2 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    layer = (head[1] >> 1) & 0b11
    return ".aac" if layer == 0 else ".mp3"


def _ext_from_content_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    return None if mime in _UNINFORMATIVE_MIME else _MIME_TO_EXT.get(mime)


def _ext_from_url(url: str | None) -> str | None:
    if not url or url[:5].lower() == "data:":
        return None
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    return _canonical_ext(PurePosixPath(path).suffix)


def _canonical_ext(ext: str) -> str | None:
    """Map ".JPEG" to ".jpg" and so on; None for extensions we do not know."""
    ext = ext.lower()
    ext = _EXT_ALIASES.get(ext, ext)
    return ext if ext in _EXT_TO_MIME else None


def normalise_fallback(fallback: str | None) -> str | None:
    """Accept "webp", ".WEBP" or "jpeg"; anything but a short alnum suffix is a bug."""
    if fallback is None:
        return None
    ext = fallback.lower() if fallback.startswith(".") else "." + fallback.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
        raise ValueError(f"malformed fallback extension {fallback!r}")
    return _EXT_ALIASES.get(ext, ext)
