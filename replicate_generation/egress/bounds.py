"""Bounds on what outputs may put on disk: files and bytes per prediction and per job, counted as
they are written (decoded bytes, so an inflated body counts at its full size)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from replicate_generation.errors import EgressRefused

_KEEP_IDLE_JOBS = 256  # tallies of jobs with no download running, kept to spare a rescan


@dataclass(frozen=True)
class OutputBounds:
    """The caps (the service's defaults; README Configuration names their settings)."""

    max_file_bytes: int = 512 * 1024 * 1024  # OUTPUT_MAX_FILE_BYTES
    max_files_per_prediction: int = 100  # OUTPUT_MAX_FILES_PER_PREDICTION
    max_bytes_per_prediction: int = 1024**3  # OUTPUT_MAX_BYTES_PER_PREDICTION
    max_files_per_job: int = 10_000  # OUTPUT_MAX_FILES_PER_JOB
    max_bytes_per_job: int = 32 * 1024**3  # OUTPUT_MAX_BYTES_PER_JOB


class Tally:
    """Files and bytes of one prediction or job, against its caps; shared by threads."""

    def __init__(self, scope: str, max_files: int, max_bytes: int, *,
                 files: int = 0, size: int = 0) -> None:
        self._scope = scope  # "prediction" or "job"
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self.files = files
        self.size = size

    def take(self, files: int, size: int) -> None:
        """Count more, or raise EgressRefused (exhausted) and count nothing."""
        setting = f"OUTPUT_MAX_{{}}_PER_{self._scope.upper()}"
        with self._lock:
            if self.files + files > self._max_files:
                raise EgressRefused(f"more than {self._max_files} files for one {self._scope} "
                                    f"({setting.format('FILES')})", exhausted=True)
            if self.size + size > self._max_bytes:
                raise EgressRefused(f"more than {self._max_bytes} bytes for one {self._scope} "
                                    f"({setting.format('BYTES')})", exhausted=True)
            self.files += files
            self.size += size

    def give_back(self, files: int, size: int) -> None:
        """Uncount what was not kept (a file that failed, a body started over)."""
        with self._lock:
            self.files = max(0, self.files - files)
            self.size = max(0, self.size - size)


class Budget:
    """One prediction's tally inside its job's: both must have room."""

    def __init__(self, bounds: OutputBounds, job: Tally | None = None) -> None:
        self.max_file_bytes = bounds.max_file_bytes
        self._tallies = [Tally("prediction", bounds.max_files_per_prediction,
                               bounds.max_bytes_per_prediction)]
        if job is not None:
            self._tallies.append(job)

    def take(self, files: int, size: int) -> None:
        taken: list[Tally] = []
        try:
            for tally in self._tallies:
                tally.take(files, size)
                taken.append(tally)
        except EgressRefused:
            for tally in taken:
                tally.give_back(files, size)
            raise

    def give_back(self, files: int, size: int) -> None:
        for tally in self._tallies:
            tally.give_back(files, size)


class JobTallies:
    """Each job's tally in this process, keyed by its output directory (one per job).

    The first use counts the files already there (a resumed job keeps its count); a tally stays
    while a download uses it and, idle, among the most recent few.
    """

    def __init__(self, bounds: OutputBounds) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self._tallies: OrderedDict[Path, Tally] = OrderedDict()
        self._users: dict[Path, int] = {}

    @contextmanager
    def budget(self, directory: Path) -> Iterator[Budget]:
        """A new prediction's budget inside the job that writes to `directory`."""
        key = directory.resolve()
        tally = self._acquire(key)
        try:
            yield Budget(self._bounds, tally)
        finally:
            self._release(key)

    def _acquire(self, key: Path) -> Tally:
        with self._lock:
            tally = self._tallies.get(key)
            if tally is not None:
                self._users[key] = self._users.get(key, 0) + 1
                self._tallies.move_to_end(key)
                return tally
        # Counted outside the lock; no download of this job runs here meanwhile (none holds it).
        files, size = _already_saved(key)
        with self._lock:
            tally = self._tallies.setdefault(key, Tally(
                "job", self._bounds.max_files_per_job, self._bounds.max_bytes_per_job,
                files=files, size=size))
            self._users[key] = self._users.get(key, 0) + 1
            self._tallies.move_to_end(key)
            return tally

    def _release(self, key: Path) -> None:
        with self._lock:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
            idle = [k for k in self._tallies if k not in self._users]
            for stale in idle[:max(0, len(idle) - _KEEP_IDLE_JOBS)]:
                del self._tallies[stale]


def _already_saved(directory: Path) -> tuple[int, int]:
    """Files (not hidden temp files) and bytes already in a job's output directory."""
    files = size = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                files += 1
                size += entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0, 0  # no directory yet: nothing saved
    return files, size
