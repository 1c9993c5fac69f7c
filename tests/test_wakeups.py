"""Wake-ups between stores on one state file (host_wakeups) and the release count waiters
sleep on (release_count): events and short bounded waits, never sleeps."""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from replicate_generation.limits.redis_client import RedisConnection, ReleaseListener
from replicate_generation.limits.release_count import ReleaseCount
from replicate_generation.limits.wakeups import HostWakeups, wakeup_directory
from shared_backends import REDIS_URL


class Counter:
    """A callback that counts its calls and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self._calls = 0
        self._changed = threading.Condition()

    def __call__(self) -> None:
        with self._changed:
            self._calls += 1
            self._changed.notify_all()

    def wait_for(self, calls: int, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._calls >= calls, timeout)

    @property
    def calls(self) -> int:
        with self._changed:
            return self._calls


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return wakeup_directory(tmp_path / "state.sqlite3")


@pytest.fixture
def pair(directory: Path) -> Iterator[tuple[HostWakeups, HostWakeups]]:
    sender, listener = HostWakeups(directory), HostWakeups(directory)
    yield sender, listener
    sender.close()
    listener.close()


def test_every_wake_up_sent_is_counted_by_the_other_store_not_by_the_sender(
        pair: tuple[HostWakeups, HostWakeups]) -> None:
    sender, listener = pair
    heard_here, heard_there = Counter(), Counter()
    sender.listen(heard_here)
    listener.listen(heard_there)
    for _ in range(5):
        sender.publish()
    assert heard_there.wait_for(5)
    assert heard_here.calls == 0  # a store's own releases are counted by its manager already


def test_a_closed_store_unbinds_its_socket(directory: Path) -> None:
    store = HostWakeups(directory)
    store.listen(Counter())
    assert len(os.listdir(directory)) == 1
    store.close()
    assert os.listdir(directory) == []


def test_a_dead_listeners_socket_is_removed_by_the_next_publish(directory: Path) -> None:
    directory.mkdir(mode=0o700)
    litter = directory / "999999-dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(litter))
    dead.close()  # the file stays, as after a SIGKILL
    sender = HostWakeups(directory)
    sender.publish()
    assert not litter.exists()


def test_a_state_file_path_too_long_for_a_socket_meets_in_the_temp_directory(
        tmp_path: Path) -> None:
    state_file = tmp_path.joinpath(*["d" * 40] * 3) / "state.sqlite3"
    directory = wakeup_directory(state_file)
    assert len(str(directory)) < 80 and directory == wakeup_directory(state_file)
    sender, listener = HostWakeups(directory), HostWakeups(directory)
    heard = Counter()
    listener.listen(heard)
    sender.publish()
    try:
        assert heard.wait_for(1)
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_directory_that_cannot_be_made_leaves_waiters_polling(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = HostWakeups(blocker / "wake")
    store.listen(Counter())  # no error: waiters find releases by polling instead
    store.publish()
    store.close()


def test_publishing_before_anyone_listens_is_harmless(directory: Path) -> None:
    HostWakeups(directory).publish()
    assert not directory.exists()


# -- the release count ------------------------------------------------------------------------


def sleeper(count: ReleaseCount, releases: int) -> tuple[threading.Thread, threading.Event]:
    """A thread that sleeps until `releases` more were heard of (or 30 s pass)."""
    heard = count.heard()
    woke = threading.Event()

    def run() -> None:
        count.wait(heard, releases, 30.0)
        woke.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, woke


def test_a_waiter_wakes_once_its_number_of_releases_was_heard() -> None:
    count = ReleaseCount()
    thread, woke = sleeper(count, 3)
    count.add()
    count.add()
    assert not woke.wait(0.05)
    count.add()
    assert woke.wait(5)
    thread.join(5)


def test_releases_heard_before_the_wait_are_not_lost() -> None:
    count = ReleaseCount()
    heard = count.heard()
    count.add(2)
    count.wait(heard, 2, 30.0)  # returns at once: nothing to wait for


def test_a_reset_wakes_every_sleeper_and_one_that_looked_before_it() -> None:
    count = ReleaseCount()
    threads = [sleeper(count, 100) for _ in range(3)]
    heard = count.heard()
    count.wake_everyone()
    for thread, woke in threads:
        assert woke.wait(5)
        thread.join(5)
    count.wait(heard, 100, 30.0)  # looked before the reset: returns at once


def test_a_sleeper_that_times_out_leaves_no_trace() -> None:
    count = ReleaseCount()
    count.wait(count.heard(), 1, 0.01)
    assert count._sleepers == []  # noqa: SLF001 - a long stall must not grow a heap


def test_wake_ups_reach_a_process_with_descriptors_past_select_limit(
        pair: tuple[HostWakeups, HostWakeups], tmp_path: Path) -> None:
    sender, listener = pair
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    filler = [os.open(tmp_path, os.O_RDONLY) for _ in range(1100)]  # the socket gets fd > 1023
    try:
        heard = Counter()
        listener.listen(heard)
        sender.publish()
        assert heard.wait_for(1)
    finally:
        for fd in filler:
            os.close(fd)



def test_a_redis_listener_whose_connection_closes_under_it_listens_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store closes its connection while the listener's thread may be inside a read (redis-py
    then fails in its parser): the thread goes on, on a new connection, and ends when told."""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    connection = RedisConnection(REDIS_URL, cluster=False, socket_timeout=2.0, scripts={})
    channel, heard = "t" + secrets.token_hex(6), threading.Event()
    listener = ReleaseListener(connection, channel)
    listener.add(heard.set)
    publisher = redis.Redis.from_url(REDIS_URL)
    try:
        for _ in range(3):
            heard.clear()
            while not heard.wait(0.05):  # until it is subscribed and reading
                publisher.publish(channel, "x")
            connection.close()
    finally:
        listener.close()
        publisher.close()
    assert died == []
