"""Tests for concurrency_manager: Limits, what only the SQLite store does (file locking, new-file
races), and how the manager behaves while its store is unavailable.

Everything both stores must do alike (GCRA, leases, FIFO, threads, processes) is in
test_limit_store_contract.py, run on SQLite and on Redis. Fake clocks wherever time is
arithmetic; threads synchronise on events, never on sleeps-and-hope.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.errors import StoreUnavailable
from replicate_generation.limits.base import Limits, Turn
from replicate_generation.limits.sqlite import SQLiteLimitStore
from test_limit_store_contract import FakeClock, slot_waiter, wait_until

ACCOUNT = "acct-hash-1"
REPO_ROOT = Path(__file__).resolve().parents[1]
MANAGER_LOG = "replicate_generation.concurrency_manager"


class Switchable:
    """A real store behind a switch: while ``down`` is set every call raises StoreUnavailable,
    as a store whose server went away. Counts calls per method."""

    def __init__(self, inner: SQLiteLimitStore) -> None:
        self.inner = inner
        self.down = threading.Event()
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                if self.down.is_set():
                    self.failures += 1
                    raise StoreUnavailable("sqlite", "switched off by the test")
            return attr(*args, **kwargs)

        return call


def sqlite_store(tmp_path: Path, limits: Limits, **options: Any) -> SQLiteLimitStore:
    return SQLiteLimitStore(tmp_path / "limits.sqlite3", limits, **options)


def outage_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == MANAGER_LOG and "limit store" in r.getMessage()]


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


# --------------------------------------------------------------------------
# SQLite only: the file


def test_sqlite_store_rejects_a_memory_path() -> None:
    with pytest.raises(ValueError, match="file path"):
        SQLiteLimitStore(":memory:", Limits(1, 60))


def test_sqlite_check_reads_the_file_and_close_is_harmless(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path, Limits(1, 60))
    store.check()
    store.close()
    store.check()  # per-thread connections: nothing was taken away


OPENER = r"""
import os, sys, time
from replicate_generation.limits.base import Limits, Turn
from replicate_generation.limits.sqlite import SQLiteLimitStore

db, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):  # start together, as gunicorn workers do
    time.sleep(0.001)
# Every worker walks the same series of brand-new files, so they keep racing on schema creation
# and the switch to WAL.
for k in range(60):
    SQLiteLimitStore(f"{db}.{k}", Limits(3, 1000)).try_acquire("shared", str(k))
