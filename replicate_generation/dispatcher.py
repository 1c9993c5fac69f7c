"""Runs tasks on a thread pool, per account in the order its shared limit store serves them
(interactive first, then callers by weight), with at most the account's concurrency limit of
threads each (plus one per interactive task waiting, so no one waits behind a batch for a
thread), so one account's batch never holds every thread; accounts take turns for threads task by
task and split them evenly while several have work; admission keeps a reserve for accounts within
their fair share of the queue."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from replicate_generation.dispatch_lanes import Lanes
from replicate_generation.dispatch_lanes import Task as _Task
from replicate_generation.errors import QueueFull, ShuttingDown
from replicate_generation.limits.base import ANYONE, Turn

log = logging.getLogger(__name__)

# Queued tasks drain within seconds at the usual limits; a client retrying sooner only spins.
_RETRY_AFTER = 5.0


class Dispatcher:
    """Queue per account, runners per account bounded by `runners_for(account)`."""

    def __init__(self, max_workers: int, max_queued: int,
                 runners_for: Callable[[str], int], *,
                 max_queued_per_account: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dispatch")
        self._threads = max_workers
        self._max_queued = max_queued
        self._per_account = max_queued_per_account or max(1, max_queued // 5)
        self._runners_for = runners_for
        self._on_idle: Callable[[str], None] | None = None
        self._queues: dict[str, Lanes] = {}
        self._runners: dict[str, int] = {}
        # Runners submitted to the pool that have no thread yet, per account.
        self._waiting: dict[str, int] = {}
        # Each account's runner limit as read at its latest submit.
        self._limits: dict[str, int] = {}
        self._queued = 0
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, account: str, fn: Callable[[], Any], turn: Turn = ANYONE) -> Future[Any]:
        """Queue fn for the account; raise QueueFull or ShuttingDown instead of queueing."""
        return self.submit_many(account, [fn], turn)[0]

    def submit_many(self, account: str, fns: list[Callable[[], Any]],
                    turn: Turn = ANYONE) -> list[Future[Any]]:
        """Queue several tasks at once, all or none, in their order among the caller's own."""
        futures: list[Future[Any]] = [Future() for _ in fns]
        limit = self._runners_for(account)  # may read a shared store: never under the lock
        with self._lock:
            if self._closed:
                raise ShuttingDown
            self._admit(account, len(fns))
            self._queues.setdefault(account, Lanes()).push(turn, zip(fns, futures, strict=True))
            self._queued += len(fns)
            self._limits[account] = limit
            starts = self._runners_to_start()
        self._start(starts)
        return futures

    def _runners_to_start(self) -> list[str]:
        """One entry per runner to start so each account with work has its cap; caller holds
        the lock and starts them after releasing it."""
        starts: list[str] = []
        for account, queue in self._queues.items():
            wanted = min(queue.runnable(), self._cap(account) - self._runners.get(account, 0))
            if wanted > 0:
                self._runners[account] = self._runners.get(account, 0) + wanted
                self._waiting[account] = self._waiting.get(account, 0) + wanted
                starts += [account] * wanted
        return starts

    def _start(self, accounts: list[str]) -> None:
        for account in accounts:
            try:
                self._pool.submit(self._run, account)
            except RuntimeError:  # shut down meanwhile: the queued tasks were cancelled with it
                return

    def _cap(self, account: str) -> int:
        """Runners the account may have: its limit, and an even split of the threads among the
        accounts with work here; caller holds the lock."""
        busy = set(self._runners) | {name for name, queue in self._queues.items() if queue}
        share = -(-self._threads // len(busy | {account}))
        limit = self._limits.get(account, 1)
        return max(1, min(limit, share)) + self._overtaking(account, limit)

    def _overtaking(self, account: str, limit: int) -> int:
        """Runners beyond the cap for interactive tasks while batch work (waiting or running)
        may keep the others busy."""
        queue = self._queues.get(account)
        if queue is None or not queue.batch():
            return 0
        return min(queue.interactive(), limit)

    def _others_waiting(self, account: str) -> bool:
        return any(count for name, count in self._waiting.items() if name != account)

    def on_idle(self, callback: Callable[[str], None]) -> None:
        """Call back (outside the lock) when an account has nothing queued or running here."""
        self._on_idle = callback

    def _admit(self, account: str, count: int) -> None:
        """Raise QueueFull unless `count` more tasks of this account fit; caller holds the lock."""
        mine = len(self._queues.get(account, ())) + count
        total = self._queued + count
        if mine > min(self._per_account, self._max_queued):
            raise QueueFull(retry_after=_RETRY_AFTER, scope="account")
        if total > self._max_queued:
            raise QueueFull(retry_after=_RETRY_AFTER)
        if mine > self._fair_share(account) and total > self._max_queued - self._reserve():
            # Over its share: the last part of the queue stays free for accounts within theirs.
            raise QueueFull(retry_after=_RETRY_AFTER, scope="account")

    def _fair_share(self, account: str) -> int:
        """The global queue split among the accounts waiting, this one and one newcomer more."""
        others = sum(1 for name, queue in self._queues.items() if queue and name != account)
        return max(1, self._max_queued // (others + 2))

    def _reserve(self) -> int:
        return max(1, self._max_queued // 10)

    def busy(self, account: str) -> bool:
        """True while the account has tasks queued or running in this dispatcher."""
        with self._lock:
            return bool(self._queues.get(account)) or account in self._runners

    def discard(self, account: str) -> int:
        """Drop the account's queued tasks (their futures are cancelled); return how many."""
        with self._lock:
            queue = self._queues.get(account)
            dropped = queue.clear() if queue is not None else []
            self._queued -= len(dropped)
        for _, future in dropped:
            future.cancel()
        return len(dropped)

    @property
    def running(self) -> bool:
        """False once shutdown began (readiness reports it)."""
        return not self._closed

    def queued(self, account: str | None = None) -> int:
        """Tasks waiting for a runner, for one account or all."""
        with self._lock:
            if account is None:
                return self._queued
            return len(self._queues.get(account, ()))

    def _next(self, account: str,
              may_yield: bool) -> tuple[tuple[int, str], _Task] | Literal["yield"] | None:
        """The account's next task and its lane; "yield" when another account waits for a
        thread and this runner has run a task in this turn (it goes to the back of the pool's
        line: a turn always runs one, or runners passing turns on would run nothing); None when
        this runner should end (none left, or every caller left is at its bound)."""
        with self._lock:
            queue = self._queues.get(account)
            if not queue or not queue.runnable() or self._runners[account] > self._cap(account):
                self._end_runner(account)
                return None
            if may_yield and self._others_waiting(account):
                self._waiting[account] = self._waiting.get(account, 0) + 1
                return "yield"
            picked = queue.pop()
            if picked is not None:
                self._queued -= 1
            return picked

    def _end_runner(self, account: str) -> None:
        """One runner fewer; the account is forgotten with its last one; caller holds the lock."""
        self._runners[account] -= 1
        if not self._runners[account]:
            del self._runners[account]
            if not self._queues.get(account):
                self._queues.pop(account, None)
                self._limits.pop(account, None)

    def _run(self, account: str) -> None:
        with self._lock:
            self._waiting[account] -= 1
            if not self._waiting[account]:
                del self._waiting[account]
        if self._run_all(account):
            self._take_turn_later(account)
            return
        with self._lock:  # a share freed by this runner goes to the accounts still waiting
            starts = [] if self._closed else self._runners_to_start()
        self._start(starts)
        callback = self._on_idle
        if callback is not None and not self.busy(account):
            try:
                callback(account)
            except Exception:  # noqa: BLE001 - bookkeeping must never kill a pool thread
                log.exception("idle callback failed for account=%s", account)

    def _take_turn_later(self, account: str) -> None:
        """Queue this runner behind the others waiting for a thread."""
        try:
            self._pool.submit(self._run, account)
        except RuntimeError:  # the pool shut down meanwhile: its queue was dropped too
            with self._lock:
                self._waiting[account] -= 1
                if not self._waiting[account]:
                    del self._waiting[account]
                self._end_runner(account)

    def _run_all(self, account: str) -> bool:
        """Run the account's tasks until none is left (False) or its turn is over (True)."""
        ran = False
        while (item := self._next(account, may_yield=ran)) is not None:
            if isinstance(item, str):
                return True
            ran = True
            lane, (fn, future) = item
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
            finally:
                self._task_done(account, lane)
        return False

    def _task_done(self, account: str, lane: tuple[int, str]) -> None:
        with self._lock:
            queue = self._queues.get(account)
            if queue is not None:
                queue.done(lane)

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new work, drop what is queued (its futures are cancelled), finish the rest."""
        with self._lock:
            self._closed = True
            dropped = [future for queue in self._queues.values() for _, future in queue.clear()]
            self._queued = 0
        for future in dropped:
            future.cancel()
        self._pool.shutdown(wait=wait)
