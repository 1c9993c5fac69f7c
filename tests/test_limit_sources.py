"""One set of limits per account wherever it is read: every process declares its environment's
limits in the shared store, the smallest live declaration binds them all, /configure overrides
single fields visibly and clearably. Store contracts run on a fake clock; the mixed-limits case
runs a real gunicorn and a library script against the simulator."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ADMIN, SERVER_TOKEN
from replicate_generation import library
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.limits.base import Limits, LimitSource
from replicate_generation.limits.sqlite import SQLiteLimitStore
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, service_env, wait_for

ACCOUNT = "acct-hash-1"
TTL = 10.0


class FakeClock:
    """Moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_store(tmp_path: Path, clock: FakeClock) -> Callable[[Limits], SQLiteLimitStore]:
    """A store on the one shared file, with these environment limits (one per 'process')."""

    def build(limits: Limits) -> SQLiteLimitStore:
        return SQLiteLimitStore(tmp_path / "state.sqlite3", limits, lease_ttl=TTL, clock=clock)

    return build


def concurrency(store: SQLiteLimitStore) -> LimitSource:
    return store.describe_limits()["max_concurrent"]


def admitted(store: SQLiteLimitStore, attempts: int) -> int:
    """How many of `attempts` new callers the store lets in at once."""
    return sum(store.try_acquire(ACCOUNT, f"t{i}") is not None for i in range(attempts))


# --------------------------------------------------------------------------- store contracts


def test_each_field_is_the_minimum_over_live_declarations(
        open_store: Callable[[Limits], SQLiteLimitStore]) -> None:
    small = open_store(Limits(3, 600, burst=5, polls_per_minute=2400))
    large = open_store(Limits(60, 120, burst=10, polls_per_minute=1000))
    small.declare("service")
    large.declare("script")
    expected = Limits(3, 120, burst=5, polls_per_minute=1000)
    assert small.get_limits() == large.get_limits() == expected
    # An observer that never declared sees the same, whatever its own environment says.
    observer = open_store(Limits(100, 6000, burst=50, polls_per_minute=9000))
    assert observer.get_limits() == expected
    assert concurrency(observer) == LimitSource(3, "environment", None, 3, 60, 2)
    # The 60-process grants no more than the 3 the smaller one declared.
    assert admitted(large, 10) == 3


def test_a_dead_declaration_expires_after_lease_ttl_but_the_own_one_always_counts(
        open_store: Callable[[Limits], SQLiteLimitStore], clock: FakeClock) -> None:
    crashed = open_store(Limits(3, 600))
    alive = open_store(Limits(60, 600))
    crashed.declare("crashed")
    alive.declare("alive")
    clock.advance(TTL - 0.1)
    assert alive.get_limits().max_concurrent == 3
    clock.advance(0.2)  # neither renewed: only the live process's own value is left for it
    assert concurrency(alive) == LimitSource(60, "environment", None, 60, 60, 1)
    # The crashed store's object still exists here, but its row is gone for everyone else.
    observer = open_store(Limits(7, 600))
    assert concurrency(observer) == LimitSource(7, "environment", None, None, None, 0)
    alive.declare("alive")  # its heartbeat
    assert concurrency(observer) == LimitSource(60, "environment", None, 60, 60, 1)
    assert admitted(alive, 61) == 60


def test_overrides_apply_per_field_and_clear_back_to_the_environment(
        open_store: Callable[[Limits], SQLiteLimitStore], clock: FakeClock) -> None:
    env = Limits(3, 600, burst=5, polls_per_minute=2400)
    store = open_store(env)
    store.declare("me")
    store.set_overrides({"requests_per_minute": 100})
    set_at = clock.now
    assert store.get_limits() == Limits(3, 100, burst=5, polls_per_minute=2400)
    sources = store.describe_limits()
    assert sources["requests_per_minute"] == LimitSource(100, "configure", set_at, 600, 600, 1)
    assert sources["requests_per_minute"].as_dict()["set_at"] == "2023-11-14T22:13:20.000Z"
    assert {sources[f].source for f in ("max_concurrent", "burst", "polls_per_minute")} == {
        "environment"}

    clock.advance(5)
    store.set_overrides({"max_concurrent": 8, "requests_per_minute": None})  # None clears one
    assert store.get_limits() == Limits(8, 600, burst=5, polls_per_minute=2400)
    assert store.describe_limits()["max_concurrent"].set_at == set_at + 5
    with pytest.raises(ValueError, match="burst"):
        store.set_overrides({"max_concurrent": 2, "burst": 0})  # nothing stored on error
    with pytest.raises(ValueError, match="unknown limit"):
        store.set_overrides({"speed": None})
    assert store.get_limits().max_concurrent == 8

    store.clear_overrides()
    assert store.get_limits() == env
    assert {s.source for s in store.describe_limits().values()} == {"environment"}


def test_an_all_fields_override_from_an_older_version_becomes_visible_and_clearable(
        tmp_path: Path, open_store: Callable[[Limits], SQLiteLimitStore]) -> None:
    open_store(Limits(3, 600))  # the schema, as an older version left it with its cm_limits row
    with sqlite3.connect(tmp_path / "state.sqlite3") as conn:
        conn.execute("INSERT INTO cm_limits VALUES (1, 9, 90, 4, 900)")
    store = open_store(Limits(3, 600))
    assert store.get_limits() == Limits(9, 90, burst=4, polls_per_minute=900)
    assert {s.source for s in store.describe_limits().values()} == {"configure"}
    store.clear_overrides()
    assert open_store(Limits(3, 600)).get_limits() == Limits(3, 600)  # and it stays cleared


