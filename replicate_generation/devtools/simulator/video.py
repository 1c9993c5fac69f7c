"""A short playable MP4 for the simulator, written without an encoder.

One H.264 Baseline frame made of I_PCM macroblocks (raw samples, no transform) in the prompt's
colour, in an ISO-BMFF file with the boxes a browser needs (ftyp, moov with one avc1 track, mdat).
"""

from __future__ import annotations

import struct

from replicate_generation.devtools.simulator.pictures import colour_of, size_for

DURATION_MS = 1000


class _BitWriter:
    """MSB-first bits with H.264's Exp-Golomb codes."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, value: int, width: int) -> None:
        self.bits += [value >> shift & 1 for shift in range(width - 1, -1, -1)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(0, code.bit_length() - 1)
        self.u(code, code.bit_length())

    def align(self) -> None:
        self.bits += [0] * (-len(self.bits) % 8)

    def trailing(self) -> bytes:
        self.u(1, 1)
        self.align()
        return bytes(int("".join(map(str, self.bits[i:i + 8])), 2)
                     for i in range(0, len(self.bits), 8))


def _nal(header: int, rbsp: bytes) -> bytes:
    """A NAL unit with emulation prevention (00 00 0x -> 00 00 03 0x for x <= 3)."""
    out, zeros = bytearray([header]), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps(mbs_wide: int, mbs_high: int) -> bytes:
    bits = _BitWriter()
    bits.u(66, 8)  # Baseline
    bits.u(0xC0, 8)  # constraint_set0/1: decodable by Baseline and Main decoders
    bits.u(30, 8)  # level 3.0
    for value in (0, 0, 2, 1):  # sps id, log2_max_frame_num-4, POC type 2, one ref frame
        bits.ue(value)
    bits.u(0, 1)  # no gaps in frame_num
    bits.ue(mbs_wide - 1)
    bits.ue(mbs_high - 1)
    bits.u(0b1100, 4)  # frames only, direct 8x8 inference, no cropping, no VUI
    return _nal(0x67, bits.trailing())


def _pps() -> bytes:
    bits = _BitWriter()
    bits.ue(0)  # pps id
    bits.ue(0)  # sps id
    bits.u(0, 2)  # CAVLC, no field order flag
    bits.ue(0)  # one slice group
    bits.ue(0)
    bits.ue(0)  # one reference index per list
    bits.u(0, 3)  # no weighted prediction
    for _ in range(3):
        bits.ue(0)  # qp, qs and chroma offset 0 (se(0) is ue(0))
    bits.u(0, 3)  # no deblocking control, no constrained intra, no redundant pictures
    return _nal(0x68, bits.trailing())


def _idr_slice(mbs: int, yuv: tuple[int, int, int]) -> bytes:
    bits = _BitWriter()
    bits.ue(0)  # first macroblock
    bits.ue(7)  # I slice (all slices of the picture are I)
    bits.ue(0)  # pps id
    bits.u(0, 4)  # frame_num
    bits.ue(0)  # idr_pic_id
    bits.u(0, 2)  # keep prior pictures, no long-term reference
    bits.ue(0)  # slice_qp_delta 0
    luma, blue, red = (max(1, min(254, v)) for v in yuv)  # PCM samples avoid 0
    samples = [luma] * 256 + [blue] * 64 + [red] * 64
    for _ in range(mbs):
        bits.ue(25)  # mb_type I_PCM
        bits.align()
        for sample in samples:
            bits.u(sample, 8)
    return _nal(0x65, bits.trailing())


def _box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _full(kind: bytes, version_flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version_flags), *parts)


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _avc1(width: int, height: int, sps: bytes, pps: bytes) -> bytes:
    avcc = _box(b"avcC", bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]),
                struct.pack(">H", len(sps)), sps, b"\x01", struct.pack(">H", len(pps)), pps)
    entry = (bytes(6) + struct.pack(">H", 1) + bytes(16) + struct.pack(">HH", width, height)
             + struct.pack(">II", 0x480000, 0x480000) + bytes(4) + struct.pack(">H", 1)
             + bytes(32) + struct.pack(">Hh", 0x18, -1))
    return _box(b"avc1", entry, avcc)


def _stbl(width: int, height: int, sps: bytes, pps: bytes, sample: int, offset: int) -> bytes:
    return _box(b"stbl",
                _full(b"stsd", 0, struct.pack(">I", 1), _avc1(width, height, sps, pps)),
                _full(b"stts", 0, struct.pack(">III", 1, 1, DURATION_MS)),
                _full(b"stsc", 0, struct.pack(">IIII", 1, 1, 1, 1)),
                _full(b"stsz", 0, struct.pack(">III", 0, 1, sample)),
                _full(b"stco", 0, struct.pack(">II", 1, offset)))


def _moov(width: int, height: int, sps: bytes, pps: bytes, sample: int, offset: int) -> bytes:
    mvhd = _full(b"mvhd", 0, struct.pack(">IIII", 0, 0, 1000, DURATION_MS),
                 struct.pack(">IH", 0x10000, 0x100), bytes(10), _MATRIX, bytes(24),
                 struct.pack(">I", 2))
    tkhd = _full(b"tkhd", 3, struct.pack(">IIIII", 0, 0, 1, 0, DURATION_MS), bytes(8),
                 struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX,
                 struct.pack(">II", width << 16, height << 16))
    mdhd = _full(b"mdhd", 0, struct.pack(">IIIIHH", 0, 0, 1000, DURATION_MS, 0x55C4, 0))
    hdlr = _full(b"hdlr", 0, bytes(4), b"vide", bytes(12), b"VideoHandler\x00")
    dinf = _box(b"dinf", _full(b"dref", 0, struct.pack(">I", 1), _full(b"url ", 1)))
    minf = _box(b"minf", _full(b"vmhd", 1, bytes(8)), dinf,
                _stbl(width, height, sps, pps, sample, offset))
    return _box(b"moov", mvhd, _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf)))


def _yuv(prompt: str) -> tuple[int, int, int]:
    r, g, b = colour_of(prompt)
    return (round(0.257 * r + 0.504 * g + 0.098 * b + 16),
            round(-0.148 * r - 0.291 * g + 0.439 * b + 128),
            round(0.439 * r - 0.368 * g - 0.071 * b + 128))


def mp4(prompt: str, aspect_ratio: object = None) -> bytes:
    """A one-second clip of the prompt's colour, in the requested aspect ratio (about 96 px:
    raw samples cost 384 bytes per 16x16 macroblock)."""
    across, down = size_for(aspect_ratio)
    mbs_wide, mbs_high = max(1, round(across * 6 / 256)), max(1, round(down * 6 / 256))
    width, height = mbs_wide * 16, mbs_high * 16
    sps, pps = _sps(mbs_wide, mbs_high), _pps()
    frame = _idr_slice(mbs_wide * mbs_high, _yuv(prompt))
    sample = struct.pack(">I", len(frame)) + frame
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso2avc1mp41")
    size_of_moov = len(_moov(width, height, sps, pps, len(sample), 0))
    offset = len(ftyp) + size_of_moov + 8
    moov = _moov(width, height, sps, pps, len(sample), offset)
    return ftyp + moov + _box(b"mdat", sample)
