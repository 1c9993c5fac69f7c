"""Demo pictures for the simulator, written without an imaging library.

The requested aspect ratio, the prompt's colour and its first words in a 5x7 font, so the console's
gallery looks real; JPEG is 8x8 DC-only blocks, WebP two colours with one-bit codes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from typing import TypeVar

from replicate_generation.devtools.simulator.webp import two_colour

LONG_SIDE = 256
Colour = tuple[int, int, int]
Cells = list[list[Colour]]
Drawn = TypeVar("Drawn")

# Rows of 5 bits, top to bottom; unknown characters draw as a space.
_FONT: dict[str, tuple[int, ...]] = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    " ": (0, 0, 0, 0, 0, 0, 0), "-": (0, 0, 0, 31, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12),
}


def size_for(aspect_ratio: object) -> tuple[int, int]:
    """Width and height with the ratio's shape ("16:9"), LONG_SIDE on the long side."""
    try:
        across, down = (float(part) for part in str(aspect_ratio).split(":"))
    except ValueError:
        across = down = 1.0
    if across <= 0 or down <= 0:
        across = down = 1.0
    scale = LONG_SIDE / max(across, down)
    return max(8, round(across * scale)), max(8, round(down * scale))


def colour_of(prompt: str) -> Colour:
    digest = hashlib.sha256(prompt.encode()).digest()
    return 64 + digest[0] % 160, 64 + digest[1] % 160, 64 + digest[2] % 160


def cells(prompt: str, columns: int, rows: int) -> Cells:
    """A grid of colours: the prompt's colour, a darker band, and its first words in white."""
    background = colour_of(prompt)
    band: Colour = (background[0] // 3, background[1] // 3, background[2] // 3)
    grid = [[background] * columns for _ in range(rows)]
    top = max(0, rows // 2 - 5)
    for y in range(top, min(rows, top + 11)):
        grid[y] = [band] * columns
    _draw_text(grid, prompt.upper(), 1, top + 2)
    return grid


def _draw_text(grid: Cells, text: str, left: int, top: int) -> None:
    columns = len(grid[0])
    for position, char in enumerate(text[: max(0, (columns - left) // 6)]):
        for dy, bits in enumerate(_FONT.get(char, _FONT[" "])):
            for dx in range(5):
                x, y = left + position * 6 + dx, top + dy
                if bits >> (4 - dx) & 1 and y < len(grid) and x < columns:
                    grid[y][x] = (255, 255, 255)


def pixel_rows(grid: Cells, cell: int, height: int,
               draw: Callable[[tuple[Colour, ...]], Drawn]) -> list[Drawn]:
    """A picture's `height` rows of pixels: each distinct grid row drawn once, the one object
    shared by every pixel row it spans (a picture is a few rows, repeated)."""
    distinct = {row: draw(row) for row in set(map(tuple, grid))}
    drawn = [distinct[tuple(row)] for row in grid]
    return [drawn[y // cell] for y in range(height)]


# --------------------------------------------------------------------------- PNG


def png(prompt: str, width: int, height: int, cell: int = 2) -> bytes:
    grid = cells(prompt, -(-width // cell), -(-height // cell))
    lines = pixel_rows(grid, cell, height, lambda row: b"\x00" + b"".join(
        bytes(colour) * cell for colour in row)[:3 * width])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"".join(lines), 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# --------------------------------------------------------------------------- JPEG


class _Bits:
    """An MSB-first bit writer with JPEG's 0xFF byte stuffing."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def put(self, value: int, width: int) -> None:
        if width:
            self.parts.append(format(value, f"0{width}b"))

    def flush(self) -> bytes:
        """The bits padded with ones to a byte, each 0xFF byte followed by a stuffed 0x00."""
        bits = "".join(self.parts)
        bits += "1" * (-len(bits) % 8)
        packed = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
        return packed.replace(b"\xff", b"\xff\x00")


def _ycbcr(colour: Colour) -> tuple[float, float, float]:
    r, g, b = colour
    return (0.299 * r + 0.587 * g + 0.114 * b,
            128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
            128 + 0.5 * r - 0.418688 * g - 0.081312 * b)


def _put_dc(bits: _Bits, diff: int) -> None:
    """DC difference: its size category as a 4-bit code (our table), then its bits."""
    size = abs(diff).bit_length()
    bits.put(size, 4)
    if size:
        bits.put(diff if diff > 0 else diff + (1 << size) - 1, size)


def jpeg(prompt: str, width: int, height: int) -> bytes:
    """Baseline YCbCr JPEG, one DC value per 8x8 block (quantisation 1), AC all zero."""
    columns, rows = -(-width // 8), -(-height // 8)
    grid = cells(prompt, columns, rows)
    bits, previous = _Bits(), [0, 0, 0]
    for row in grid:
        for colour in row:
            for component, value in enumerate(_ycbcr(colour)):
                dc = round(8 * (value - 128))  # the DCT of a flat block is 8 x its mean
                _put_dc(bits, dc - previous[component])
                previous[component] = dc
                bits.put(0, 1)  # AC: end of block
    dc_table = bytes([0, 0, 0, 12] + [0] * 12) + bytes(range(12))  # 12 four-bit codes
    ac_table = bytes([1] + [0] * 15) + b"\x00"  # one 1-bit code: end of block
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"".join((
        b"\xff\xd8", _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
        _segment(0xDB, b"\x00" + b"\x01" * 64), _segment(0xC0, frame),
        _segment(0xC4, b"\x00" + dc_table), _segment(0xC4, b"\x10" + ac_table),
        _segment(0xDA, b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"), bits.flush(), b"\xff\xd9"))


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


# --------------------------------------------------------------------------- WebP


def webp(prompt: str, width: int, height: int, cell: int = 2) -> bytes:
    """Lossless WebP in two colours: the prompt's, and its words in white or black."""
    background = colour_of(prompt)
    ink: Colour = (255, 255, 255) if sum(background) < 384 else (0, 0, 0)
    grid = cells(prompt, -(-width // cell), -(-height // cell))
    mask = pixel_rows(grid, cell, height, lambda row: [
        colour == (255, 255, 255) for colour in row for _ in range(cell)][:width])
    return two_colour(mask, background, ink)


RENDERERS: dict[str, Callable[[str, int, int], bytes]] = {"png": png, "jpg": jpeg, "webp": webp}


def picture(ext: str, prompt: str, aspect_ratio: object) -> bytes | None:
    """The demo picture for this format, or None when the format is not an image."""
    render = RENDERERS.get(ext)
    return render(prompt, *size_for(aspect_ratio)) if render else None