def test_an_idle_manager_keeps_its_declaration_alive_and_withdraws_it_on_shutdown(
        open_store: Callable[[Limits], SQLiteLimitStore], clock: FakeClock) -> None:
    observer = open_store(Limits(60, 600))
    manager = ConcurrencyManager(open_store(Limits(3, 600)), clock=clock,
                                 heartbeat_interval=0.01)
    try:
        assert concurrency(observer).declarations == 1  # declared as soon as it is open
        clock.advance(3 * TTL)  # far past the first row's expiry: only a renewal shows it
        wait_for(lambda: concurrency(observer).declarations == 1, timeout=5,
                 what="the idle manager's heartbeat to renew its declaration")
        assert observer.get_limits().max_concurrent == 3
        assert admitted(observer, 5) == 3
    finally:
        manager.shutdown()
    assert concurrency(observer) == LimitSource(60, "environment", None, None, None, 0)


def test_reading_the_status_declares_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(concurrent_limit=7)
    store = SQLiteLimitStore(settings.state_file, Limits(3, 6000), lease_ttl=5)
    manager = ConcurrencyManager(store)
    try:
        status = library.global_status(settings=settings)
        assert status["concurrent_limit"] == 3 and status["available_slots"] == 3
        assert status["limit_sources"]["concurrent_limit"] == {
            "value": 3, "source": "environment", "set_at": None,
            "declared": {"min": 3, "max": 3, "processes": 1}}
        assert concurrency(store).declarations == 1  # the status reader did not add itself
        manager.configure_fields({"burst": 4})
        burst = library.global_status(settings=settings)["limit_sources"]["burst"]
        assert (burst["value"], burst["source"]) == (4, "configure")
        assert burst["set_at"].endswith("Z")
    finally:
        manager.shutdown()
    assert library.global_status(settings=settings)["concurrent_limit"] == 7


# --------------------------------------------------------------------------- end to end

SCRIPT = '''
import json, sys, time
from pathlib import Path

from replicate_generation import library as rb

ready, go, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
prompts = [f"script item {i} #slow=1.2" for i in range(6)]
with rb.BatchClient() as client:
    client.runner  # open the state file (and declare its limits) before the start signal
    ready.touch()
    give_up = time.monotonic() + 30
    while not go.exists():
        if time.monotonic() > give_up:
            sys.exit("no start signal")
        time.sleep(0.01)
    results = client.generate_batch(prompts, "flux-dev", [out / f"s{i}.png" for i in range(6)])
print(json.dumps([r.as_dict() for r in results]))
'''


def script_env(settings: Settings) -> dict[str, str]:
    """A script on the host with the service's state file and token, but the default limit."""
    env = {**service_env(settings), "PATH": os.environ.get("PATH", ""),
           "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}
    del env["REPLICATE_CONCURRENT_LIMIT"]
    return env


def in_progress_together(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> bool:
    """Did the two groups' runs (first create to last completion) overlap in time?"""
    def span(group: list[dict[str, Any]]) -> tuple[float, float]:
        return (min(p["created_at_clock"] for p in group),
                max(p["completed_at_clock"] for p in group))

    (a_start, a_end), (b_start, b_end) = span(first), span(second)
    return a_start < b_end and b_start < a_end


def test_a_service_with_limit_3_and_a_script_with_the_default_never_exceed_3_together(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator, tmp_path: Path) -> None:
    settings = make_settings(concurrent_limit=3, lease_ttl_seconds=5)
    service = start_gunicorn(settings, workers=2)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    ready, go, out = tmp_path / "ready", tmp_path / "go", tmp_path / "files"
    proc = subprocess.Popen(  # noqa: S603 - fixed argv, test only
        [sys.executable, str(script), str(ready), str(go), str(out)], cwd=tmp_path,
        env=script_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready.exists, timeout=30, what="the script to open the state file")
        status = requests.get(service.url + "/status", timeout=5).json()
        declared = status["limit_sources"]["concurrent_limit"]
        assert (declared["value"], declared["source"]) == (3, "environment")
        assert (declared["declared"]["min"], declared["declared"]["max"]) == (3, 60)
        answer: dict[str, Any] = {}
        service_prompts = [f"service item {i} #slow=1.2" for i in range(6)]

        def call_service() -> None:
            answer.update(service.post("/generate-batch", {
                "model_name": "flux-dev", "prompts": service_prompts}, ADMIN, timeout=60).json())

        caller = threading.Thread(target=call_service)
        caller.start()
        # The service holds the account's 3 slots, then the script (limit 60) starts its 6.
        wait_for(lambda: sim.stats(SERVER_TOKEN).get("inflight_now") == 3, timeout=30,
                 what="the service's first 3 predictions")
        go.touch()
        stdout, stderr = proc.communicate(timeout=60)
        caller.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert all(r["success"] for r in json.loads(stdout)), stdout
    assert answer.get("success") is True, answer
    stats = sim.stats(SERVER_TOKEN)
    assert stats["predictions"] == stats["creates_accepted"] == 12
    predictions = sim.predictions(SERVER_TOKEN)
    by_script = [p for p in predictions if p["input"]["prompt"].startswith("script")]
    by_service = [p for p in predictions if p["input"]["prompt"].startswith("service")]
    assert in_progress_together(by_script, by_service)
    assert stats["inflight_peak"] == 3  # the service's 3 binds the script's 60 too
