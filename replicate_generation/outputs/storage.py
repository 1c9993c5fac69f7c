"""Where finished outputs live: one small interface, `OutputStorage`, with two implementations,
the local volume (`DiskStorage`, here) and an S3-compatible bucket (`outputs.s3.S3Storage`).

A download always lands first in a hidden temp file under the storage's local `root` (bounded,
retried, its format sniffed, its SHA-256 taken); `publish` then gives it its final name in the
store, never over another file. Names are `<group>/<file>` relative paths, as /files shows them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Protocol

from replicate_generation.outputs.formats import content_type_for
from replicate_generation.outputs.placement import publish

# Files are read and sent in pieces of this size.
READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    """What a store says of one stored output."""

    size: int
    content_type: str
    modified: float  # seconds since the epoch
    sha256: str | None  # stored with the object; None where the store keeps none (disk)


class Opened(NamedTuple):
    """A stored file being read: what it is, and its bytes (checked as they pass)."""

    info: FileInfo
    pieces: Iterator[bytes]


class ChecksumMismatch(Exception):
    """A stored output's bytes do not hash to the SHA-256 stored with it."""


class OutputStoreUnavailable(Exception):
    """The store cannot be reached or written now; the message is safe to show."""


class OutputStorage(Protocol):
    """What the service needs of a place for outputs."""

    kind: str  # "disk" or "s3", as /health names it
    root: Path  # local directory: the outputs themselves (disk), or the spool (s3)

    def location(self) -> str:
        """Where outputs go, for /health (never a credential)."""
        ...

    def publish(self, tmp: Path, relative: str, sha256: str, content_type: str) -> str:
        """Store a finished temp file as `relative` (or `<stem>-<n><ext>` when that is taken,
        never over it); remove the temp file; return the name taken."""
        ...

    def stat(self, relative: str) -> FileInfo | None:
        """The stored file's size and type, or None when there is none."""
        ...

    def open_file(self, relative: str) -> Opened | None:
        """The stored file (one request to the store), or None when there is none; its pieces
        are checked against its stored SHA-256 before the last one is given."""
        ...

    def local_path(self, relative: str) -> Path | None:
        """The file on this machine's disk, where the store keeps it there (for range requests)."""
        ...

    def signed_url(self, relative: str) -> str | None:
        """A URL anyone holding it may GET until it expires, or None: stream it instead."""
        ...

    def locate(self, relative: str) -> str:
        """Where the file is, for a caller on this machine: a path, or the object's s3:// URI."""
        ...

    def remove_group(self, group: str) -> None:
        """Delete every file of one request (a job's directory); a missing one is fine."""
        ...

    def status(self) -> str:
        """"ok", or what is wrong, from what was last seen (never waits on the network)."""
        ...

    def probe_write(self) -> None:
        """Raise OutputStoreUnavailable unless a file can be written now."""
        ...

    def close(self) -> None:
        """Stop any background work."""
        ...


def check_relative(relative: str) -> str | None:
    """`relative` as a plain `<dir>/<file>` path of non-hidden parts, else None."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return None
    parts = PurePosixPath(relative).parts
    if not parts or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    return "/".join(parts)


def verified(pieces: Iterator[bytes], sha256: str | None) -> Iterator[bytes]:
    """Pass pieces on one behind, so that the last is given only once the whole hashes to
    `sha256`: a corrupt file never reaches a reader whole (a short file is a failed one)."""
    digest = hashlib.sha256()
    held: bytes | None = None
    for piece in pieces:
        digest.update(piece)
        if held is not None:
            yield held
        held = piece
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ChecksumMismatch("the stored file does not match its SHA-256")
    if held is not None:
        yield held


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(READ_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(READ_CHUNK_BYTES):
            yield block


def local_info(path: Path) -> FileInfo | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return FileInfo(size=found.st_size, content_type=content_type_for(path.suffix),
                    modified=found.st_mtime, sha256=None)


def opened_locally(path: Path) -> Opened | None:
    """A file on this disk (None if it is gone), read when its pieces are asked for: an
    answer given up before then holds no open file."""
    info = local_info(path)
    return Opened(info, read_file(path)) if info is not None else None


class DiskStorage:
    """Outputs as files under one directory (the mounted volume): today's behaviour."""

    kind = "disk"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def location(self) -> str:
        return str(self.root)

    def publish(self, tmp: Path, relative: str, sha256: str, content_type: str) -> str:
        final = publish(tmp, self.root / relative)
        fsync_dir(final.parent)
        return final.relative_to(self.root).as_posix()

    def local_path(self, relative: str) -> Path | None:
        candidate = (self.root / relative).resolve()
        if self.root not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def stat(self, relative: str) -> FileInfo | None:
        path = self.local_path(relative)
        return local_info(path) if path is not None else None

    def open_file(self, relative: str) -> Opened | None:
        path = self.local_path(relative)
        return opened_locally(path) if path is not None else None

    def signed_url(self, relative: str) -> str | None:
        return None

    def locate(self, relative: str) -> str:
        return str(self.root / relative)

    def remove_group(self, group: str) -> None:
        remove_local_group(self.root, group)

    def status(self) -> str:
        # A missing directory is made by the first output; /ready tries a write.
        if self.root.exists() and not self.root.is_dir():
            return "unusable: the output directory is not a directory"
        return "ok"

    def probe_write(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise OutputStoreUnavailable(f"cannot write: {exc.strerror}") from None

    def close(self) -> None:
        return None


def copy_out(storage: OutputStorage, located: str, target: Path) -> None:
    """Write a file `locate` named (a local path, or an object of the storage, its checksum
    checked) to `target` through a hidden temp file beside it, so a reader sees all or nothing."""
    prefix = storage.location()
    if located.startswith(prefix) and "://" in prefix:
        opened = storage.open_file(located[len(prefix):])
        if opened is None:
            raise FileNotFoundError(located)
        pieces = opened.pieces
    else:
        pieces = read_file(Path(located))
    write_atomically(target, pieces)


def write_atomically(target: Path, pieces: Iterable[bytes]) -> None:
    """Write `pieces` to `target` through a hidden temp file beside it: all or nothing."""
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def local_copies(storage: OutputStorage, located: list[str]) -> list[str]:
    """Paths on this machine a caller may move away: the files themselves on disk; with a
    bucket, copies in a hidden directory of the spool (the stored files stay where they are)."""
    if storage.kind == "disk":
        return located
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=storage.root))
    copies = []
    for where in located:
        target = staging / PurePosixPath(where).name
        copy_out(storage, where, target)
        copies.append(str(target))
    return copies


def remove_local_group(root: Path, group: str) -> None:
    """rm -r one request's directory, only if it is right under the root."""
    directory = (root / group).resolve()
    if directory.parent == root and directory.is_dir():
        shutil.rmtree(directory, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """Persist a rename; some volume drivers refuse fsync on a directory: fine."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
