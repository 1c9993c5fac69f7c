"""What the rest of the service sees of a saved output: `SavedFile`, and `DownloadError`, which
carries the files a failed call did save (paid for, so still reported)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SavedFile:
    """One output stored: `relative` names it in the store; `path` is where it was (or is) on
    this machine's disk."""

    path: Path
    relative: str
    size: int
    content_type: str
    sha256: str | None = None


class DownloadError(Exception):
    """An output could not be fetched or written; the message is safe to show a caller.

    ``saved`` lists the call's outputs written anyway: they are paid for, so report them.
    ``refused``: the egress policy or a bound refused it (not a transport failure);
    ``exhausted``: a per-prediction or per-job bound is used up, so the outputs after it are too.
    """

    def __init__(self, message: str, *, saved: Sequence[SavedFile] = (), refused: bool = False,
                 exhausted: bool = False) -> None:
        super().__init__(message)
        self.saved: tuple[SavedFile, ...] = tuple(saved)
        self.refused = refused
        self.exhausted = exhausted


@contextmanager
def file_errors(what: str) -> Iterator[None]:
    """Make an OSError a DownloadError; strerror, unlike str(exc), has no path."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DownloadError(f"could not write {what}: {reason}") from None
