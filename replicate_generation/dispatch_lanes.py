"""One account's tasks waiting in a process, in the order the shared limit store serves them:
interactive first, then callers by start-time fair queueing weighted by their weight, then each
caller's tasks in the order given."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from replicate_generation.limits.base import Turn

Task = tuple[Callable[[], Any], Future[Any]]


class Lanes:
    """A heap per band of (start tag, arrival, task); not thread-safe (the dispatcher's lock)."""

    def __init__(self) -> None:
        self._bands: dict[int, list[tuple[float, int, Task]]] = {0: [], 1: []}
        self._finish: dict[str, float] = {}
        self._vtime = 0.0
        self._arrival = itertools.count()

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._bands.values())

    def push(self, turn: Turn, tasks: Iterable[Task]) -> None:
        """Each task starts where the caller's last finished, or now if the caller was idle."""
        heap = self._bands[turn.band]
        finish = max(self._vtime, self._finish.get(turn.caller, 0.0))
        for task in tasks:
            heapq.heappush(heap, (finish, next(self._arrival), task))
            finish += turn.step
        self._finish[turn.caller] = finish

    def pop(self) -> Task:
        """The next task: IndexError when none waits."""
        heap = self._bands[0] or self._bands[1]
        start, _, task = heapq.heappop(heap)
        self._vtime = max(self._vtime, start)
        # Callers at or behind the virtual time would start there anyway: forget them.
        self._finish = {c: f for c, f in self._finish.items() if f > self._vtime}
        return task

    def interactive(self) -> int:
        return len(self._bands[0])

    def batch(self) -> int:
        return len(self._bands[1])

    def clear(self) -> list[Task]:
        dropped = [task for heap in self._bands.values() for _, _, task in heap]
        for heap in self._bands.values():
            heap.clear()
        return dropped
