"""save_outputs: fetch a prediction's outputs at once and write them safely under the root.

At once, as Replicate deletes them after an hour; each is written atomically (hidden temp file,
fsync, rename) inside the root, under the extension of its real content.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

import requests

from replicate_generation.outputs.base import DownloadError, SavedFile, file_errors
from replicate_generation.outputs.downloads import Fetch, Sink, new_fetch
from replicate_generation.outputs.formats import (
    content_type_for,
    normalise_fallback,
    sniff_extension,
)
from replicate_generation.outputs.names import check_stem, numbered_name
from replicate_generation.outputs.sources import fill


def save_outputs(
    sources: Sequence[object],
    dest_dir: Path,
    stem: str,
    *,
    root: Path,
    deadline: float,
    session: requests.Session | None = None,
    auth_token: str | None = None,
    auth_origin: str | None = None,
    max_bytes: int = 512 * 1024 * 1024,
    clock: Callable[[], float] = time.time,
    fallback_ext: str | None = None,
    attempts: int = 3,
) -> list[SavedFile]:
    """Download every source now and write it atomically under dest_dir, in order.

    All are tried despite a failure (Replicate deletes outputs after an hour); see DownloadError.
    """
    fallback = _check_arguments(stem, fallback_ext, max_bytes, attempts)
    fetch = new_fetch(session=session, deadline=deadline, clock=clock, max_bytes=max_bytes,
                      attempts=attempts, auth_token=auth_token, auth_origin=auth_origin)
    root_dir, dest = _prepare_dest(dest_dir, root)
    saved: list[SavedFile] = []
    failures: list[DownloadError] = []
    for number, source in enumerate(sources, start=1):
        name = numbered_name(stem, number, len(sources))
        try:
            saved.append(_save_one(source, number, dest / name, root_dir, fetch, fallback))
        except DownloadError as exc:
            failures.append(exc)
    if failures:
        more = f" (and {len(failures) - 1} more output(s) failed)" if len(failures) > 1 else ""
        raise DownloadError(f"{failures[0]}{more}", saved=saved)
    return saved


def _check_arguments(
    stem: str, fallback_ext: str | None, max_bytes: int, attempts: int
) -> str | None:
    """Reject programming errors before any download; return the fallback extension."""
    check_stem(stem)
    if max_bytes < 1 or attempts < 1:
        raise ValueError("max_bytes and attempts must be >= 1")
    return normalise_fallback(fallback_ext)


def _prepare_dest(dest_dir: Path, root: Path) -> tuple[Path, Path]:
    """Resolve root and dest_dir, refuse a dest_dir outside root, then mkdir -p it."""
    root_dir = root.resolve()
    dest = dest_dir.resolve()
    if not dest.is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    with file_errors("the output directory"):
        dest.mkdir(parents=True, exist_ok=True)
    # Again once every component exists: a symlink made meanwhile must not lead outside the root.
    if not dest.resolve().is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    return root_dir, dest


def _save_one(
    source: object,
    number: int,
    base: Path,
    root_dir: Path,
    fetch: Fetch,
    fallback: str | None,
) -> SavedFile:
    """Write one source to a hidden temp file next to its final name, then rename it."""
    with file_errors(f"output {number}"):
        fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=base.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = Sink(fh, number, fetch.max_bytes)
            hints = fill(sink, source, number, fetch)
            _make_durable(fh, number)
        if sink.size == 0:
            raise DownloadError(f"output {number} was empty")
        ext = sniff_extension(sink.head, hints.content_type, hints.url, fallback)
        final = base.with_name(base.name + ext)
        with file_errors(f"output {number}"):
            # Atomic: a reader sees the old file or the whole new one, never half.
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return SavedFile(
        path=final,
        relative=final.relative_to(root_dir).as_posix(),
        size=sink.size,
        content_type=content_type_for(ext),
    )


def _make_durable(fh: IO[bytes], number: int) -> None:
    with file_errors(f"output {number}"):
        fh.flush()
        # mkstemp creates 0600; other containers and the host read the volume.
        os.fchmod(fh.fileno(), 0o644)
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist the rename; some volume drivers refuse fsync on a directory: fine."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
