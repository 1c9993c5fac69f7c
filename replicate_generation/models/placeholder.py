"""The black 1600x900 placeholder, written only when the caller asks for it.

Whoever uses it must report it as a placeholder, never as a success.
"""

from __future__ import annotations

import functools
import struct
import time
import zlib
from pathlib import Path

from replicate_generation.models.catalogue import ModelSpec
from replicate_generation.outputs import SavedFile, save_outputs

PLACEHOLDER_SIZE = (1600, 900)


@functools.cache
def placeholder_png() -> bytes:
    """A black 1600x900 RGB PNG, built with zlib and struct alone."""
    width, height = PLACEHOLDER_SIZE
    raw = (b"\x00" + bytes(width * 3)) * height  # filter byte 0, then black pixels, per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data


def write_placeholder(spec: ModelSpec, dest_dir: Path, stem: str, *, root: Path) -> SavedFile:
    """Write the black placeholder as `<stem>.png` (image models only), atomically, under `root`.

    The caller must report it as a placeholder, never as a success.
    """
    if spec.kind != "image":
        raise ValueError(f"{spec.id} makes {spec.kind}; a placeholder image would be a lie")
    (saved,) = save_outputs([_Bytes(placeholder_png())], dest_dir, stem, root=root,
                            deadline=time.time() + 60)
    return saved
