"""A job's items enter this process's queue a window at a time; the rest wait in the store.

A queued item costs a thread-pool future, a lane entry and a closure; a window keeps that cost
bounded by the account's limit, not the job's size. Items are claimed from the store a window at
a time (`jobs.claims`), so other processes can claim the rest.
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
    account: str
    waiting: deque[int]
    size: int
    in_flight: int = 0
    refilling: bool = False
    # The store had nothing left to claim: no more claims until the job is opened again here.
    exhausted: bool = False


# A job's window in this process, per fence: a window of a fence lost to a re-claim drains apart.
WindowKey = tuple[str, int]


@dataclass
class ItemWindows:
    """Per job: the items this process claimed but has not queued yet, and how many of its items
    are queued or running here. The rest wait in the store, unclaimed or claimed by others."""

    _jobs: dict[WindowKey, _Window] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, key: WindowKey, account: str, indexes: list[int], size: int) -> list[int]:
        """Start a job's window (or add to it): the indexes to queue now, in input order."""
        with self._lock:
            window = self._jobs.setdefault(key, _Window(account, deque(), max(1, size)))
            window.waiting.extend(indexes)
            window.refilling = window.exhausted = False
            return self._take(window)

    def refilled(self, key: WindowKey, indexes: list[int]) -> list[int]:
        """What a claim asked for by `next` brought: the indexes to queue now."""
        with self._lock:
            window = self._jobs.get(key)
            if window is None:
                return []
            window.waiting.extend(indexes)
            window.refilling = False
            window.exhausted = not indexes
            taken = self._take(window)
            self._forget_if_done(key, window)
            return taken

    def next(self, key: WindowKey) -> tuple[list[int], int]:
        """One item of the job ended here: (the indexes that take its place, how many items to
        claim from the store when none are left here: 0 while another thread claims)."""
        with self._lock:
            window = self._jobs.get(key)
            if window is None:
                return [], 0
            window.in_flight -= 1
            taken = self._take(window)
            if (window.waiting or window.refilling or window.exhausted
                    or window.in_flight >= window.size):
                self._forget_if_done(key, window)
                return taken, 0
            window.refilling = True
            return taken, window.size

    def give_back(self, key: WindowKey, indexes: list[int]) -> None:
        """Indexes the queue refused: they wait at the front for the next hand-over."""
        with self._lock:
            window = self._jobs.get(key)
            if window is not None:
                window.in_flight -= len(indexes)
                window.waiting.extendleft(reversed(indexes))

    def idle(self, key: WindowKey) -> bool:
        """True when nothing of the job is queued or running here (its rest is in the store)."""
        with self._lock:
            window = self._jobs.get(key)
            return window is None or window.in_flight <= 0

    def active(self, key: WindowKey) -> bool:
        with self._lock:
            return key in self._jobs

    def job_ids(self) -> set[str]:
        """The jobs with a window here."""
        with self._lock:
            return {job_id for job_id, _ in self._jobs}

    def drop(self, job_id: str) -> None:
        """Forget the job here (canceled, handed back, or done), whatever its fence."""
        with self._lock:
            for key in [key for key in self._jobs if key[0] == job_id]:
                del self._jobs[key]

    def drop_account(self, account: str) -> list[str]:
        """Forget every job of the account here; their ids."""
        with self._lock:
            keys = [key for key, window in self._jobs.items() if window.account == account]
            for key in keys:
                del self._jobs[key]
        return [job_id for job_id, _ in keys]

    def held(self) -> int:
        """Indexes waiting in every window: what this process keeps instead of queued tasks."""
        with self._lock:
            return sum(len(window.waiting) for window in self._jobs.values())

    def _forget_if_done(self, key: WindowKey, window: _Window) -> None:
        if window.exhausted and not window.waiting and window.in_flight <= 0:
            del self._jobs[key]

    def _take(self, window: _Window) -> list[int]:
        count = min(len(window.waiting), window.size - window.in_flight)
        taken = [window.waiting.popleft() for _ in range(max(0, count))]
        window.in_flight += len(taken)
        return taken
