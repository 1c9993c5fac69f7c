"""The dispatcher: runs tasks on a thread pool, per account in FIFO order.

Each account gets at most as many runner threads as its concurrency limit, so one account's
10,000-item batch can never occupy every pool thread while another account's single request
waits: threads only ever block on their own account's limits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """Too many tasks are waiting in this process; the caller should retry later."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many tasks are queued; retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The process is stopping and takes no new work."""


class Dispatcher:
    """Queue per account, runners per account bounded by `runners_for(account)`."""

    def __init__(self, max_workers: int, max_queued: int,
                 runners_for: Callable[[str], int]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dispatch")
        self._max_queued = max_queued
        self._runners_for = runners_for
        self._queues: dict[str, deque[tuple[Callable[[], Any], Future[Any]]]] = {}
        self._runners: dict[str, int] = {}
        self._queued = 0
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, account: str, fn: Callable[[], Any]) -> Future[Any]:
        """Queue fn for the account; raise QueueFull or ShuttingDown instead of queueing."""
        return self.submit_many(account, [fn])[0]

    def submit_many(self, account: str, fns: list[Callable[[], Any]]) -> list[Future[Any]]:
        """Queue several tasks at once, all or none, preserving their order."""
        futures: list[Future[Any]] = [Future() for _ in fns]
        with self._lock:
            if self._closed:
                raise ShuttingDown
            if self._queued + len(fns) > self._max_queued:
                raise QueueFull(retry_after=5.0)
            queue = self._queues.setdefault(account, deque())
            queue.extend(zip(fns, futures, strict=True))
            self._queued += len(fns)
            wanted = min(len(queue), self._runners_for(account)) - self._runners.get(account, 0)
            self._runners[account] = self._runners.get(account, 0) + max(wanted, 0)
        for _ in range(max(wanted, 0)):
            self._pool.submit(self._run, account)
        return futures

    def queued(self, account: str | None = None) -> int:
        """Tasks waiting for a runner, for one account or all."""
        with self._lock:
            if account is None:
                return self._queued
            return len(self._queues.get(account, ()))

    def _next(self, account: str) -> tuple[Callable[[], Any], Future[Any]] | None:
        with self._lock:
            queue = self._queues.get(account)
            if not queue:
                self._runners[account] -= 1
                if not self._runners[account]:
                    del self._runners[account]
                    self._queues.pop(account, None)
                return None
            self._queued -= 1
            return queue.popleft()

    def _run(self, account: str) -> None:
        while (item := self._next(account)) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new work, drop what is queued (its futures are cancelled), finish the rest."""
        with self._lock:
            self._closed = True
            dropped = [future for queue in self._queues.values() for _, future in queue]
            for queue in self._queues.values():
                queue.clear()
            self._queued = 0
        for future in dropped:
            future.cancel()
        self._pool.shutdown(wait=wait)
