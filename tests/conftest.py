"""Shared fixtures: a Replicate simulator on 127.0.0.1 and the service built against it."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from replicate_generation.app import create_app
from replicate_generation.devtools.simulator import SimConfig, Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn, service_env

ADMIN_KEY = "test-admin-key-0123456789"
SERVER_TOKEN = "r8_server_test_token"
USER_TOKEN = "r8_user_one_test_tok"
OTHER_TOKEN = "r8_user_two_test_tok"

ADMIN = {"X-Admin-API-Key": ADMIN_KEY}
USER = {"X-Replicate-API-Key": USER_TOKEN}
OTHER = {"X-Replicate-API-Key": OTHER_TOKEN}


# Session fixtures that build something slow (a wheel in a venv, the image's venv): the tests on
# one of them share an xdist worker (`--dist loadgroup`), so it is built once, not once per worker.
_BUILT_ONCE = ("installed", "image")
# The slowest tests (20-60 s) start first, so no worker is left running one alone at the end.
_SLOWEST = (
    "test_admission.py::test_orphans_resume_with_more_accounts_than_sqlite_has_variables",
    "test_openapi.py::test_schemathesis_finds_nothing",
    "test_storage.py::test_a_shared_input_is_stored_once_and_every_item_still_gets_it",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    grouping = config.pluginmanager.hasplugin("xdist")  # the marker exists only with xdist
    for item in items:
        for fixture in _BUILT_ONCE:
            if grouping and fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))
    items.sort(key=lambda item: not any(slow in item.nodeid for slow in _SLOWEST))


def pytest_runtest_teardown() -> None:
    """A failed test's garbage (say, a pipe its error path left open) is collected now, so it is
    reported against that test, not in whichever later test the collector happens to run."""
    if hasattr(sys, "last_value"):  # pytest keeps the failure's traceback here until next call
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        gc.collect()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may see the developer's real tokens or settings."""
    for name in list(os.environ):
        if name.startswith(("REPLICATE_", "CONCURRENT_DOCKER_", "FLASK_")) or name in (
            "OUTPUT_DIR", "STATE_FILE", "LEASE_TTL_SECONDS", "TASK_TIMEOUT_SECONDS",
        ):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def sim_server() -> Iterator[Simulator]:
    sim = Simulator(SimConfig())
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def sim(sim_server: Simulator) -> Simulator:
    """The simulator, reset to fast defaults for each test."""
    sim_server.reset()
    sim_server.config = SimConfig(run_seconds=0.05, queue_seconds=0.01)
    return sim_server


@pytest.fixture
def make_settings(tmp_path: Path, sim: Simulator) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        base = Settings(
            replicate_api_token=SERVER_TOKEN,
            admin_api_key=ADMIN_KEY,
            replicate_base_url=sim.base_url,
            output_dir=tmp_path / "output",
            state_file=tmp_path / "data" / "state.sqlite3",
            concurrent_limit=5,
            requests_per_minute=6000,
            create_burst=50,
            polls_per_minute=60000,
            poll_interval_seconds=0.02,
            # Creates are held (Prefer: wait) briefly: quick predictions end inside the hold,
            # slow ones get their id (and become cancelable) after it.
            sync_wait_seconds=1,
            task_timeout_seconds=20,
            lease_ttl_seconds=5,
            dispatch_threads=32,
            # A test that leaves a prediction running must not hold its teardown for long.
            shutdown_grace_seconds=2.0,
        )
        return replace(base, **overrides)

    return build


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(make_settings(**overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["jobs"].close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start real gunicorn services with given settings; stop them and check their logs."""
    started: list[Gunicorn] = []

    def start(settings: Settings, workers: int = 2, **extra_env: str) -> Gunicorn:
        env = {**service_env(settings, workers), **extra_env}
        server = Gunicorn(env, tmp_path / f"gunicorn{len(started)}.log")
        started.append(server)
        server.wait_ready()
        if workers > 1:  # a worker still loading the app would meet the test's first step
            server.wait_workers(workers)
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:  # a token in any log line of any process fails the test
        text = server.log()
        for secret in (SERVER_TOKEN, USER_TOKEN, ADMIN_KEY):
            assert secret not in text


class HeldClock:
    """A simulator clock that stands still until released, then follows real time from there."""

    def __init__(self) -> None:
        self._held_at: float | None = time.monotonic()
        self._offset = 0.0

    def __call__(self) -> float:
        return self._held_at if self._held_at is not None else time.monotonic() - self._offset

    def advance(self, seconds: float) -> None:
        assert self._held_at is not None
        self._held_at += seconds

    def release(self) -> None:
        assert self._held_at is not None
        self._offset, self._held_at = time.monotonic() - self._held_at, None


@pytest.fixture
def held_sim() -> Iterator[tuple[Simulator, HeldClock]]:
    """A simulator of its own whose predictions end only when the test moves its clock."""
    clock = HeldClock()
    own = Simulator(SimConfig(run_seconds=0.05, queue_seconds=0.01), clock=clock)
    own.start()
    yield own, clock
    own.stop()
