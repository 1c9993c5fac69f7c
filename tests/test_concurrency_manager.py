"""Tests for concurrency_manager: GCRA maths, leases, FIFO, cross-thread and
cross-process limits. Fake clocks wherever time is arithmetic; threads
synchronise on events, never on sleeps-and-hope."""

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import pytest

from replicate_generation.concurrency_manager import (
    AccountStats,
    ConcurrencyManager,
    DeadlineExceeded,
    Limits,
    SQLiteLimitStore,
)

ACCOUNT = "acct-hash-1"
OTHER = "acct-hash-2"
REPO_ROOT = Path(__file__).resolve().parents[1]


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


def make_store(
    tmp_path: Path,
    limits: Limits,
    *,
    clock: Callable[[], float] = time.time,
    lease_ttl: float = 30.0,
    name: str = "limits.sqlite3",
) -> SQLiteLimitStore:
    return SQLiteLimitStore(tmp_path / name, limits, lease_ttl=lease_ttl, clock=clock)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition the test is waiting for; fail loudly instead of hanging."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def queue_length_is(store: SQLiteLimitStore, waiting: int) -> bool:
    return stats_of(store).waiting == waiting


def stats_of(store: SQLiteLimitStore, account: str = ACCOUNT) -> AccountStats:
    return store.stats(account)[0]


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


class CountingStore(SQLiteLimitStore):
    """Counts refused try_acquire calls, so a test can wait until every
    waiter has re-checked several times instead of sleeping."""

    def __init__(self, path: Path, limits: Limits) -> None:
        super().__init__(path, limits)
        self._count_lock = threading.Lock()
        self.refused = 0

    def try_acquire(self, account: str, ticket: str) -> str | None:
        lease = super().try_acquire(account, ticket)
        if lease is None:
            with self._count_lock:
                self.refused += 1
        return lease


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


def test_limits_defaults_are_valid() -> None:
    Limits(max_concurrent=5, requests_per_minute=600).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent", 0),
        ("max_concurrent", 10_001),
        ("requests_per_minute", 0),
        ("requests_per_minute", 100_001),
        ("burst", 0),
        ("burst", 1_001),
        ("polls_per_minute", 0),
        ("polls_per_minute", -5),
        ("max_concurrent", True),
        ("requests_per_minute", 1.5),
        ("burst", "3"),
    ],
)
def test_limits_validate_names_the_field(field: str, value: object) -> None:
    values: dict[str, object] = {"max_concurrent": 2, "requests_per_minute": 60}
    values[field] = value
    with pytest.raises(ValueError, match=field):
        Limits(**values).validate()  # type: ignore[arg-type]


def test_store_rejects_invalid_defaults_and_memory_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        make_store(tmp_path, Limits(0, 60))
    with pytest.raises(ValueError, match="file path"):
        SQLiteLimitStore(":memory:", Limits(1, 60))


def test_set_limits_persists_and_is_seen_by_other_instances(tmp_path: Path) -> None:
    first = make_store(tmp_path, Limits(3, 60))
    second = make_store(tmp_path, Limits(5, 100))
    # No override yet: each instance applies its own defaults.
    assert first.get_limits() == Limits(3, 60)
    assert second.get_limits() == Limits(5, 100)

    override = Limits(1, 30, burst=2, polls_per_minute=1000)
    first.set_limits(override)
    assert second.get_limits() == override  # seen at once, no cache
    assert second.try_acquire(ACCOUNT, "t1") is not None
    assert second.try_acquire(ACCOUNT, "t2") is None  # the override's limit of 1

    restarted = make_store(tmp_path, Limits(9, 900))
    assert restarted.get_limits() == override  # survives a restart


def test_configure_validates_before_storing(tmp_path: Path) -> None:
    store = make_store(tmp_path, Limits(3, 60))
    manager = ConcurrencyManager(store)
    with pytest.raises(ValueError, match="requests_per_minute"):
        manager.configure(Limits(3, 0))
    assert manager.limits() == Limits(3, 60)
    manager.configure(Limits(4, 120))
    assert manager.limits() == Limits(4, 120)


