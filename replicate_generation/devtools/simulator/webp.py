"""A small lossless WebP (VP8L) encoder for two-colour pictures: a palette, eight pixels a byte.

Green carries the bundled bytes under a Huffman code built from their counts; everything else is a
one-symbol code that takes no bits. Bits are kept as a '0'/'1' string in stream order.
"""

from __future__ import annotations

import heapq
import struct
from collections import Counter
from collections.abc import Sequence

Colour = tuple[int, int, int]
GREEN_ALPHABET = 256 + 24  # literals and length prefixes; no colour cache
_LENGTH_ORDER = (17, 18, 0, 1, 2, 3, 4, 5, 16, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)


def field(value: int, size: int) -> str:
    """A fixed-width value: VP8L reads it least significant bit first."""
    return format(value, f"0{size}b")[::-1] if size else ""


def _depths(counts: Counter[int]) -> dict[int, int]:
    """Huffman code lengths from symbol counts (two or more symbols)."""
    heap = [(count, index, {symbol: 0}) for index, (symbol, count) in enumerate(counts.items())]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        (first, _, left), (second, _, right) = heapq.heappop(heap), heapq.heappop(heap)
        merged = {symbol: depth + 1 for symbol, depth in (left | right).items()}
        heapq.heappush(heap, (first + second, tiebreak, merged))
        tiebreak += 1
    return heap[0][2]


def limited_lengths(counts: Counter[int], limit: int) -> dict[int, int]:
    """Code lengths no longer than ``limit``: rare symbols are made less rare until they fit."""
    floor = 0
    while True:
        lengths = _depths(Counter({symbol: count + floor for symbol, count in counts.items()}))
        if max(lengths.values()) <= limit:
            return lengths
        floor = floor * 2 + 1


def canonical(lengths: dict[int, int]) -> dict[int, str]:
    """Canonical codes, most significant bit first as VP8L reads a prefix code."""
    codes, code, previous = {}, 0, 0
    for length, symbol in sorted((length, symbol) for symbol, length in lengths.items()):
        code <<= length - previous
        codes[symbol], code, previous = format(code, f"0{length}b"), code + 1, length
    return codes


def simple_code(symbols: Sequence[int]) -> tuple[str, dict[int, str]]:
    """One or two 8-bit symbols: the header and each symbol's code (none for one symbol)."""
    ordered = sorted(set(symbols))
    header = "1" + field(len(ordered) - 1, 1) + "1" + "".join(field(s, 8) for s in ordered)
    if len(ordered) == 1:
        return header, {ordered[0]: ""}
    return header, {ordered[0]: "0", ordered[1]: "1"}


def normal_code(counts: Counter[int], alphabet: int) -> tuple[str, dict[int, str]]:
    """A code for many symbols: its lengths, themselves written with a code-length code."""
    lengths = limited_lengths(counts, 15)
    sequence = [lengths.get(symbol, 0) for symbol in range(alphabet)]
    length_codes = canonical(limited_lengths(Counter(sequence), 7))
    written = [length_codes.get(symbol, "") for symbol in _LENGTH_ORDER]
    kept = max(4, max(i for i, code in enumerate(written) if code) + 1)
    header = "0" + field(kept - 4, 4) + "".join(field(len(code), 3) for code in written[:kept])
    return header + "0" + "".join(length_codes[length] for length in sequence), canonical(lengths)


def code_for(counts: Counter[int], alphabet: int) -> tuple[str, dict[int, str]]:
    """A prefix code for symbols seen this often: the simple kind for one or two."""
    return simple_code(list(counts)) if len(counts) <= 2 else normal_code(counts, alphabet)


def _palette(background: Colour, ink: Colour) -> str:
    """The two-entry colour table: the first entry, then the second as a difference from it."""
    delta = [(b - a) % 256 for a, b in zip(background, ink, strict=True)]
    bits = "0"  # no colour cache
    codes = []
    for first, second in ((background[1], delta[1]), (background[0], delta[0]),
                          (background[2], delta[2]), (255, 0)):
        header, code = simple_code([first, second])
        bits += header
        codes.append((code[first], code[second]))
    bits += simple_code([0])[0]
    return bits + "".join(first for first, _ in codes) + "".join(second for _, second in codes)


def _bundle(row: Sequence[bool]) -> list[int]:
    """Eight pixels a byte, the first in the lowest bit (a two-entry palette's bundling)."""
    return [sum(1 << i for i, inked in enumerate(row[x:x + 8]) if inked)
            for x in range(0, len(row), 8)]


def two_colour(mask: Sequence[Sequence[bool]], background: Colour, ink: Colour) -> bytes:
    """A lossless WebP of ``mask`` (rows of booleans, True is ink)."""
    height, width = len(mask), len(mask[0])
    # A picture repeats its rows (one list for each): each is bundled, counted and coded once.
    rows = [id(row) for row in mask]
    repeats = Counter(rows)
    distinct = {id(row): row for row in mask}
    packed = {key: _bundle(row) for key, row in distinct.items()}
    counts: Counter[int] = Counter()
    for row, times in repeats.items():
        counts.update({value: seen * times for value, seen in Counter(packed[row]).items()})
    green_header, green = code_for(counts, GREEN_ALPHABET)
    coded = {row: "".join(green[value] for value in values) for row, values in packed.items()}
    bits = "".join((field(0x2F, 8), field(width - 1, 14), field(height - 1, 14), "0",
                    field(0, 3), "1", field(3, 2), field(1, 8), _palette(background, ink),
                    "0", "0", "0", green_header, *(simple_code([0])[0] for _ in range(4)),
                    *(coded[row] for row in rows)))
    payload = int(bits[::-1] or "0", 2).to_bytes((len(bits) + 7) // 8, "little")
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
