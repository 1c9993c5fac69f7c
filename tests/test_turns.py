"""The order waiters of one account enter in, alike on SQLite and Redis (issue #21, part 2):
interactive work first, then callers by start-time fair queueing weighted by their weight, then
arrival; an idle caller gets no credit for the time it did not ask."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.limits.base import Limits, LimitStore, Turn
from test_limit_store_contract import ACCOUNT, FakeClock, StoreFactory, shared_redis_or_skip

BATCH = Turn(interactive=False, caller="batcher")


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LimitStore]:
    if request.param == "redis":
        shared_redis_or_skip()
    factory = StoreFactory(request.param, tmp_path)
    yield factory(Limits(1, 6000), clock=FakeClock())
    factory.close()


def queue(store: LimitStore, tickets: list[tuple[str, Turn]]) -> str:
    """Take the one slot with a first ticket, then line the others up behind it (refused)."""
    lease = store.try_acquire(ACCOUNT, "holder")
    assert lease is not None
    for ticket, turn in tickets:
        assert store.try_acquire(ACCOUNT, ticket, turn) is None
    return lease


def entry_order(store: LimitStore, lease: str,
                tickets: list[tuple[str, Turn]]) -> tuple[list[str], str]:
    """Release the slot again and again; each time, the one waiter let in is the next entered.
    Returns the order and the lease the last one holds."""
    entered: list[str] = []
    waiting = dict(tickets)
    while waiting:
        store.release(lease)
        granted = [(ticket, store.try_acquire(ACCOUNT, ticket, turn))
                   for ticket, turn in list(waiting.items())]
        [(ticket, new_lease)] = [(t, g) for t, g in granted if g is not None]
        entered.append(ticket)
        del waiting[ticket]
        lease = str(new_lease)
    return entered, lease


def test_interactive_work_enters_before_batch_work_that_waited_longer(
        store: LimitStore) -> None:
    tickets = [("b1", BATCH), ("b2", BATCH), ("i1", Turn(caller="svc")), ("b3", BATCH),
               ("i2", Turn(caller="svc"))]
    lease = queue(store, tickets)
    assert store.try_acquire_ranked(ACCOUNT, "i1", Turn(caller="svc")) == (None, 1)
    assert store.try_acquire_ranked(ACCOUNT, "b1", BATCH) == (None, 3)
    assert entry_order(store, lease, tickets)[0] == ["i1", "i2", "b1", "b2", "b3"]


def test_callers_share_by_weight_whatever_order_they_queued_in(store: LimitStore) -> None:
    heavy, light = Turn(False, "heavy", 3.0), Turn(False, "light", 1.0)
    tickets = [(f"l{i}", light) for i in range(3)] + [(f"h{i}", heavy) for i in range(9)]
    order = entry_order(store, queue(store, tickets), tickets)[0]
    # Every 4 entries, 3 of the heavy caller and 1 of the light one; each caller's own in order.
    assert [sum(n[0] == "l" for n in order[:end]) for end in (4, 8, 12)] == [1, 2, 3]
    assert [n for n in order if n[0] == "h"] == [f"h{i}" for i in range(9)]


def test_an_idle_caller_gets_no_credit_for_the_time_it_did_not_ask(store: LimitStore) -> None:
    busy, late = Turn(False, "busy"), Turn(False, "late")
    early = [(f"e{i}", busy) for i in range(6)]
    served, lease = entry_order(store, queue(store, early), early[:4])
    assert served == ["e0", "e1", "e2", "e3"]  # busy alone for a while
    newcomers = [(f"n{i}", late) for i in range(3)]
    for ticket, turn in newcomers:
        assert store.try_acquire(ACCOUNT, ticket, turn) is None
    # The newcomer alternates with busy from now on; it is not owed the turns it did not ask.
    assert entry_order(store, lease, early[4:] + newcomers)[0] == ["n0", "e4", "n1", "e5", "n2"]


def test_a_capped_caller_stays_under_its_bound_across_processes_and_others_fill_the_rest(
        tmp_path: Path) -> None:
    factory = StoreFactory("sqlite", tmp_path)
    stores = [factory(Limits(4, 6000)) for _ in range(2)]  # two processes, one state file
    managers = [ConcurrencyManager(store, poll_interval=0.01) for store in stores]
    capped, free = Turn(False, "key_capped", cap=2), Turn(False, "key_free")
    inside: dict[str, int] = {"key_capped": 0, "key_free": 0}
    peak: dict[str, int] = {"key_capped": 0, "key_free": 0}
    lock, full = threading.Lock(), threading.Event()

    def hold(manager: ConcurrencyManager, turn: Turn) -> None:
        with manager.slot(ACCOUNT, time.time() + 20, turn):
            with lock:
                inside[turn.caller] += 1
                peak[turn.caller] = max(peak[turn.caller], inside[turn.caller])
                if sum(inside.values()) == 4:
                    full.set()
            assert full.wait(20)
            with lock:
                inside[turn.caller] -= 1

    threads = [threading.Thread(target=hold, args=(managers[i % 2], capped)) for i in range(6)]
    threads += [threading.Thread(target=hold, args=(managers[i % 2], free)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    # Four slots: never more than two for the capped key, the free key got the other two.
    assert peak == {"key_capped": 2, "key_free": 2}
    for manager in managers:
        manager.shutdown()
    factory.close()


def test_a_lower_limit_for_one_account_bounds_it_alone(store: LimitStore) -> None:
    # The fixture's shared limit is 1; "wide" gets 1, "narrow~key" at most 1 of its own too.
    assert store.try_acquire("narrow~key", "n1", limit=1) is not None
    assert store.try_acquire("narrow~key", "n2", limit=1) is None
    assert store.try_acquire("narrow~key", "n2", limit=5) is None  # never above the shared one
    assert store.try_acquire(ACCOUNT, "w1", limit=None) is not None