# --------------------------------------------------------------------------
# Rate: GCRA


def test_gcra_burst_then_steady_pace(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60, burst=3), clock=clock)  # T = 1 s
    assert [store.reserve(ACCOUNT, "create") for _ in range(6)] == [0, 0, 0, 1, 2, 3]
    # Accounts and kinds are independent buckets.
    assert store.reserve(OTHER, "create") == 0
    assert store.reserve(ACCOUNT, "poll") == 0

    # Once the queue has drained and the account idled, the burst is back.
    clock.advance(20)
    assert [store.reserve(ACCOUNT, "create") for _ in range(4)] == [0, 0, 0, 1]


def test_gcra_poll_kind_uses_polls_per_minute(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 6, polls_per_minute=120), clock=clock)
    assert [store.reserve(ACCOUNT, "poll") for _ in range(3)] == [0, 0.5, 1.0]
    with pytest.raises(ValueError, match="kind"):
        store.reserve(ACCOUNT, "delete")  # type: ignore[arg-type]


def test_gcra_any_60s_window_holds_at_most_rpm_plus_burst(tmp_path: Path) -> None:
    rpm, burst = 30, 5
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, rpm, burst=burst), clock=clock)
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


def test_reserve_past_max_wait_spends_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
    assert store.reserve(ACCOUNT, "create") == 0
    assert store.reserve(ACCOUNT, "create", max_wait=0.5) == 1.0  # refused
    assert store.reserve(ACCOUNT, "create") == 1.0  # not 2.0: nothing was spent
    assert stats_of(store).creates_last_minute == 1  # the refused one is not logged


def test_back_off_pushes_reservations(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60, burst=3), clock=clock)
    store.back_off(ACCOUNT, 30)
    assert store.backoff_remaining(ACCOUNT) == 30
    store.back_off(ACCOUNT, 5)  # a shorter back-off never shortens the current one
    assert store.backoff_remaining(ACCOUNT) == 30
    assert store.backoff_remaining(OTHER) == 0

    # Creates (and polls) start after the back-off, then at the learned pace (70% of 60/min,
    # one at a time) until accepted creates raise it again.
    step = 60 / 42
    assert [store.reserve(ACCOUNT, "create") for _ in range(3)] == \
        pytest.approx([30, 30 + step, 30 + 2 * step])
    assert store.reserve(ACCOUNT, "poll") == 30
    assert store.reserve(OTHER, "create") == 0

    clock.advance(40)
    assert store.backoff_remaining(ACCOUNT) == 0


def test_a_429_cuts_the_create_rate_once_per_episode(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 600, burst=10), clock=clock)
    for _ in range(5):  # five creates throttled at once are one episode: one cut
        store.back_off(ACCOUNT, 2)
    clock.advance(2)
    assert [store.reserve(ACCOUNT, "create") for _ in range(3)] == \
        pytest.approx([0, 60 / 420, 120 / 420])  # no burst while learning
    clock.advance(5)
    store.back_off(ACCOUNT, 2)  # a later 429 is a new episode: 420 * 0.7
    clock.advance(10)
    first = store.reserve(ACCOUNT, "create")
    assert store.reserve(ACCOUNT, "create") - first == pytest.approx(60 / 294)


def test_accepted_creates_raise_the_learned_rate_back_to_the_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 100, burst=4), clock=clock)
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
    # +1% per accepted create from 70/min: about 36 creates to regain the limit.
    assert 30 <= accepted <= 40
    store.create_accepted(OTHER)  # an account never throttled learns nothing
    assert store.reserve(OTHER, "create") == 0 and store.reserve(OTHER, "create") == 0


