"""One contract for every LimitStore: the same tests, the same assertions, on SQLite and on Redis.

Redis tests use the shared server (REDIS_TEST_URL, default redis://127.0.0.1:6379/9) under a key
prefix of their own, deleted afterwards; tests that stop, pause or empty Redis start a private
server (tests/redis_server.py). Fake clocks wherever time is arithmetic; threads synchronise on
events, never on sleeps-and-hope.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.crc import key_slot

from redis_server import RedisProxy, RedisServer
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.errors import DeadlineExceeded, StoreUnavailable
from replicate_generation.limits.base import AccountStats, Limits, LimitStore
from replicate_generation.limits.redis import RedisLimitStore
from replicate_generation.limits.sqlite import SQLiteLimitStore
from shared_backends import missing

ACCOUNT = "acct-hash-1"
OTHER = "acct-hash-2"
THIRD = "acct-hash-3"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/9")


class FakeClock:
    """A clock that only moves when told to; sleep() advances it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class StoreFactory:
    """Opens stores of one backend that all share one state (a file, or a key prefix)."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.path = tmp_path / "limits.sqlite3"
        self.prefix = f"rgtest-{uuid.uuid4().hex[:12]}"
        self._opened: list[LimitStore] = []

    def __call__(self, limits: Limits, *, clock: Callable[[], float] | None = None,
                 lease_ttl: float = 30.0) -> LimitStore:
        store: LimitStore
        if self.backend == "sqlite":
            store = SQLiteLimitStore(self.path, limits, lease_ttl=lease_ttl,
                                     clock=clock or time.time)
        else:
            store = RedisLimitStore(SHARED_REDIS_URL, limits, lease_ttl=lease_ttl, clock=clock,
                                    key_prefix=self.prefix)
        self._opened.append(store)
        return store

    def worker_target(self) -> list[str]:
        """How a subprocess (WORKER) opens the same shared state."""
        if self.backend == "sqlite":
            return ["sqlite", str(self.path), "-"]
        return ["redis", SHARED_REDIS_URL, self.prefix]

    def close(self) -> None:
        for store in self._opened:
            store.close()
        if self.backend == "redis":
            delete_prefix(self.prefix)


def delete_prefix(prefix: str) -> None:
    """Delete this test's keys only; the shared server is never flushed."""
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def shared_redis_or_skip() -> None:
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        missing(f"the shared test Redis ({urlsplit(SHARED_REDIS_URL).netloc}) is down")
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    if request.param == "redis":
        shared_redis_or_skip()
    factory = StoreFactory(request.param, tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    shared_redis_or_skip()
    factory = StoreFactory("redis", tmp_path)
    yield factory
    factory.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition the test is waiting for; fail loudly instead of hanging."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def stats_of(store: LimitStore, account: str = ACCOUNT) -> AccountStats:
    return store.stats(account)[0]


def queue_length_is(store: LimitStore, waiting: int) -> bool:
    return stats_of(store).waiting == waiting


class Occupancy:
    """Counts threads inside a slot and remembers the peak and entry order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.peak = 0
        self.order: list[str] = []
        self.inside_at_entry: dict[str, int] = {}

    def enter(self, name: str) -> None:
        with self._lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self.order.append(name)
            self.inside_at_entry[name] = self.inside

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1

    @property
    def entered(self) -> int:
        with self._lock:
            return len(self.order)


class Watched:
    """A LimitStore that counts refused try_acquire calls and StoreUnavailable answers, so a
    test can wait until waiters have re-checked instead of sleeping. Delegates everything."""

    def __init__(self, inner: LimitStore) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.refused = 0
        self.unavailable = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        return self._counting(attr) if callable(attr) else attr

    def _counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = method(*args, **kwargs)
            except StoreUnavailable:
                with self._lock:
                    self.unavailable += 1
                raise
            if method.__name__ == "try_acquire" and result is None or \
                    method.__name__ == "try_acquire_ranked" and result[0] is None:
                with self._lock:
                    self.refused += 1
            return result
        return call


@contextmanager
def slot_waiter(manager: ConcurrencyManager) -> Iterator[threading.Event]:
    """A thread waiting for one of ACCOUNT's slots; the event is set once it holds it. On exit
    the thread must have finished."""
    entered = threading.Event()

    def wait_for_a_slot() -> None:
        with manager.slot(ACCOUNT, time.time() + 30):
            entered.set()

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(wait_for_a_slot)
        yield entered
        future.result(timeout=15)


@contextmanager
def pool_opening(workers: int, *gates: threading.Event) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose gates all open on exit, so a failing assertion is
    reported at once instead of after the blocked holders time out."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            yield pool
        finally:
            for gate in gates:
                gate.set()


def hold_slot(
    manager: ConcurrencyManager, occupancy: Occupancy, name: str, gate: threading.Event
) -> None:
    with manager.slot(ACCOUNT, time.time() + 30):
        occupancy.enter(name)
        assert gate.wait(30), f"{name} was never released"
        occupancy.leave()


# --------------------------------------------------------------------------
# Limits


def test_store_rejects_invalid_defaults_and_ttl(make_store: StoreFactory) -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        make_store(Limits(0, 60))
    with pytest.raises(ValueError, match="lease_ttl"):
        make_store(Limits(1, 60), lease_ttl=0)


def test_set_limits_persists_and_is_seen_by_other_instances(make_store: StoreFactory) -> None:
    first = make_store(Limits(3, 60))
    second = make_store(Limits(5, 100))
    # No override yet: each instance applies its own defaults.
    assert first.get_limits() == Limits(3, 60)
    assert second.get_limits() == Limits(5, 100)

    override = Limits(1, 30, burst=2, polls_per_minute=1000)
    first.set_limits(override)
    assert second.get_limits() == override  # seen at once, no cache
    assert second.try_acquire(ACCOUNT, "t1") is not None
    assert second.try_acquire(ACCOUNT, "t2") is None  # the override's limit of 1

    restarted = make_store(Limits(9, 900))
    assert restarted.get_limits() == override  # survives a restart


def test_overrides_per_field_and_the_smallest_live_declaration(make_store: StoreFactory) -> None:
    clock = FakeClock()
    small = make_store(Limits(2, 60, burst=3), clock=clock, lease_ttl=10)
    large = make_store(Limits(8, 600), clock=clock, lease_ttl=10)
    small.declare("small")
    large.declare("large")
    assert large.get_limits() == Limits(2, 60, burst=1)  # per field, the smaller one
    large.set_overrides({"max_concurrent": 5})
    sources = small.describe_limits()
    assert sources["max_concurrent"].source == "configure"
    assert sources["max_concurrent"].set_at == clock.now
    assert (sources["requests_per_minute"].value, sources["requests_per_minute"].source,
            sources["requests_per_minute"].declarations) == (60, "environment", 2)
    assert (sources["burst"].declared_min, sources["burst"].declared_max) == (1, 3)

    clock.advance(11)  # both rows lapsed; each store still counts its own declaration
    assert small.get_limits() == Limits(5, 60, burst=3)
    assert large.get_limits() == Limits(5, 600, burst=1)
    small.withdraw("small")  # an observer now: its environment is only a guess
    large.set_overrides({"max_concurrent": None, "burst": 4})
    assert small.get_limits() == Limits(2, 60, burst=4)
    assert large.get_limits() == Limits(8, 600, burst=4)
    with pytest.raises(ValueError, match="unknown limit"):
        small.set_overrides({"max_concurent": 3})
    large.clear_overrides()
    assert large.get_limits() == Limits(8, 600)


def test_configure_validates_before_storing(make_store: StoreFactory) -> None:
    store = make_store(Limits(3, 60))
    manager = ConcurrencyManager(store)
    with pytest.raises(ValueError, match="requests_per_minute"):
        manager.configure(Limits(3, 0))
    assert manager.limits() == Limits(3, 60)
    manager.configure(Limits(4, 120))
    assert manager.limits() == Limits(4, 120)
    manager.shutdown()


def test_check_passes_while_the_store_is_reachable(make_store: StoreFactory) -> None:
    make_store(Limits(1, 60)).check()


# --------------------------------------------------------------------------
# Rate: GCRA


def test_gcra_burst_then_steady_pace(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60, burst=3), clock=clock)  # T = 1 s
    assert [store.reserve(ACCOUNT, "create") for _ in range(6)] == [0, 0, 0, 1, 2, 3]
    # Accounts and kinds are independent buckets.
    assert store.reserve(OTHER, "create") == 0
    assert store.reserve(ACCOUNT, "poll") == 0

    # Once the queue has drained and the account idled, the burst is back.
    clock.advance(20)
    assert [store.reserve(ACCOUNT, "create") for _ in range(4)] == [0, 0, 0, 1]


def test_gcra_poll_kind_uses_polls_per_minute(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 6, polls_per_minute=120), clock=clock)
    assert [store.reserve(ACCOUNT, "poll") for _ in range(3)] == [0, 0.5, 1.0]
    with pytest.raises(ValueError, match="kind"):
        store.reserve(ACCOUNT, "delete")  # type: ignore[arg-type]


def test_gcra_any_60s_window_holds_at_most_rpm_plus_burst(make_store: StoreFactory) -> None:
    rpm, burst = 30, 5
    clock = FakeClock()
    store = make_store(Limits(1, rpm, burst=burst), clock=clock)
    rng = random.Random(1234)
    use_times: list[float] = []
    for _ in range(1500):
        # Arrivals a little faster than the pace, so a queue builds, with
        # occasional idle gaps long enough to drain it and refill the burst.
        gap = rng.uniform(30, 150) if rng.random() < 0.02 else rng.expovariate(0.6)
        clock.advance(gap)
        use_times.append(clock.now + store.reserve(ACCOUNT, "create"))

    use_times.sort()
    busiest = 0
    for i, start in enumerate(use_times):
        j = i
        while j < len(use_times) and use_times[j] < start + 60:
            j += 1
        busiest = max(busiest, j - i)
    assert busiest <= rpm + burst
    assert busiest >= rpm  # the simulation really saturated the limit


def test_reserve_past_max_wait_spends_nothing(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    assert store.reserve(ACCOUNT, "create") == 0
    assert store.reserve(ACCOUNT, "create", max_wait=0.5) == 1.0  # refused
    assert store.reserve(ACCOUNT, "create") == 1.0  # not 2.0: nothing was spent
    assert stats_of(store).creates_last_minute == 1  # the refused one is not logged


def test_back_off_pushes_reservations(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60, burst=3), clock=clock)
    store.back_off(ACCOUNT, 30)
    assert store.backoff_remaining(ACCOUNT) == 30
    store.back_off(ACCOUNT, 5)  # a shorter back-off never shortens the current one
    assert store.backoff_remaining(ACCOUNT) == 30
    assert store.backoff_remaining(OTHER) == 0

    # Creates (and polls) start after the back-off, then at the learned pace (60% of 60/min,
    # one at a time) until accepted creates raise it again.
    step = 60 / 36
    assert [store.reserve(ACCOUNT, "create") for _ in range(3)] == \
        pytest.approx([30, 30 + step, 30 + 2 * step])
    assert store.reserve(ACCOUNT, "poll") == 30
    assert store.reserve(OTHER, "create") == 0

    clock.advance(40)
    assert store.backoff_remaining(ACCOUNT) == 0


def test_a_429_cuts_the_create_rate_once_per_episode(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 600, burst=10), clock=clock)
    for _ in range(5):  # five creates throttled at once are one episode: one cut
        store.back_off(ACCOUNT, 2)
    assert store.last_cut(ACCOUNT) == clock.now
    assert store.last_cut(OTHER) == 0
    clock.advance(2)
    assert [store.reserve(ACCOUNT, "create") for _ in range(3)] == \
        pytest.approx([0, 60 / 360, 120 / 360])  # no burst while learning
    clock.advance(5)
    store.back_off(ACCOUNT, 2)  # a later 429 is a new episode: 360 * 0.6
    clock.advance(10)
    first = store.reserve(ACCOUNT, "create")
    assert store.reserve(ACCOUNT, "create") - first == pytest.approx(60 / 216)


def test_accepted_creates_raise_the_learned_rate_back_to_the_limit(
        make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 100, burst=4), clock=clock)
    store.back_off(ACCOUNT, 1)
    accepted = 0
    while True:
        clock.advance(10)
        gaps = [store.reserve(ACCOUNT, "create") for _ in range(2)]
        if gaps[1] == 0:  # the burst is back: the configured pace applies again
            break
        assert gaps[1] >= 60 / 100 - 1e-9  # never faster than the configured rate
        store.create_accepted(ACCOUNT)
        accepted += 1
    # +1% per accepted create from 60/min: about 51 creates to regain the limit.
    assert 46 <= accepted <= 56
    assert store.last_cut(ACCOUNT) == 0  # recovered: nothing learned is left
    store.create_accepted(OTHER)  # an account never throttled learns nothing
    assert store.reserve(OTHER, "create") == 0 and store.reserve(OTHER, "create") == 0


def test_back_off_rejects_nonsense_and_caps_huge_values(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    with pytest.raises(ValueError, match="back-off"):
        store.back_off(ACCOUNT, -1)
    with pytest.raises(ValueError, match="back-off"):
        store.back_off(ACCOUNT, math.nan)
    store.back_off(ACCOUNT, math.inf)
    assert store.backoff_remaining(ACCOUNT) == 3600


def test_wait_for_create_sleeps_the_computed_time(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60, burst=2), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        manager.wait_for_create(ACCOUNT, clock() + 100)
    assert clock.sleeps == [1.0]
    assert stats_of(store).creates_last_minute == 3
    manager.shutdown()


def test_wait_for_create_deadline_spends_no_token(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    manager.wait_for_create(ACCOUNT, clock() + 10)
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_create(ACCOUNT, clock() + 0.5)  # would need 1.0 s
    assert clock.sleeps == []  # it did not even start waiting
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_poll(ACCOUNT, clock() - 1)  # deadline already passed
    manager.wait_for_create(ACCOUNT, clock() + 10)
    assert clock.sleeps == [1.0]  # not 2.0: the refused attempt spent nothing
    manager.shutdown()


def test_wait_for_create_waits_out_shared_back_off(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    other_process = ConcurrencyManager(make_store(Limits(1, 60), clock=clock))
    other_process.throttled(ACCOUNT, 12)
    manager.wait_for_create(ACCOUNT, clock() + 60)
    manager.wait_for_poll(ACCOUNT, clock() + 60)
    assert clock.sleeps == [12.0]
    other_process.throttled(ACCOUNT, 30)
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_create(ACCOUNT, clock() + 10)
    assert clock.sleeps == [12.0]
    manager.shutdown()
    other_process.shutdown()


def test_back_off_that_starts_during_the_sleep_re_reserves(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    start = clock.now
    manager: ConcurrencyManager

    def sleep_while_another_worker_sees_a_429(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == 1:
            manager.throttled(ACCOUNT, 10)

    manager = ConcurrencyManager(store, clock=clock, sleep=sleep_while_another_worker_sees_a_429)
    manager.wait_for_create(ACCOUNT, start + 100)  # token at once
    manager.wait_for_create(ACCOUNT, start + 100)  # 1 s pace, then a 429 arrives
    # The token taken before the 429 is dropped; the new one waits the back-off.
    assert clock.sleeps == [1.0, 10.0]
    assert clock.now == start + 11
    manager.shutdown()


def test_a_token_reserved_before_a_rate_cut_is_taken_again_at_the_new_pace(
        make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock)
    start = clock.now
    manager: ConcurrencyManager

    def sleep_while_a_short_429_comes_and_goes(seconds: float) -> None:
        if not clock.sleeps:
            manager.throttled(ACCOUNT, 0.5)  # over before this sleeper wakes
        clock.sleep(seconds)

    manager = ConcurrencyManager(store, clock=clock, sleep=sleep_while_a_short_429_comes_and_goes)
    manager.wait_for_create(ACCOUNT, start + 100)  # token at once
    manager.wait_for_create(ACCOUNT, start + 100)  # reserved at 60/min; the rate is cut
    manager.wait_for_create(ACCOUNT, start + 100)
    # The second token was re-taken after the cut, so the third is spaced for 36/min, not 60.
    assert clock.sleeps == pytest.approx([1.0, 60 / 36])
    manager.shutdown()


# --------------------------------------------------------------------------
# Leases and tickets on the store (fake clock)


def test_lease_expires_when_holder_stops_renewing(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock, lease_ttl=10)
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    assert store.try_acquire(ACCOUNT, "waiter") is None

    clock.advance(5)
    store.renew([lease], ["waiter"])  # alive until +15
    clock.advance(9.9)
    assert store.try_acquire(ACCOUNT, "waiter") is None
    assert stats_of(store).in_flight == 1

    clock.advance(0.2)  # holder stopped renewing: its lease is gone after ttl
    assert stats_of(store).in_flight == 0
    second = store.try_acquire(ACCOUNT, "waiter")
    assert second is not None
    assert stats_of(store) == AccountStats(ACCOUNT, 1, 0, 0, 0.0)  # no leak

    store.release(lease)  # a late release of the expired lease is harmless
    assert stats_of(store).in_flight == 1
    store.release(second)
    assert stats_of(store).in_flight == 0


def test_a_purged_or_released_lease_is_not_revived_by_a_late_renew(
        make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(2, 60), clock=clock, lease_ttl=10)
    paused, released = store.try_acquire(ACCOUNT, "paused"), store.try_acquire(ACCOUNT, "gone")
    assert paused is not None and released is not None
    store.release(released)
    clock.advance(11)  # the paused holder missed its renewals; a grant purges its lease
    newcomer = store.try_acquire(ACCOUNT, "newcomer")
    assert newcomer is not None
    store.renew([paused, released, newcomer], [])  # e.g. a heartbeat that ran late
    assert stats_of(store).in_flight == 1
    assert store.try_acquire(ACCOUNT, "next") is not None


def test_expired_but_unpurged_lease_is_revived_by_renew(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock, lease_ttl=10)
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    clock.advance(12)  # nobody was granted its slot in between
    store.renew([lease], [])
    assert stats_of(store).in_flight == 1
    assert store.try_acquire(ACCOUNT, "waiter") is None


def test_abandoned_ticket_expires_and_stops_blocking_the_queue(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60), clock=clock, lease_ttl=10)
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    assert store.try_acquire(ACCOUNT, "dead-waiter") is None
    assert store.try_acquire(ACCOUNT, "live-waiter") is None
    clock.advance(6)
    store.renew([lease], ["live-waiter"])
    clock.advance(6)  # dead-waiter's ticket has expired
    store.release(lease)
    assert store.try_acquire(ACCOUNT, "live-waiter") is not None


def test_fifo_order_of_tickets(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(2, 60), clock=clock)
    held = [store.try_acquire(ACCOUNT, f"h{i}") for i in range(2)]
    assert None not in held
    for ticket in ("t1", "t2", "t3"):
        assert store.try_acquire(ACCOUNT, ticket) is None
    assert stats_of(store).waiting == 3

    store.release(str(held[0]))  # one free slot: only the head may take it
    assert store.try_acquire(ACCOUNT, "t3") is None
    assert store.try_acquire(ACCOUNT, "t2") is None
    assert store.try_acquire(ACCOUNT, "t1") is not None

    store.release(str(held[1]))
    assert store.try_acquire(ACCOUNT, "t3") is None
    assert store.try_acquire(ACCOUNT, "t2") is not None
    store.leave_queue("t3")
    assert stats_of(store).waiting == 0
    # Another account's queue is independent.
    assert store.try_acquire(OTHER, "o1") is not None


def test_a_refused_waiter_learns_how_many_enter_before_it(make_store: StoreFactory) -> None:
    store = make_store(Limits(2, 60), clock=FakeClock())
    held = [store.try_acquire_ranked(ACCOUNT, f"h{i}") for i in range(2)]
    assert [rank for _, rank in held] == [0, 0]
    assert [store.try_acquire_ranked(ACCOUNT, t) for t in ("t1", "t2", "t3")] == \
        [(None, 1), (None, 2), (None, 3)]
    store.release(str(held[0][0]))  # one slot free: t2 is now second in line, t3 third
    assert store.try_acquire_ranked(ACCOUNT, "t3") == (None, 2)
    store.set_overrides({"max_concurrent": 1})  # lowered below what is held: one must leave
    assert store.try_acquire_ranked(ACCOUNT, "t2") == (None, 2)


def test_a_sqlite_waiter_still_behind_others_looks_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "limits.sqlite3"
    store = SQLiteLimitStore(path, Limits(1, 60), clock=FakeClock(), lease_ttl=30)
    holder, _ = store.try_acquire_ranked(ACCOUNT, "holder")
    assert holder is not None
    assert [store.try_acquire_ranked(ACCOUNT, t) for t in ("first", "second")] == \
        [(None, 1), (None, 2)]
    watcher = sqlite3.connect(path)  # its data_version moves with every other connection's commit
    try:
        before = watcher.execute("PRAGMA data_version").fetchone()
        assert [store.try_acquire_ranked(ACCOUNT, "second") for _ in range(5)] == [(None, 2)] * 5
        assert watcher.execute("PRAGMA data_version").fetchone() == before
        store.release(holder)
        assert store.try_acquire_ranked(ACCOUNT, "second") == (None, 1)  # "first" goes first
        released = watcher.execute("PRAGMA data_version").fetchone()
        assert released != before  # the release alone was written
        granted, _ = store.try_acquire_ranked(ACCOUNT, "first")
        assert granted is not None
        assert watcher.execute("PRAGMA data_version").fetchone() != released
    finally:
        watcher.close()
        store.close()


def test_release_leave_queue_and_renew_run_twice_are_harmless(make_store: StoreFactory) -> None:
    store = make_store(Limits(1, 60), clock=FakeClock())
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    assert store.try_acquire(ACCOUNT, "waiter") is None
    store.renew([lease], ["waiter"])
    store.renew([lease], ["waiter"])
    assert stats_of(store) == AccountStats(ACCOUNT, 1, 1, 0, 0.0)
    store.leave_queue("waiter")
    store.leave_queue("waiter")
    store.release(lease)
    store.release(lease)
    assert stats_of(store) == AccountStats(ACCOUNT, 0, 0, 0, 0.0)
    assert store.try_acquire(ACCOUNT, "next") is not None


def test_stats_report_every_active_account(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = make_store(Limits(1, 60, burst=3), clock=clock)
    assert store.try_acquire(ACCOUNT, "holder") is not None
    assert store.try_acquire(ACCOUNT, "waiter") is None
    for _ in range(3):
        store.reserve(ACCOUNT, "create")
    store.back_off(ACCOUNT, 5)
    store.reserve(OTHER, "poll")  # polls are not creates: OTHER stays idle

    assert store.stats() == [AccountStats(ACCOUNT, 1, 1, 3, 5.0)]
    assert store.stats(OTHER) == [AccountStats(OTHER, 0, 0, 0, 0.0)]
    clock.advance(61)  # lease and ticket expired, creates out of the window
    assert store.stats() == []
    assert store.try_acquire(OTHER, "later") is not None  # an account comes back when used
    assert [stats.account for stats in store.stats()] == [OTHER]


# --------------------------------------------------------------------------
# ConcurrencyManager with threads


def test_threads_contending_never_exceed_the_limit(make_store: StoreFactory) -> None:
    k, n = 3, 10
    store = make_store(Limits(k, 600))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    occupancy, gate = Occupancy(), threading.Event()
    with pool_opening(n, gate) as pool:
        futures = [pool.submit(hold_slot, manager, occupancy, f"w{i}", gate) for i in range(n)]
        # A holder counts itself inside just after the store granted its lease: wait for both.
        wait_until(lambda: stats_of(store).waiting == n - k and occupancy.inside == k,
                   "k holders inside and all others queued")
        assert occupancy.inside == k
        assert stats_of(store).in_flight == k
        gate.set()
        for future in futures:
            future.result(timeout=30)
    assert occupancy.peak == k
    assert occupancy.entered == n  # everyone eventually got in
    assert stats_of(store) == AccountStats(ACCOUNT, 0, 0, 0, 0.0)
    manager.shutdown()


def test_lowering_the_limit_admits_nobody_until_below_it(make_store: StoreFactory) -> None:
    store = Watched(make_store(Limits(4, 600)))
    manager = ConcurrencyManager(store, poll_interval=0.005)  # type: ignore[arg-type]
    occupancy = Occupancy()
    holder_gates = [threading.Event() for _ in range(4)]
    waiters_go = threading.Event()

    def assert_nobody_new_admitted(expected_entered: int) -> None:
        # Every waiter re-checks several times and is still refused.
        mark = store.refused
        wait_until(lambda: store.refused >= mark + 9, "waiters to re-check")
        assert occupancy.entered == expected_entered

    with pool_opening(7, *holder_gates, waiters_go) as pool:
        futures: list[Future[None]] = [
            pool.submit(hold_slot, manager, occupancy, f"h{i}", gate)
            for i, gate in enumerate(holder_gates)
        ]
        wait_until(lambda: occupancy.inside == 4, "holders inside")
        futures += [
            pool.submit(hold_slot, manager, occupancy, f"w{i}", waiters_go) for i in range(3)
        ]
        wait_until(lambda: stats_of(store).waiting == 3, "waiters to queue")

        manager.configure(Limits(2, 600))
        holder_gates[0].set()  # 3 in flight > 2
        wait_until(lambda: stats_of(store).in_flight == 3, "first holder out")
        assert_nobody_new_admitted(4)
        holder_gates[1].set()  # 2 in flight == 2: still full
        wait_until(lambda: stats_of(store).in_flight == 2, "second holder out")
        assert_nobody_new_admitted(4)

        holder_gates[2].set()  # 1 in flight: exactly one waiter may enter
        wait_until(lambda: occupancy.entered == 5, "one waiter admitted")
        assert_nobody_new_admitted(5)
        assert stats_of(store).in_flight == 2

        holder_gates[3].set()
        waiters_go.set()
        for future in futures:
            future.result(timeout=30)

    assert occupancy.entered == 7
    assert all(occupancy.inside_at_entry[f"w{i}"] <= 2 for i in range(3))
    manager.shutdown()


class HookedClock(FakeClock):
    """Runs ``hook`` once, at the reading after ``arm(skip)`` let ``skip`` readings pass."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[], None] | None = None
        self.skip = 0

    def arm(self, skip: int, hook: Callable[[], None]) -> None:
        self.skip, self.hook = skip, hook

    def __call__(self) -> float:
        if self.hook is not None:
            if self.skip == 0:
                hook, self.hook = self.hook, None
                hook()
            else:
                self.skip -= 1
        return self.now


def test_a_limit_lowered_between_reading_it_and_granting_admits_nobody(
        redis_factory: StoreFactory) -> None:
    # Redis reads the limit and grants in two calls: the lowering lands between them.
    clock = HookedClock()
    store = redis_factory(Limits(2, 600), clock=clock)
    admin = redis_factory(Limits(2, 600), clock=clock)
    first = store.try_acquire(ACCOUNT, "h0")
    assert first is not None and store.try_acquire(ACCOUNT, "h1") is not None
    assert store.try_acquire(ACCOUNT, "waiter") is None

    def lower_then_release() -> None:
        admin.set_limits(Limits(1, 600))
        admin.release(first)

    clock.arm(1, lower_then_release)  # the limits read passes, the grant's reading lowers
    assert store.try_acquire(ACCOUNT, "waiter") is None
    assert clock.hook is None
    assert stats_of(store) == AccountStats(ACCOUNT, 1, 1, 0, 0.0)
    assert queue_length_is(store, 1)
    admin.set_limits(Limits(2, 600))
    assert store.try_acquire(ACCOUNT, "waiter") is not None  # its place was kept


def test_waiters_enter_in_fifo_order(make_store: StoreFactory) -> None:
    store = make_store(Limits(1, 600))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    occupancy, holder_gate, open_gate = (
        Occupancy(),
        threading.Event(),
        threading.Event(),
    )
    open_gate.set()
    with pool_opening(4, holder_gate) as pool:
        futures = [pool.submit(hold_slot, manager, occupancy, "holder", holder_gate)]
        wait_until(lambda: occupancy.inside == 1, "holder inside")
        for queued, name in enumerate("ABC", start=1):
            futures.append(pool.submit(hold_slot, manager, occupancy, name, open_gate))
            # Start the next one only once this one holds its place in the queue.
            wait_until(partial(queue_length_is, store, queued), f"{name} to queue")
        holder_gate.set()
        for future in futures:
            future.result(timeout=30)
    assert occupancy.order == ["holder", "A", "B", "C"]
    manager.shutdown()


def test_waiters_far_back_in_line_are_awake_when_their_turn_comes(
        make_store: StoreFactory) -> None:
    # Polls this slow would keep each waiter asleep 1 s or more after its turn came.
    store = make_store(Limits(1, 6000))
    manager = ConcurrencyManager(store, poll_interval=5.0)
    occupancy, holder_gate, open_gate = Occupancy(), threading.Event(), threading.Event()
    open_gate.set()
    names = [f"w{i}" for i in range(6)]
    with pool_opening(len(names) + 1, holder_gate) as pool:
        futures = [pool.submit(hold_slot, manager, occupancy, "holder", holder_gate)]
        wait_until(lambda: occupancy.inside == 1, "holder inside")
        for queued, name in enumerate(names, start=1):
            futures.append(pool.submit(hold_slot, manager, occupancy, name, open_gate))
            wait_until(partial(queue_length_is, store, queued), f"{name} to queue")
        released_at = time.monotonic()
        holder_gate.set()
        for future in futures:
            future.result(timeout=30)
        elapsed = time.monotonic() - released_at
    assert occupancy.order == ["holder", *names]
    assert elapsed < 1.0, f"six hand-overs took {elapsed:.2f} s"
    manager.shutdown()


def test_a_release_in_another_process_wakes_the_next_in_line_before_its_poll(
        make_store: StoreFactory) -> None:
    # SQLite: a datagram between the stores on one file; Redis: its pub/sub channel.
    here, there = make_store(Limits(1, 600)), make_store(Limits(1, 600))
    # Polls this slow would leave the next in line waiting 1.25 s or more after a release.
    manager = ConcurrencyManager(here, poll_interval=5.0)
    lease = there.try_acquire(ACCOUNT, "elsewhere")
    assert lease is not None
    with slot_waiter(manager) as entered:
        wait_until(lambda: stats_of(there).waiting == 1, "the waiter to queue")
        released_at = time.monotonic()
        there.release(lease)
        assert entered.wait(10)
        assert time.monotonic() - released_at < 1.0
    manager.shutdown()


def test_slot_deadline_leaves_the_queue_and_spends_no_create_budget(
    make_store: StoreFactory,
) -> None:
    store = make_store(Limits(1, 60))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    with manager.slot(ACCOUNT, time.time() + 5):
        with pytest.raises(DeadlineExceeded):
            with manager.slot(ACCOUNT, time.time() + 0.1):
                pytest.fail("entered a full account")
        with pytest.raises(DeadlineExceeded):
            with manager.slot(ACCOUNT, time.time() - 1):
                pytest.fail("entered after the deadline")
        assert stats_of(store) == AccountStats(ACCOUNT, 1, 0, 0, 0.0)
    assert store.reserve(ACCOUNT, "create") == 0  # the whole budget is still there
    manager.shutdown()


def test_slot_is_released_when_the_body_raises(make_store: StoreFactory) -> None:
    store = make_store(Limits(1, 60))
    manager = ConcurrencyManager(store)
    with pytest.raises(KeyError):
        with manager.slot(ACCOUNT, time.time() + 5):
            raise KeyError("boom")
    assert stats_of(store).in_flight == 0
    manager.shutdown()


def test_shutdown_releases_leases_and_refuses_new_work(make_store: StoreFactory) -> None:
    store = make_store(Limits(2, 60))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    occupancy, gate = Occupancy(), threading.Event()
    with pool_opening(1, gate) as pool:
        future = pool.submit(hold_slot, manager, occupancy, "holder", gate)
        wait_until(lambda: occupancy.inside == 1, "holder inside")
        manager.shutdown()
        assert stats_of(store).in_flight == 0
        gate.set()
        future.result(timeout=30)  # its own release after shutdown is harmless
    with pytest.raises(RuntimeError, match="shut down"):
        with manager.slot(ACCOUNT, time.time() + 5):
            pytest.fail("entered after shutdown")


# --------------------------------------------------------------------------
# Several processes on one store

WORKER = r"""
import sys, threading, time, random
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.limits.base import Limits
from replicate_generation.limits.sqlite import SQLiteLimitStore
from replicate_generation.limits.redis import RedisLimitStore

backend, target, prefix, out, mode, ttl = sys.argv[1:7]
if backend == "sqlite":
    store = SQLiteLimitStore(target, Limits(3, 1000), lease_ttl=float(ttl))
else:
    store = RedisLimitStore(target, Limits(3, 1000), lease_ttl=float(ttl), key_prefix=prefix)
manager = ConcurrencyManager(store, poll_interval=0.01)

if mode == "hammer":
    lock, intervals = threading.Lock(), []
    def run():
        for _ in range(12):
            with manager.slot("shared", time.time() + 30):
                entered = time.time()
                time.sleep(random.uniform(0.005, 0.02))
                left = time.time()
            with lock:
                intervals.append((entered, left))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manager.shutdown()
    with open(out, "w") as f:
        f.writelines(f"{a!r} {b!r}\n" for a, b in intervals)
else:
    all_in = threading.Barrier(4, timeout=20)
    def hold():
        with manager.slot("shared", time.time() + 20):
            all_in.wait()
            threading.Event().wait()
    for _ in range(3):
        threading.Thread(target=hold, daemon=True).start()
    all_in.wait()
    print("held", flush=True)
    threading.Event().wait()
"""


def spawn_worker(target: list[str], out: Path, mode: str, ttl: float) -> subprocess.Popen[str]:
    """Use as a context manager: that closes the pipe and reaps the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *target, str(out), mode, str(ttl)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE if mode == "hold" else None,
        text=True,
    )


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    # At equal times an exit sorts before an enter (False < True).
    events = sorted([(a, True) for a, _ in intervals] + [(b, False) for _, b in intervals])
    inside = peak = 0
    for _, is_enter in events:
        inside += 1 if is_enter else -1
        peak = max(peak, inside)
    return peak


def test_processes_sharing_one_store_never_exceed_the_limit(
        make_store: StoreFactory, tmp_path: Path) -> None:
    observer = make_store(Limits(3, 1000))  # with SQLite: the schema exists up front
    with ExitStack() as stack:
        workers = [
            stack.enter_context(spawn_worker(make_store.worker_target(),
                                             tmp_path / f"w{i}.log", "hammer", 5.0))
            for i in range(3)
        ]
        try:
            for worker in workers:
                assert worker.wait(timeout=60) == 0
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
    intervals = [
        (float(a), float(b))
        for i in range(3)
        for a, b in (line.split() for line in (tmp_path / f"w{i}.log").read_text().splitlines())
    ]
    assert len(intervals) == 3 * 2 * 12
    peak = max_overlap(intervals)
    assert 2 <= peak <= 3  # 6 contenders really contended, and never more than 3
    assert observer.stats("shared")[0].in_flight == 0


def test_sigkilled_holder_frees_its_slots_within_lease_ttl(
        make_store: StoreFactory, tmp_path: Path) -> None:
    ttl = 1.0
    store = make_store(Limits(3, 1000), lease_ttl=ttl)
    with spawn_worker(make_store.worker_target(), tmp_path / "unused", "hold", ttl) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            # Its heartbeat keeps the leases alive well past one ttl.
            time.sleep(1.5 * ttl)
            assert store.stats("shared")[0].in_flight == 3
            assert store.try_acquire("shared", "probe") is None
            store.leave_queue("probe")

            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            killed_at = time.time()
            manager = ConcurrencyManager(store, poll_interval=0.01)
            with manager.slot("shared", killed_at + 5 * ttl):
                waited = time.time() - killed_at
                assert store.stats("shared")[0].in_flight == 1  # the dead leases are gone
            assert waited <= ttl + 0.5
            manager.shutdown()
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()


# --------------------------------------------------------------------------
# Redis only: key layout, resent commands, outages and lost data


def shared_port_and_db() -> tuple[int, int]:
    parts = urlsplit(SHARED_REDIS_URL)
    return parts.port or 6379, int(parts.path.strip("/") or 0)


def keys_of(command: list[bytes]) -> list[bytes]:
    """The keys a recorded command touches (the commands the Redis store sends)."""
    name = command[0].upper()
    if name in (b"EVALSHA", b"EVAL"):
        return command[3:3 + int(command[2])]
    if name in (b"HGET", b"HDEL", b"DEL", b"ZRANGE"):
        return command[1:2] if name != b"DEL" else command[1:]
    return []


@contextmanager
def proxied_store(factory: StoreFactory, limits: Limits, **options: Any) -> Iterator[
        tuple[RedisLimitStore, RedisProxy]]:
    port, db = shared_port_and_db()
    proxy = RedisProxy(port)
    store = RedisLimitStore(proxy.url(db), limits, key_prefix=factory.prefix, **options)
    try:
        yield store, proxy
    finally:
        store.close()
        proxy.close()


def exercise_every_operation(store: RedisLimitStore) -> None:
    store.declare("me")
    store.set_overrides({"burst": 2})
    store.describe_limits()
    for account in (ACCOUNT, OTHER):
        lease = store.try_acquire(account, f"{account}-holder")
        assert lease is not None
        store.try_acquire(account, f"{account}-waiter")
        store.renew([lease], [f"{account}-waiter"])
        store.reserve(account, "create")
        store.reserve(account, "poll")
        store.back_off(account, 1)
        store.create_accepted(account)
        store.last_cut(account)
        store.backoff_remaining(account)
        store.stats(account)
        store.release(lease)
        store.leave_queue(f"{account}-waiter")
    store.stats()
    store.clear_overrides()
    store.withdraw("me")
    store.check()


def test_redis_try_acquire_run_twice_returns_the_same_lease(
        redis_factory: StoreFactory) -> None:
    store = redis_factory(Limits(2, 60), clock=FakeClock())
    lease = store.try_acquire(ACCOUNT, "t1")
    assert lease is not None and lease.startswith(f"{ACCOUNT}|")  # renew finds the account
    assert store.try_acquire(ACCOUNT, "t1") == lease  # a resent command takes no second slot
    assert stats_of(store) == AccountStats(ACCOUNT, 1, 0, 0, 0.0)


def test_every_redis_call_touches_one_slot(redis_factory: StoreFactory) -> None:
    with proxied_store(redis_factory, Limits(1, 60)) as (store, proxy):
        exercise_every_operation(store)
        keyed = [keys_of(command) for command in proxy.commands if keys_of(command)]
    assert len(keyed) > 30
    tags = {f"{{{name}}}".encode() for name in (ACCOUNT, OTHER, "limits")}
    for keys in keyed:
        assert len({key_slot(key) for key in keys}) == 1, keys  # Redis Cluster: one slot
        assert len({key.split(b":")[1] for key in keys}) == 1, keys
        for key in keys:
            assert key.startswith(f"{redis_factory.prefix}:".encode())
            assert key.split(b":")[1] in tags, key
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    stored = list(client.scan_iter(match=f"{redis_factory.prefix}:*"))
    client.close()
    assert stored and all(key.split(b":")[1] in tags for key in stored)


def script_on(first_key: bytes, key_count: int) -> Callable[[list[bytes]], bool]:
    """Picks the EVALSHA of one script, by its documented keys."""
    def picks(command: list[bytes]) -> bool:
        return command[0].upper() == b"EVALSHA" and int(command[2]) == key_count and \
            command[3].endswith(first_key)
    return picks


def test_a_call_resent_after_its_reply_was_lost_counts_once(
        redis_factory: StoreFactory) -> None:
    clock = FakeClock()
    with proxied_store(redis_factory, Limits(2, 60), clock=clock) as (store, proxy):
        exercise_every_operation(store)  # every script loaded: no NOSCRIPT round trip below

        assert store.try_acquire(THIRD, "t0") is not None
        proxy.drop_reply_to(script_on(b"}:leases", 6))
        lease = store.try_acquire(THIRD, "t1")  # the last slot: a rerun that re-granted would fail
        sent = [c for c in proxy.commands if script_on(b"}:leases", 6)(c) and b"t1" in c]
        assert len(sent) == 2  # the script really ran twice
        assert lease is not None
        assert (stats_of(store, THIRD).in_flight, stats_of(store, THIRD).waiting) == (2, 0)

        proxy.drop_reply_to(script_on(b"}:rate", 3))
        assert store.reserve(THIRD, "poll") == 0
        assert store.reserve(THIRD, "poll") == pytest.approx(60 / 2400)  # one token, not two

        store.back_off(THIRD, 1)  # learned rate 36/min
        clock.advance(10)
        proxy.drop_reply_to(script_on(b"}:rate", 2))
        store.create_accepted(THIRD)  # +1% once: 36.36, not 36.7236
        first = store.reserve(THIRD, "create")
        assert store.reserve(THIRD, "create") - first == pytest.approx(60 / 36.36)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", password="s3cret-pw") as server:
        yield server


def test_holders_re_register_after_redis_lost_its_data(private_redis: RedisServer) -> None:
    clock = FakeClock()
    store = RedisLimitStore(private_redis.url, Limits(2, 60), lease_ttl=10, clock=clock)
    kept = store.try_acquire(ACCOUNT, "kept")
    assert kept is not None and store.try_acquire(ACCOUNT, "second") is not None
    assert store.try_acquire(ACCOUNT, "waiter") is None
    private_redis.restart()  # SIGKILL, no persistence: everything is gone

    assert store.stats() == [] and stats_of(store).in_flight == 0
    assert store.try_acquire(ACCOUNT, "newcomer") is not None  # nobody re-registered yet
    store.renew([kept], ["waiter"])  # the holder's (and waiter's) next heartbeat
    assert stats_of(store) == AccountStats(ACCOUNT, 2, 0, 0, 0.0)
    assert store.try_acquire(ACCOUNT, "waiter") is None  # its next poll re-enqueues it
    assert store.try_acquire(ACCOUNT, "late") is None  # the limit holds again
    assert stats_of(store).waiting == 2
    assert [stats.account for stats in store.stats()] == [ACCOUNT]
    store.close()


def test_manager_re_registers_its_leases_after_redis_lost_its_data(
        private_redis: RedisServer) -> None:
    store = RedisLimitStore(private_redis.url, Limits(2, 600), lease_ttl=5, socket_timeout=0.5)
    manager = ConcurrencyManager(store, poll_interval=0.01, heartbeat_interval=0.05)
    occupancy, gate = Occupancy(), threading.Event()
    with pool_opening(2, gate) as pool:
        futures = [pool.submit(hold_slot, manager, occupancy, f"h{i}", gate) for i in range(2)]
        wait_until(lambda: occupancy.inside == 2, "holders inside")
        private_redis.restart()
        wait_until(lambda: stats_of(store).in_flight == 2, "holders to re-register")
        assert store.try_acquire(ACCOUNT, "probe") is None
        store.leave_queue("probe")
        gate.set()
        for future in futures:
            future.result(timeout=30)
    assert stats_of(store).in_flight == 0
    manager.shutdown()
    store.close()


def test_a_down_redis_raises_store_unavailable_without_credentials(
        private_redis: RedisServer) -> None:
    store = RedisLimitStore(private_redis.url, Limits(1, 60), socket_timeout=0.5)
    store.check()
    private_redis.kill()
    calls: list[Callable[[], object]] = [
        store.check, store.get_limits, store.describe_limits, store.clear_overrides,
        partial(store.set_overrides, {"burst": 2}), partial(store.declare, "me"),
        partial(store.withdraw, "me"), partial(store.try_acquire, ACCOUNT, "t"),
        partial(store.renew, [f"{ACCOUNT}|x"], ["t"]), partial(store.release, f"{ACCOUNT}|x"),
        partial(store.leave_queue, "t"), partial(store.reserve, ACCOUNT, "create"),
        partial(store.back_off, ACCOUNT, 1), partial(store.create_accepted, ACCOUNT),
        partial(store.last_cut, ACCOUNT), partial(store.backoff_remaining, ACCOUNT),
        store.stats, partial(store.stats, ACCOUNT),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert caught.value.dependency == "redis"
        message = str(caught.value)
        assert "s3cret-pw" not in message and str(private_redis.port) not in message, message
    store.close()


def test_wrong_password_bad_url_and_a_paused_server(private_redis: RedisServer) -> None:
    wrong = RedisLimitStore(private_redis.url.replace("s3cret-pw", "guess"), Limits(1, 60))
    with pytest.raises(StoreUnavailable, match="authentication failed"):
        wrong.check()
    with pytest.raises(ValueError, match="not a valid") as caught:
        RedisLimitStore("http://:s3cret-pw@127.0.0.1/0", Limits(1, 60))
    assert "s3cret-pw" not in str(caught.value)
    RedisLimitStore("rediss://:pw@127.0.0.1:1/0", Limits(1, 60)).close()  # TLS URLs as written

    paused = RedisLimitStore(private_redis.url, Limits(1, 60), socket_timeout=0.2)
    paused.check()
    private_redis.pause()
    try:
        with pytest.raises(StoreUnavailable, match="timed out"):
            paused.try_acquire(ACCOUNT, "t")
    finally:
        private_redis.resume()
    paused.check()
    paused.close()
    wrong.close()


def test_a_read_only_replica_is_unavailable_not_an_error(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "primary") as primary, \
            RedisServer(tmp_path / "replica",
                        options=["--replicaof", "127.0.0.1", str(primary.port)]) as replica:
        store = RedisLimitStore(replica.url, Limits(1, 60))
        store.check()  # it answers, but writes are refused
        with pytest.raises(StoreUnavailable, match="read-only replica"):
            store.try_acquire(ACCOUNT, "t")
        store.close()


def test_waiters_wait_through_a_redis_outage_and_enter_when_it_is_back(
        private_redis: RedisServer) -> None:
    store = Watched(RedisLimitStore(private_redis.url, Limits(1, 600), socket_timeout=0.5))
    manager = ConcurrencyManager(store, poll_interval=0.01)  # type: ignore[arg-type]
    private_redis.kill()
    with slot_waiter(manager) as entered:
        wait_until(lambda: store.unavailable >= 3, "the waiter to retry through the outage")
        assert not entered.is_set()
        private_redis.start()
    assert entered.is_set()
    manager.shutdown()
    store.close()


def test_a_deadline_during_a_redis_outage_raises_store_unavailable(
        private_redis: RedisServer) -> None:
    store = RedisLimitStore(private_redis.url, Limits(1, 600), socket_timeout=0.5)
    manager = ConcurrencyManager(store, poll_interval=0.01)
    private_redis.kill()
    with pytest.raises(StoreUnavailable):
        with manager.slot(ACCOUNT, time.time() + 0.3):
            pytest.fail("entered while the store was down")
    with pytest.raises(StoreUnavailable):
        manager.wait_for_create(ACCOUNT, time.time() + 0.3)
    private_redis.start()
    manager.wait_for_create(ACCOUNT, time.time() + 5)
    assert stats_of(store).creates_last_minute == 1  # the failed attempts spent nothing
    manager.shutdown()
    store.close()
