"""Serving stored outputs, once the caller's ownership is checked: /files (a signed bucket URL,
the file on this disk with ranges, or its bytes streamed from the store with the SHA-256 checked),
signed URLs in job results, and a job's files as one zip streamed from the store as it is written
(stored, ZIP64 where needed), never built whole first."""

from __future__ import annotations

import functools
import logging
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

from flask import Response, redirect, send_file
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation.http.errors import ApiError
from replicate_generation.outputs import (
    ChecksumMismatch,
    FileInfo,
    Opened,
    OutputStorage,
    OutputStoreUnavailable,
)

log = logging.getLogger(__name__)
_RETRY_AFTER = {"Retry-After": "10"}


def file_response(storage: OutputStorage, relative: str, *,
                  redirect_ok: bool = True) -> WerkzeugResponse:
    """The answer to GET /files/<relative> for a caller who may see it."""
    url = storage.signed_url(relative) if redirect_ok else None
    if url is not None:
        moved = redirect(url, 302)
        moved.headers["Cache-Control"] = "no-store"  # the URL expires: never cache the redirect
        return moved
    local = storage.local_path(relative)
    if local is not None:
        return send_file(local, conditional=True, max_age=0)
    info, pieces = _primed(storage, relative)
    return Response(pieces, mimetype=info.content_type,
                    headers={"Content-Length": str(info.size), "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


def _primed(storage: OutputStorage, relative: str) -> tuple[FileInfo, Iterator[bytes]]:
    """The file opened and its first piece read now: a small file is checked whole before any
    header goes out, so a corrupt one is a clear 502 and an unreachable store a 503."""
    try:
        opened = storage.open_file(relative)
        if opened is None:
            raise ApiError(404, "File not found")
        pieces = _logged(opened.pieces, relative)
        first = next(pieces, b"")
    except ChecksumMismatch:
        raise ApiError(502, "The stored file does not match its SHA-256: not served") from None
    except OutputStoreUnavailable:
        raise ApiError(503, "The output storage cannot be reached; try again shortly",
                       headers=_RETRY_AFTER) from None
    return opened.info, _joined(first, pieces)


def _joined(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    """A generator, not itertools.chain: closing it (the client left) closes the store's body."""
    yield first
    yield from rest


def _logged(pieces: Iterator[bytes], relative: str) -> Iterator[bytes]:
    """Say in the log why a response broke off (the client sees a short body)."""
    try:
        yield from pieces
    except (ChecksumMismatch, OutputStoreUnavailable) as exc:
        log.error("output %s broke off while sent: %s", relative, exc)
        raise


def signed_items(items: list[dict[str, Any]], storage: OutputStorage) -> list[dict[str, Any]]:
    """With OUTPUT_SERVING=signed, each item's `signed_urls` beside its `urls` (a file not in the
    bucket yet keeps its /files URL there); `urls` stay the service's, as clients expect."""
    for item in items:
        urls = item.get("urls") or []
        signed = [storage.signed_url(unquote(url.removeprefix("/files/"))) for url in urls]
        if any(signed):
            item["signed_urls"] = [s or url for s, url in zip(signed, urls, strict=True)]
    return items


# -------------------------------------------------------------------------- a job's zip


class _Pieces:
    """A write-only file that keeps what zipfile writes until it is taken to be sent."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def job_zip(storage: OutputStorage, relatives: list[str]) -> Iterator[bytes]:
    """Every file named, in order, each under its own name (unique in the job), as zip bytes
    made while they are sent: memory holds one piece, the disk nothing. Each file is opened as
    its turn comes (one request each); the first now, so an unreachable store is a 503."""
    openers: list[Callable[[], Opened | None]] = [
        functools.partial(storage.open_file, r) for r in relatives]
    if relatives:
        try:
            first = storage.open_file(relatives[0])
        except OutputStoreUnavailable:
            raise ApiError(503, "The output storage cannot be reached; try again shortly",
                           headers=_RETRY_AFTER) from None
        openers[0] = lambda: first
    names = [PurePosixPath(r).name for r in relatives]
    return stream_zip(list(zip(names, openers, strict=True)))


def stream_zip(entries: list[tuple[str, Callable[[], Opened | None]]]) -> Iterator[bytes]:
    """A stored zip of the entries, yielded piece by piece; with no seekable target, zipfile
    writes each entry's sizes after its data, and ZIP64 records where sizes need them."""
    pieces = _Pieces()
    with zipfile.ZipFile(pieces, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, opener in entries:
            opened = opener()
            if opened is None:
                continue  # removed since it was listed: the rest still go out
            yield from _stored_entry(archive, pieces, name, opened.info, opened.pieces)
        yield pieces.take()
    yield pieces.take()  # the central directory


def _stored_entry(archive: zipfile.ZipFile, pieces: _Pieces, name: str, info: FileInfo,
                  source: Iterator[bytes]) -> Iterator[bytes]:
    # zip has no time before 1980: an older (or unset) mtime is shown as 1980.
    entry_info = zipfile.ZipInfo(name, max(time.localtime(info.modified)[:6],
                                           (1980, 1, 1, 0, 0, 0)))
    entry_info.compress_type = zipfile.ZIP_STORED
    entry_info.external_attr = 0o644 << 16
    entry_info.file_size = info.size  # zipfile chose ZIP64 by it: never write more
    left = info.size
    with archive.open(entry_info, "w") as entry:
        for block in _logged(source, name):
            block = block[:left]
            entry.write(block)
            left -= len(block)
            yield pieces.take()
            if left <= 0:
                break
