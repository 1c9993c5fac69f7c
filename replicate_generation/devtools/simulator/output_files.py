"""The bytes of a prediction's output file: real, valid, distinct per (prediction, index), so a
test can tell which output landed in which file; optionally a demo picture or clip of the prompt,
padded to a size the benchmarks ask for, or gzip-encoded into a bomb for the hostile tests."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
import zlib
from collections.abc import Callable
from functools import lru_cache

from replicate_generation.devtools.simulator.pictures import picture
from replicate_generation.devtools.simulator.video import mp4 as playable_mp4

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
    "wav": "audio/wav",
}


def _colour(tag: bytes) -> tuple[int, int, int]:
    digest = hashlib.sha256(tag).digest()
    return digest[0], digest[1], digest[2]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(tag: bytes) -> bytes:
    """Build a 1x1 truecolour PNG whose colour and tEXt comment come from the tag."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    scanline = b"\x00" + bytes(_colour(tag))  # filter type 0, then one RGB pixel
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", b"Comment\x00" + tag),
            _png_chunk(b"IDAT", zlib.compress(scanline)),
            _png_chunk(b"IEND", b""),
        )
    )


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _jpeg(tag: bytes) -> bytes:
    """Build a baseline 1x1 grey JPEG (one DC-only block) with the tag as a COM segment."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table with one 1-bit code: symbol 0
    return b"".join(
        (
            b"\xff\xd8",
            _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _jpeg_segment(0xFE, tag),
            _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
            _jpeg_segment(0xC0, b"\x08\x00\x01\x00\x01\x01\x01\x11\x00"),
            _jpeg_segment(0xC4, b"\x00" + one_code),  # DC table 0
            _jpeg_segment(0xC4, b"\x10" + one_code),  # AC table 0 (symbol 0 = EOB)
            _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            b"\x3f",  # DC difference 0 ("0"), EOB ("0"), padded with 1 bits
            b"\xff\xd9",
        )
    )


def _webp(tag: bytes) -> bytes:
    """Build a lossless (VP8L) 1x1 WebP whose pixel colour comes from the tag."""
    red, green, blue = _colour(tag)
    acc, nbits = 0, 0
    # VP8L, LSB-first: no transform, cache or meta codes; five one-symbol "simple" prefix codes.
    fields_ = [(0, 1), (0, 1), (0, 1)]
    for value in (green, red, blue, 255):
        fields_ += [(1, 1), (0, 1), (1, 1), (value, 8)]
    fields_ += [(1, 1), (0, 1), (0, 1), (0, 1)]
    for value, width in fields_:
        acc |= value << nbits
        nbits += width
    # Signature 0x2f, then 14-bit width-1, 14-bit height-1, alpha hint, 3-bit version: all 0.
    payload = b"\x2f" + b"\x00" * 4 + acc.to_bytes((nbits + 7) // 8, "little")
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _mp4_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _mp4(tag: bytes) -> bytes:
    """Build a minimal ISO-BMFF file: ftyp, a free box carrying the tag, an empty mdat."""
    ftyp = b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41"
    return _mp4_box(b"ftyp", ftyp) + _mp4_box(b"free", tag) + _mp4_box(b"mdat", b"")


def _wav(tag: bytes) -> bytes:
    """Build a 0.1 s mono 16-bit WAV tone whose pitch comes from the tag."""
    rate, frames = 8000, 800
    pitch = 200 + _colour(tag)[0] * 2
    samples = [int(3000 * math.sin(2 * math.pi * pitch * i / rate)) for i in range(frames)]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{frames}h", *samples))
    return buffer.getvalue()


_BUILDERS: dict[str, Callable[[bytes], bytes]] = {
    "png": _png,
    "jpg": _jpeg,
    "webp": _webp,
    "mp4": _mp4,
    "wav": _wav,
}


def _pad_png(data: bytes, extra: int) -> bytes:
    """Add a private, safe-to-copy ancillary chunk (``paDd``) before IEND; decoders skip it."""
    iend = len(data) - 12
    return data[:iend] + _png_chunk(b"paDd", bytes(max(0, extra - 12))) + data[iend:]


def _pad_jpeg(data: bytes, extra: int) -> bytes:
    """Add COM segments (at most 64 KiB each) after the JFIF header; decoders skip comments."""
    head = 20  # SOI (2) + APP0 marker, length and 14-byte JFIF payload (18)
    segments = []
    while extra > 4:
        payload = min(0xFFFF - 2, extra - 4)
        segments.append(_jpeg_segment(0xFE, bytes(payload)))
        extra -= payload + 4
    return data[:head] + b"".join(segments) + data[head:]


def _pad_webp(data: bytes, extra: int) -> bytes:
    """Switch to the extended layout (VP8X, the image's canvas), where unknown chunks are
    skipped."""
    header = int.from_bytes(data[21:25], "little")  # after the 0x2f signature: 14+14 bits
    width, height = (header & 0x3FFF) + 1, (header >> 14 & 0x3FFF) + 1
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas  # no feature flags
    size = max(0, extra - 18 - 8) & ~1  # chunk payloads have even sizes
    body = b"WEBP" + vp8x + data[12:] + b"PADD" + struct.pack("<I", size) + bytes(size)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pad_mp4(data: bytes, extra: int) -> bytes:
    """Append a ``free`` box, which players skip."""
    return data + _mp4_box(b"free", bytes(max(0, extra - 8)))


def _pad_wav(data: bytes, extra: int) -> bytes:
    """Append a RIFF ``JUNK`` chunk after the samples and fix the RIFF size."""
    size = max(0, extra - 8) & ~1
    padded = data + b"JUNK" + struct.pack("<I", size) + bytes(size)
    return padded[:4] + struct.pack("<I", len(padded) - 8) + padded[8:]


_PADDERS: dict[str, Callable[[bytes, int], bytes]] = {
    "png": _pad_png,
    "jpg": _pad_jpeg,
    "webp": _pad_webp,
    "mp4": _pad_mp4,
    "wav": _pad_wav,
}


def output_bytes(ext: str, tag: str, size: int = 0, *, prompt: str | None = None,
                 aspect_ratio: object = None) -> bytes:
    """Return the file served for one output: format ``ext``, content unique to ``tag``.

    ``prompt`` makes it a demo picture or clip; ``size`` pads it (a chunk decoders skip) to ~size.
    """
    drawn = None
    if prompt is not None:
        drawn = playable_mp4(prompt, aspect_ratio) if ext == "mp4" else \
            picture(ext, prompt, aspect_ratio)
    data = drawn if drawn is not None else _BUILDERS[ext](tag.encode())
    extra = size - len(data)
    return _PADDERS[ext](data, extra) if extra > 0 else data


_MIB = 1024 * 1024


@lru_cache(maxsize=1)
def _zero_mib_deflated() -> bytes:
    """1 MiB of zeros as raw deflate, fully flushed: a piece any deflate stream may repeat."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(bytes(_MIB)) + packer.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=8)
def gzip_bomb(head: bytes, size: int) -> bytes:
    """`head` then zeros up to `size` bytes, gzip-encoded: about a thousandth of it on the wire.

    Built from one deflated MiB repeated, so even a GiB bomb costs a moment.
    """
    whole, rest = divmod(max(0, size - len(head)), _MIB)
    first = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc = zlib.crc32(head)
    zeros = bytes(_MIB)
    for _ in range(whole):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    body = b"".join((first.compress(head), first.flush(zlib.Z_FULL_FLUSH),
                     _zero_mib_deflated() * whole, last.compress(bytes(rest)), last.flush()))
    total = len(head) + whole * _MIB + rest
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no name or time
    return header + body + struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF)