def test_back_off_rejects_nonsense_and_caps_huge_values(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
    with pytest.raises(ValueError, match="back-off"):
        store.back_off(ACCOUNT, -1)
    with pytest.raises(ValueError, match="back-off"):
        store.back_off(ACCOUNT, math.nan)
    store.back_off(ACCOUNT, math.inf)
    assert store.backoff_remaining(ACCOUNT) == 3600


def test_wait_for_create_sleeps_the_computed_time(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60, burst=2), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        manager.wait_for_create(ACCOUNT, clock() + 100)
    assert clock.sleeps == [1.0]
    assert stats_of(store).creates_last_minute == 3


def test_wait_for_create_deadline_spends_no_token(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    manager.wait_for_create(ACCOUNT, clock() + 10)
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_create(ACCOUNT, clock() + 0.5)  # would need 1.0 s
    assert clock.sleeps == []  # it did not even start waiting
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_poll(ACCOUNT, clock() - 1)  # deadline already passed
    manager.wait_for_create(ACCOUNT, clock() + 10)
    assert clock.sleeps == [1.0]  # not 2.0: the refused attempt spent nothing


def test_wait_for_create_waits_out_shared_back_off(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep)
    other_process = ConcurrencyManager(make_store(tmp_path, Limits(1, 60), clock=clock))
    other_process.throttled(ACCOUNT, 12)
    manager.wait_for_create(ACCOUNT, clock() + 60)
    manager.wait_for_poll(ACCOUNT, clock() + 60)
    assert clock.sleeps == [12.0]
    other_process.throttled(ACCOUNT, 30)
    with pytest.raises(DeadlineExceeded):
        manager.wait_for_create(ACCOUNT, clock() + 10)
    assert clock.sleeps == [12.0]


def test_back_off_that_starts_during_the_sleep_re_reserves(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
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


def test_a_token_reserved_before_a_rate_cut_is_taken_again_at_the_new_pace(
        tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock)
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
    # The second token was re-taken after the cut, so the third is spaced for 42/min, not 60.
    assert clock.sleeps == pytest.approx([1.0, 60 / 42])


# --------------------------------------------------------------------------
# Leases and tickets on the store (fake clock)


def test_lease_expires_when_holder_stops_renewing(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock, lease_ttl=10)
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


def test_abandoned_ticket_expires_and_stops_blocking_the_queue(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60), clock=clock, lease_ttl=10)
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    assert store.try_acquire(ACCOUNT, "dead-waiter") is None
    assert store.try_acquire(ACCOUNT, "live-waiter") is None
    clock.advance(6)
    store.renew([lease], ["live-waiter"])
    clock.advance(6)  # dead-waiter's ticket has expired
    store.release(lease)
    assert store.try_acquire(ACCOUNT, "live-waiter") is not None


def test_fifo_order_of_tickets(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(2, 60), clock=clock)
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


def test_stats_report_every_active_account(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, Limits(1, 60, burst=3), clock=clock)
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


# --------------------------------------------------------------------------
# ConcurrencyManager with threads


def test_threads_contending_never_exceed_the_limit(tmp_path: Path) -> None:
    k, n = 3, 10
    store = make_store(tmp_path, Limits(k, 600))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    occupancy, gate = Occupancy(), threading.Event()
    with pool_opening(n, gate) as pool:
        futures = [pool.submit(hold_slot, manager, occupancy, f"w{i}", gate) for i in range(n)]
        wait_until(lambda: stats_of(store).waiting == n - k, "all others to queue")
        assert occupancy.inside == k
        assert stats_of(store).in_flight == k
        gate.set()
        for future in futures:
            future.result(timeout=30)
    assert occupancy.peak == k
    assert occupancy.entered == n  # everyone eventually got in
    assert stats_of(store) == AccountStats(ACCOUNT, 0, 0, 0, 0.0)
    manager.shutdown()


def test_lowering_the_limit_admits_nobody_until_below_it(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "limits.sqlite3", Limits(4, 600))
    manager = ConcurrencyManager(store, poll_interval=0.005)
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


def test_waiters_enter_in_fifo_order(tmp_path: Path) -> None:
    store = make_store(tmp_path, Limits(1, 600))
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


def test_slot_deadline_leaves_the_queue_and_spends_no_create_budget(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path, Limits(1, 60))
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


def test_slot_is_released_when_the_body_raises(tmp_path: Path) -> None:
    store = make_store(tmp_path, Limits(1, 60))
    manager = ConcurrencyManager(store)
    with pytest.raises(KeyError):
        with manager.slot(ACCOUNT, time.time() + 5):
            raise KeyError("boom")
    assert stats_of(store).in_flight == 0
    manager.shutdown()


def test_shutdown_releases_leases_and_refuses_new_work(tmp_path: Path) -> None:
    store = make_store(tmp_path, Limits(2, 60))
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
# Several processes on one SQLite file

WORKER = r"""
import os, sys, threading, time, random
from replicate_generation.concurrency_manager import ConcurrencyManager, Limits, SQLiteLimitStore

db, out, mode, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if mode == "open":
    while not os.path.exists(out):  # start together, as gunicorn workers do
        time.sleep(0.001)
if mode != "open":
    store = SQLiteLimitStore(db, Limits(3, 1000), lease_ttl=ttl)
    manager = ConcurrencyManager(store, poll_interval=0.01)

if mode == "open":
    # Every worker walks the same series of brand-new files, so they keep
    # racing on schema creation and the switch to WAL.
    for k in range(60):
        SQLiteLimitStore(f"{db}.{k}", Limits(3, 1000)).try_acquire("shared", str(k))
elif mode == "hammer":
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


def spawn_worker(db: Path, out: Path, mode: str, ttl: float) -> subprocess.Popen[str]:
    """Use as a context manager: that closes the pipe and reaps the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(db), str(out), mode, str(ttl)],
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


def test_processes_sharing_one_file_never_exceed_the_limit(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    SQLiteLimitStore(db, Limits(3, 1000))  # create the schema once up front
    with ExitStack() as stack:
        workers = [
            stack.enter_context(spawn_worker(db, tmp_path / f"w{i}.log", "hammer", 5.0))
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
    assert SQLiteLimitStore(db, Limits(3, 1000)).stats("shared")[0].in_flight == 0


def test_store_waits_for_a_locked_new_file_instead_of_failing(tmp_path: Path) -> None:
    # On a file not yet in WAL mode, switching to WAL while another connection
    # holds the write lock fails at once (SQLite skips the busy handler there).
    db = tmp_path / "limits.sqlite3"
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE other_module (x)")
        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = pool.submit(SQLiteLimitStore, db, Limits(1, 60))
            # Without the retry the constructor has already failed by now;
            # with it, it is still waiting for the lock.
            time.sleep(0.2)
            assert not opening.done() or opening.exception() is None
            other.execute("COMMIT")
            store = opening.result(timeout=30)
    finally:
        other.close()
    assert store.try_acquire(ACCOUNT, "t") is not None


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    db, go = tmp_path / "fresh" / "limits.sqlite3", tmp_path / "go"
    with ExitStack() as stack:
        workers = [stack.enter_context(spawn_worker(db, go, "open", 5.0)) for _ in range(8)]
        go.touch()
        assert [worker.wait(timeout=60) for worker in workers] == [0] * 8
    for k in range(60):
        assert SQLiteLimitStore(f"{db}.{k}", Limits(3, 1000)).stats("shared")[0].in_flight == 3


def test_sigkilled_holder_frees_its_slots_within_lease_ttl(tmp_path: Path) -> None:
    ttl = 1.0
    db = tmp_path / "shared.sqlite3"
    store = SQLiteLimitStore(db, Limits(3, 1000), lease_ttl=ttl)
    with spawn_worker(db, tmp_path / "unused", "hold", ttl) as holder:
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
