"""How many releases a process has heard of, so a waiter can sleep until it is next in line.

At rank r a waiter sleeps through r - 1 releases (any process), so the next in line is awake when
its slot frees; other accounts' releases count too, as waking early costs only one more look.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import NamedTuple


class Heard(NamedTuple):
    """What a waiter had heard of when it last looked at the store."""

    releases: int
    resets: int  # limits changed, shutdown: every waiter looks again


class ReleaseCount:
    """A counter of releases heard of, with sleepers woken once it reaches their target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases = 0
        self._resets = 0
        self._sleepers: list[tuple[int, int, threading.Event]] = []
        self._serial = itertools.count()

    def heard(self) -> Heard:
        with self._lock:
            return Heard(self._releases, self._resets)

    def add(self, releases: int = 1) -> None:
        """Count releases and wake the sleepers whose target they reach."""
        with self._lock:
            self._releases += releases
            while self._sleepers and self._sleepers[0][0] <= self._releases:
                heapq.heappop(self._sleepers)[2].set()

    def wake_everyone(self) -> None:
        """Wake every sleeper, and any that looked before this and sleeps after it."""
        with self._lock:
            self._resets += 1
            for _, _, woken in self._sleepers:
                woken.set()
            self._sleepers.clear()

    def wait(self, since: Heard, releases: int, timeout: float) -> None:
        """Sleep until `releases` more than `since` were heard of, a reset, or the timeout."""
        with self._lock:
            if self._resets != since.resets or self._releases >= since.releases + releases:
                return
            sleeper = (since.releases + releases, next(self._serial), threading.Event())
            heapq.heappush(self._sleepers, sleeper)
        if sleeper[2].wait(timeout):
            return
        with self._lock:
            if sleeper in self._sleepers:  # timed out: its poll is due, it leaves the heap
                self._sleepers.remove(sleeper)
                heapq.heapify(self._sleepers)