"""


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
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with ExitStack() as stack:
        workers = [
            stack.enter_context(subprocess.Popen(
                [sys.executable, "-c", OPENER, str(db), str(go)], cwd=REPO_ROOT, env=env))
            for _ in range(8)
        ]
        go.touch()
        assert [worker.wait(timeout=60) for worker in workers] == [0] * 8
    for k in range(60):
        assert SQLiteLimitStore(f"{db}.{k}", Limits(3, 1000)).stats("shared")[0].in_flight == 3


def test_a_slot_freed_early_lets_the_next_in_while_its_block_still_runs(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path, Limits(1, 600))
    manager = ConcurrencyManager(store, poll_interval=0.01)
    capped = Turn(caller="key-a", cap=1)
    with manager.slot(ACCOUNT, time.time() + 30, capped) as free:
        with slot_waiter(manager) as entered:
            assert not entered.wait(0.2)  # the account's one slot is held
            free()  # its prediction ended: the slot goes before the block's last writes
            assert entered.wait(10)
        free()  # freeing again, and leaving the block, release nothing twice
        # The caller's own slot went too: the same caller gets in at once.
        with manager.slot(ACCOUNT, time.time() + 1, capped):
            assert store.stats(ACCOUNT)[0].in_flight == 1
    assert store.stats(ACCOUNT)[0].in_flight == 0
    manager.shutdown()


# --------------------------------------------------------------------------
# The manager while its store is unavailable


def test_a_waiter_keeps_waiting_through_an_outage_and_enters_after(tmp_path: Path) -> None:
    store = Switchable(sqlite_store(tmp_path, Limits(1, 600)))
    manager = ConcurrencyManager(store, poll_interval=0.01)  # type: ignore[arg-type]
    store.down.set()
    with slot_waiter(manager) as entered:
        wait_until(lambda: store.failures >= 5, "the waiter to retry through the outage")
        assert not entered.is_set()
        store.down.clear()
    assert entered.is_set()
    assert store.inner.stats(ACCOUNT)[0].in_flight == 0
    manager.shutdown()


def test_a_local_release_during_an_outage_does_not_cut_the_pauses_short(
        tmp_path: Path) -> None:
    # Room for both: the holder's failed release leaves its lease to expire after the ttl.
    store = Switchable(sqlite_store(tmp_path, Limits(2, 600)))
    manager = ConcurrencyManager(store, poll_interval=0.01)  # type: ignore[arg-type]
    holder_go, entered = threading.Event(), threading.Event()

    def hold() -> None:
        with manager.slot(ACCOUNT, time.time() + 30):
            entered.set()
            assert holder_go.wait(30)

    def wait_for_a_slot() -> None:
        with manager.slot(ACCOUNT, time.time() + 30):
            pass

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(hold)
        assert entered.wait(10)
        store.down.set()
        waiter = pool.submit(wait_for_a_slot)
        wait_until(lambda: store.failures >= 3, "the waiter to hit the outage")
        holder_go.set()  # its release fails, but wakes local waiters
        holder.result(timeout=10)
        mark = store.failures
        time.sleep(0.5)  # a rate over a fixed window: pauses of ~0.1-1 s, not a busy loop
        assert store.failures - mark <= 10
        store.down.clear()
        waiter.result(timeout=10)
    manager.shutdown()


def test_a_deadline_in_an_outage_raises_store_unavailable(tmp_path: Path) -> None:
    store = Switchable(sqlite_store(tmp_path, Limits(1, 600)))
    manager = ConcurrencyManager(store, poll_interval=0.01)  # type: ignore[arg-type]
    store.down.set()
    with pytest.raises(StoreUnavailable):  # not DeadlineExceeded: the HTTP layer answers 503
        with manager.slot(ACCOUNT, time.time() + 0.2):
            pytest.fail("entered while the store was down")
    manager.shutdown()


def test_token_waits_retry_with_capped_growing_pauses_then_raise(tmp_path: Path) -> None:
    clock = FakeClock()
    store = Switchable(sqlite_store(tmp_path, Limits(1, 60), clock=clock))
    manager = ConcurrencyManager(store, clock=clock, sleep=clock.sleep,  # type: ignore[arg-type]
                                 poll_interval=0.05)
    store.down.set()
    start = clock.now
    with pytest.raises(StoreUnavailable):
        manager.wait_for_create(ACCOUNT, start + 10)
    assert clock.now == pytest.approx(start + 10)  # kept trying until the deadline
    assert 10 <= len(clock.sleeps) <= 30 and max(clock.sleeps) <= 1.0
    assert clock.sleeps[0] < clock.sleeps[-2]  # the pause grew
    with pytest.raises(StoreUnavailable):
        manager.wait_for_poll(ACCOUNT, clock.now + 1)

    store.down.clear()
    manager.wait_for_create(ACCOUNT, clock.now + 10)
    assert store.inner.stats(ACCOUNT)[0].creates_last_minute == 1  # failures spent nothing
    manager.shutdown()


def test_a_token_wait_that_outlives_an_outage_gets_its_token(tmp_path: Path) -> None:
    clock = FakeClock()
    store = Switchable(sqlite_store(tmp_path, Limits(1, 60), clock=clock))

    def sleep_while_the_store_comes_back(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now - start >= 3:
            store.down.clear()

    manager = ConcurrencyManager(store, clock=clock,  # type: ignore[arg-type]
                                 sleep=sleep_while_the_store_comes_back)
    start = clock.now
    store.down.set()
    manager.wait_for_create(ACCOUNT, start + 60)
    assert 3 <= clock.now - start <= 4.5
    assert store.inner.stats(ACCOUNT)[0].creates_last_minute == 1
    manager.shutdown()


def test_an_outage_is_logged_once_and_leases_renew_as_soon_as_it_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=MANAGER_LOG)
    store = Switchable(sqlite_store(tmp_path, Limits(2, 600)))
    # A long heartbeat: a renew within seconds can only come from the wake-up.
    manager = ConcurrencyManager(store, poll_interval=0.01,  # type: ignore[arg-type]
                                 heartbeat_interval=60)
    with manager.slot(ACCOUNT, time.time() + 5):
        store.down.set()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                manager.wait_for_poll(ACCOUNT, time.time() + 0.05)
        assert len(outage_records(caplog)) == 1
        renewed = store.calls["renew"]
        store.down.clear()
        manager.wait_for_poll(ACCOUNT, time.time() + 5)
        wait_until(lambda: store.calls["renew"] > renewed, "the leases to be renewed", 5)
    messages = outage_records(caplog)
    assert len(messages) == 2 and "reachable again" in messages[1]
    manager.shutdown()


def test_the_heartbeat_beats_through_an_outage_and_logs_it_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=MANAGER_LOG)
    store = Switchable(sqlite_store(tmp_path, Limits(2, 600)))
    manager = ConcurrencyManager(store, poll_interval=0.01,  # type: ignore[arg-type]
                                 heartbeat_interval=0.01)
    with manager.slot(ACCOUNT, time.time() + 5):
        store.down.set()
        mark = store.failures
        wait_until(lambda: store.failures >= mark + 10, "beats during the outage")
        store.down.clear()
        renewed = store.calls["renew"]
        wait_until(lambda: store.calls["renew"] > renewed + 2, "beats after the outage")
        assert store.inner.stats(ACCOUNT)[0].in_flight == 1
    assert len([m for m in outage_records(caplog) if "unavailable" in m]) == 1
    manager.shutdown()


def test_a_manager_opens_while_its_store_is_down_and_declares_once_it_is_back(
        tmp_path: Path) -> None:
    store = Switchable(sqlite_store(tmp_path, Limits(2, 600)))
    store.down.set()
    manager = ConcurrencyManager(store, heartbeat_interval=0.01)  # type: ignore[arg-type]
    manager.throttled(ACCOUNT, 5)  # neither raises: the create stands, the store is down
    manager.create_accepted(ACCOUNT)
    observer = sqlite_store(tmp_path, Limits(9, 900))
    assert observer.describe_limits()["max_concurrent"].declarations == 0
    store.down.clear()
    wait_until(lambda: observer.describe_limits()["max_concurrent"].declarations == 1,
               "the heartbeat to declare")
    assert observer.get_limits() == Limits(2, 600)
    manager.shutdown()
