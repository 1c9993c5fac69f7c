"""A job's items enter this process's queue a window at a time; the rest wait in the store.

A queued item costs a thread-pool future, a lane entry and a closure; a window keeps that cost
bounded by the account's limit, not the job's size (a 20,000-item job holds only its indexes).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

# The fewest items a job keeps queued here, so a low limit still hands over without a gap.
MIN_WINDOW = 16


def window_size(limit: int) -> int:
    """Enough queued items to refill every slot of the account twice over."""
    return max(MIN_WINDOW, 2 * limit)


@dataclass
class _Window:
    waiting: deque[int]
    size: int
    in_flight: int = 0


@dataclass
class ItemWindows:
    """Per job: the open indexes not yet queued, and how many are queued or running here."""

    _jobs: dict[str, _Window] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, job_id: str, indexes: list[int], size: int) -> list[int]:
        """Start a job's window: the indexes to queue now, in input order."""
        with self._lock:
            window = _Window(deque(indexes), max(1, size))
            self._jobs[job_id] = window
            return self._take(job_id, window)

    def next(self, job_id: str) -> list[int]:
        """One item of the job ended here: the indexes that take its place (maybe none)."""
        with self._lock:
            window = self._jobs.get(job_id)
            if window is None:
                return []
            window.in_flight -= 1
            return self._take(job_id, window)

    def give_back(self, job_id: str, indexes: list[int]) -> None:
        """Indexes the queue refused: they wait at the front for the next hand-over."""
        with self._lock:
            window = self._jobs.get(job_id)
            if window is not None:
                window.in_flight -= len(indexes)
                window.waiting.extendleft(reversed(indexes))

    def idle(self, job_id: str) -> bool:
        """True when nothing of the job is queued or running here (its rest is in the store)."""
        with self._lock:
            window = self._jobs.get(job_id)
            return window is None or window.in_flight <= 0

    def drop(self, job_id: str) -> None:
        """Forget the job here (canceled, handed back, or done)."""
        with self._lock:
            self._jobs.pop(job_id, None)

    def held(self) -> int:
        """Indexes waiting in every window: what this process keeps instead of queued tasks."""
        with self._lock:
            return sum(len(window.waiting) for window in self._jobs.values())

    def _take(self, job_id: str, window: _Window) -> list[int]:
        count = min(len(window.waiting), window.size - window.in_flight)
        taken = [window.waiting.popleft() for _ in range(max(0, count))]
        window.in_flight += len(taken)
        if not window.waiting and window.in_flight <= 0:
            del self._jobs[job_id]
        return taken
