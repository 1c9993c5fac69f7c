"""The dispatcher's thread sharing, driven with events: accounts take turns task by task, split the
threads evenly while several have work, and an account gets its threads back when alone again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from replicate_generation.dispatcher import Dispatcher
from replicate_generation.limits.base import Turn

WAIT = 10.0


class Gate:
    """Tasks that record when they start and end only when the test opens their gate."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running: set[str] = set()
        self._gates: dict[str, threading.Event] = {}
        self._changed = threading.Condition()

    def task(self, name: str) -> Callable[[], str]:
        gate = self._gates.setdefault(name, threading.Event())

        def run() -> str:
            with self._changed:
                self.started.append(name)
                self.running.add(name)
                self._changed.notify_all()
            assert gate.wait(WAIT), f"{name} was never let go"
            with self._changed:
                self.running.discard(name)
            return name
        return run

    def open(self, name: str) -> None:
        self._gates[name].set()

    def open_all(self) -> None:
        for event in self._gates.values():
            event.set()

    def wait_started(self, count: int) -> list[str]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.started) >= count, WAIT), self.started
            return list(self.started)


@pytest.fixture
def gate() -> Iterator[Gate]:
    tasks = Gate()
    yield tasks
    tasks.open_all()  # never leave a pool thread blocked


def dispatcher(threads: int, limit: int = 10) -> Dispatcher:
    return Dispatcher(threads, max_queued=100, runners_for=lambda _account: limit)


def test_a_thread_given_back_goes_to_the_account_waiting_for_its_turn(gate: Gate) -> None:
    pool = dispatcher(threads=2)
    batch = pool.submit_many("a", [gate.task(f"a{i}") for i in range(4)])
    assert gate.wait_started(2) == ["a0", "a1"]
    other = pool.submit("b", gate.task("b0"))
    gate.open("a0")
    assert gate.wait_started(3)[2] == "b0"  # not a2, queued earlier by the same account
    gate.open("b0")
    assert other.result(WAIT) == "b0"
    for name in ("a1", "a2", "a3"):
        gate.open(name)
    assert [future.result(WAIT) for future in batch] == ["a0", "a1", "a2", "a3"]
    pool.shutdown(wait=True)
    assert gate.started == ["a0", "a1", "b0", "a2", "a3"]


def test_accounts_split_the_threads_and_one_alone_again_gets_them_back(gate: Gate) -> None:
    pool = dispatcher(threads=4)
    batch = pool.submit_many("a", [gate.task(f"a{i}") for i in range(8)])
    gate.wait_started(4)
    pool.submit_many("b", [gate.task("b0"), gate.task("b1")])
    gate.open("a0")  # a is over its even share (2 of 4): its runner ends, b takes the thread
    gate.open("a1")
    assert gate.wait_started(6)[4:] == ["b0", "b1"]
    gate.open("b0")
    gate.open("b1")  # b is done: a's share is every thread again
    assert gate.wait_started(8)[6:] == ["a4", "a5"]
    assert gate.running == {"a2", "a3", "a4", "a5"}
    for name in ("a2", "a3", "a4", "a5", "a6", "a7"):
        gate.open(name)
    assert [future.result(WAIT) for future in batch] == [f"a{i}" for i in range(8)]
    pool.shutdown(wait=True)
    assert gate.started == ["a0", "a1", "a2", "a3", "b0", "b1", "a4", "a5", "a6", "a7"]


def test_shutdown_cancels_what_waits_for_a_turn(gate: Gate) -> None:
    pool = dispatcher(threads=1)
    mine = pool.submit_many("a", [gate.task("a0"), gate.task("a1")])
    gate.wait_started(1)
    theirs = pool.submit("b", gate.task("b0"))
    closing = threading.Thread(target=pool.shutdown)
    closing.start()
    gate.open("a0")
    closing.join(WAIT)
    assert not closing.is_alive()
    assert mine[0].result(WAIT) == "a0"
    assert mine[1].cancelled() and theirs.cancelled()
    assert gate.started == ["a0"]


def test_an_interactive_task_does_not_wait_behind_a_batch_for_a_thread(gate: Gate) -> None:
    pool = dispatcher(threads=4, limit=2)
    batch = Turn(interactive=False, caller="nightly")
    pool.submit_many("a", [gate.task(f"b{i}") for i in range(6)], batch)
    assert gate.wait_started(2) == ["b0", "b1"]  # the account's limit: 2 runners
    urgent = pool.submit("a", gate.task("i0"), Turn(interactive=True, caller="web"))
    assert gate.wait_started(3)[2] == "i0"  # started while both batch tasks still run
    gate.open("i0")
    assert urgent.result(WAIT) == "i0"
    gate.open_all()
    pool.shutdown(wait=True)


def test_callers_of_one_account_share_its_runners_by_weight(gate: Gate) -> None:
    pool = dispatcher(threads=1, limit=1)
    pool.submit("a", gate.task("x0"), Turn(False, "first"))
    gate.wait_started(1)
    light = pool.submit_many("a", [gate.task(f"l{i}") for i in range(3)], Turn(False, "light"))
    heavy = pool.submit_many("a", [gate.task(f"h{i}") for i in range(9)],
                             Turn(False, "heavy", 3.0))
    gate.open_all()
    assert [f.result(WAIT) for f in light + heavy]
    order = gate.started[1:]
    assert [sum(n[0] == "l" for n in order[:end]) for end in (4, 8, 12)] == [1, 2, 3]
    assert [n for n in order if n[0] == "h"] == [f"h{i}" for i in range(9)]
    pool.shutdown(wait=True)


def test_a_caller_at_its_bound_leaves_the_runners_to_the_others(gate: Gate) -> None:
    pool = dispatcher(threads=4, limit=4)
    capped = pool.submit_many("a", [gate.task(f"c{i}") for i in range(3)],
                              Turn(False, "capped", cap=1))
    free = pool.submit_many("a", [gate.task(f"f{i}") for i in range(3)], Turn(False, "free"))
    assert sorted(gate.wait_started(4)) == ["c0", "f0", "f1", "f2"]  # not c1 beside c0
    gate.open("c0")
    assert gate.wait_started(5)[4] == "c1"
    gate.open_all()
    assert [f.result(WAIT) for f in capped + free] == ["c0", "c1", "c2", "f0", "f1", "f2"]
    pool.shutdown(wait=True)


def test_many_accounts_on_few_threads_each_run_their_tasks(gate: Gate) -> None:
    # Every runner finds others waiting: each must still run a task per turn, not pass it on.
    pool = dispatcher(threads=2)
    futures = [pool.submit(f"acct{i}", gate.task(f"t{i}")) for i in range(40)]
    gate.open_all()
    assert sorted(f.result(WAIT) for f in futures) == sorted(f"t{i}" for i in range(40))
    pool.shutdown(wait=True)
