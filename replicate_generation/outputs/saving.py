"""save_outputs: fetch a prediction's outputs at once and store them safely.

At once, as Replicate deletes them after an hour; each is written to a hidden temp file inside the
local root (fsync), its SHA-256 taken, then published to the storage (the disk: a rename; a bucket:
an upload) under the extension of its real content; fetched under the egress policy, and counted
against the prediction's and job's bounds (`Budget`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import requests

from replicate_generation.egress import Budget, EgressPolicy, EgressRefused
from replicate_generation.outputs.base import DownloadError, SavedFile, file_errors
from replicate_generation.outputs.downloads import Fetch, Sink, new_fetch
from replicate_generation.outputs.formats import (
    content_type_for,
    normalise_fallback,
    sniff_extension,
)
from replicate_generation.outputs.names import check_stem, numbered_name
from replicate_generation.outputs.sources import fill
from replicate_generation.outputs.storage import DiskStorage, OutputStorage


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
    policy: EgressPolicy | None = None,
    budget: Budget | None = None,
    storage: OutputStorage | None = None,
) -> list[SavedFile]:
    """Download every source now and store it atomically under dest_dir, in order.

    All are tried despite a failure (Replicate deletes outputs after an hour), until a bound of
    the budget is used up; see DownloadError. `policy`: public addresses only unless given.
    `storage`: where files end up (its root replaces `root`); the disk at `root` unless given.
    """
    fallback = _check_arguments(stem, fallback_ext, max_bytes, attempts)
    fetch = new_fetch(session=session, deadline=deadline, clock=clock, max_bytes=max_bytes,
                      attempts=attempts, auth_token=auth_token, auth_origin=auth_origin,
                      policy=policy, budget=budget)
    store = storage if storage is not None else DiskStorage(root)
    dest = _prepare_dest(dest_dir, store.root)
    saved: list[SavedFile] = []
    failures: list[DownloadError] = []
    for number, source in enumerate(sources, start=1):
        name = numbered_name(stem, number, len(sources))
        try:
            saved.append(_save_counted(source, number, dest / name, store, fetch, fallback))
        except DownloadError as exc:
            failures.append(exc)
            if exc.exhausted:
                break
    if failures:
        raise _summary(failures, saved, untried=len(sources) - len(saved) - len(failures))
    return saved


def _summary(failures: list[DownloadError], saved: list[SavedFile],
             untried: int) -> DownloadError:
    """One error for the call: the first refusal (else failure), how many more, what was saved."""
    first = next((f for f in failures if f.refused), failures[0])
    more = f" (and {len(failures) - 1} more output(s) failed)" if len(failures) > 1 else ""
    if untried:
        more += f"; {untried} later output(s) were not fetched"
    return DownloadError(f"{first}{more}", saved=saved,
                         refused=any(f.refused for f in failures),
                         exhausted=any(f.exhausted for f in failures))


def _save_counted(source: object, number: int, base: Path, store: OutputStorage, fetch: Fetch,
                  fallback: str | None) -> SavedFile:
    """_save_one, counted as one more file of the budget (given back if it is not kept)."""
    try:
        fetch.budget.take(1, 0)
    except EgressRefused as exc:
        raise DownloadError(f"output {number} was not saved: {exc.message}", refused=True,
                            exhausted=True) from None
    try:
        return _save_one(source, number, base, store, fetch, fallback)
    except BaseException:
        fetch.budget.give_back(1, 0)
        raise


def _check_arguments(
    stem: str, fallback_ext: str | None, max_bytes: int, attempts: int
) -> str | None:
    """Reject programming errors before any download; return the fallback extension."""
    check_stem(stem)
    if max_bytes < 1 or attempts < 1:
        raise ValueError("max_bytes and attempts must be >= 1")
    return normalise_fallback(fallback_ext)


def _prepare_dest(dest_dir: Path, root: Path) -> Path:
    """Resolve dest_dir, refuse one outside root, then mkdir -p it."""
    root_dir = root.resolve()
    dest = dest_dir.resolve()
    if not dest.is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    with file_errors("the output directory"):
        dest.mkdir(parents=True, exist_ok=True)
    # Again once every component exists: a symlink made meanwhile must not lead outside the root.
    if not dest.resolve().is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    return dest


def _save_one(
    source: object,
    number: int,
    base: Path,
    store: OutputStorage,
    fetch: Fetch,
    fallback: str | None,
) -> SavedFile:
    """Write one source to a hidden temp file next to its final name, then publish it."""
    with file_errors(f"output {number}"):
        fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=base.parent)
    tmp = Path(tmp_name)
    sink: Sink | None = None
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = Sink(fh, number, fetch.max_bytes, fetch.budget)
            hints = fill(sink, source, number, fetch)
            _make_durable(fh, number)
        if sink.size == 0:
            raise DownloadError(f"output {number} was empty")
        ext = sniff_extension(sink.head, hints.content_type, hints.url, fallback)
        relative = base.with_name(base.name + ext).relative_to(store.root).as_posix()
        digest = sink.digest.hexdigest()
        with file_errors(f"output {number}"):
            # Atomic, and never over another item's file (a name it shares numbers past it).
            relative = store.publish(tmp, relative, digest, content_type_for(ext))
    except BaseException:
        tmp.unlink(missing_ok=True)
        if sink is not None:
            sink.uncount()  # not kept: its bytes go back to the budget
        raise
    return SavedFile(path=store.root / relative, relative=relative, size=sink.size,
                     content_type=content_type_for(ext), sha256=digest)


def _make_durable(fh: IO[bytes], number: int) -> None:
    with file_errors(f"output {number}"):
        fh.flush()
        # mkstemp creates 0600; other containers and the host read the volume.
        os.fchmod(fh.fileno(), 0o644)
        os.fsync(fh.fileno())
