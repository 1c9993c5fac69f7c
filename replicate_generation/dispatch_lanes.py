"""One account's tasks waiting in a process, in the order the shared limit store serves them:
interactive first, then callers by start-time fair queueing weighted by their weight, then each
caller's tasks in the order given; a caller at its own in-flight bound is passed over."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from replicate_generation.limits.base import Turn

Task = tuple[Callable[[], Any], Future[Any]]
_Waiting = tuple[float, int, Task]  # start tag, arrival, task


class Lanes:
    """A line per (band, caller); not thread-safe (the dispatcher's lock guards it)."""

    def __init__(self) -> None:
        self._lines: dict[tuple[int, str], deque[_Waiting]] = {}
        self._finish: dict[str, float] = {}
        self._caps: dict[str, int | None] = {}
        self._running: dict[str, int] = {}
        self._running_bands = [0, 0]
        self._vtime = 0.0
        self._arrival = itertools.count()

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def push(self, turn: Turn, tasks: Iterable[Task]) -> None:
        """Each task starts where the caller's last finished, or now if the caller was idle."""
        line = self._lines.setdefault((turn.band, turn.caller), deque())
        finish = max(self._vtime, self._finish.get(turn.caller, 0.0))
        for task in tasks:
            line.append((finish, next(self._arrival), task))
            finish += turn.step
        self._finish[turn.caller] = finish
        self._caps[turn.caller] = turn.cap

    def pop(self) -> tuple[tuple[int, str], Task] | None:
        """The next task and its (band, caller), skipping callers at their bound; None if none
        may go."""
        ready = [(band, line[0][:2], key) for key, line in self._lines.items() if line
                 for band in (key[0],) if not self._at_cap(key[1])]
        if not ready:
            return None
        _, _, key = min(ready)
        start, _, task = self._lines[key].popleft()
        if not self._lines[key]:
            del self._lines[key]
        self._vtime = max(self._vtime, start)
        self._running[key[1]] = self._running.get(key[1], 0) + 1
        self._running_bands[key[0]] += 1
        return key, task

    def done(self, key: tuple[int, str]) -> None:
        """A task popped under this (band, caller) ended: the caller may go again."""
        band, caller = key
        self._running_bands[band] -= 1
        self._running[caller] -= 1
        if not self._running[caller]:
            del self._running[caller]
        self._forget_idle()

    def runnable(self) -> int:
        """Tasks that may start now: each caller's waiting ones, up to what its bound leaves."""
        waiting: dict[str, int] = {}
        for (_, caller), line in self._lines.items():
            waiting[caller] = waiting.get(caller, 0) + len(line)
        total = 0
        for caller, count in waiting.items():
            cap = self._caps.get(caller)
            room = count if cap is None else max(0, cap - self._running.get(caller, 0))
            total += min(count, room)
        return total

    def interactive(self) -> int:
        return sum(len(line) for (band, _), line in self._lines.items() if band == 0)

    def batch(self) -> int:
        """Batch tasks waiting or running here."""
        waiting = sum(len(line) for (band, _), line in self._lines.items() if band == 1)
        return waiting + self._running_bands[1]

    def clear(self) -> list[Task]:
        dropped = [task for line in self._lines.values() for _, _, task in line]
        self._lines.clear()
        self._forget_idle()
        return dropped

    def _at_cap(self, caller: str) -> bool:
        cap = self._caps.get(caller)
        return cap is not None and self._running.get(caller, 0) >= cap

    def _forget_idle(self) -> None:
        """Callers with nothing waiting or running, at or behind the virtual time, start there
        anyway: forget them so the maps stay as small as the callers with work."""
        waiting = {caller for _, caller in self._lines}
        for caller in [c for c in self._finish if c not in waiting and c not in self._running
                       and self._finish[c] <= self._vtime]:
            del self._finish[caller]
            self._caps.pop(caller, None)
