"""Two service instances that share nothing but Redis, PostgreSQL and the output volume (issue #14):
separate working directories, state files and gunicorn groups, one Replicate account."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text

import pg_server
from conftest import ADMIN, OTHER, SERVER_TOKEN
from redis_server import RedisServer
from replicate_generation.devtools.simulator import SimConfig, Simulator
from replicate_generation.jobs.schema import open_engine
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for
from shared_backends import REDIS_URL, missing, postgres_database, redis_prefix
from test_job_processes import (
    SLOTS,
    all_slots_held,
    assert_all_done_once,
    creates_by_prompt,
    submit,
    wait_terminal,
)

LEASE_TTL = 1.5


@dataclass(frozen=True)
class Backends:
    redis_url: str
    redis_key_prefix: str
    database_url: str


@pytest.fixture
def backends() -> Iterator[Backends]:
    with redis_prefix() as prefix, postgres_database() as database_url:
        yield Backends(REDIS_URL, prefix, database_url)


@pytest.fixture
def host_settings(make_settings: Callable[..., Settings], backends: Backends,
                  tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one host: its own state file, the shared backends and output volume."""

    def build(host: str, **overrides: Any) -> Settings:
        return make_settings(state_file=tmp_path / host / "state.sqlite3",
                             redis_url=backends.redis_url,
                             redis_key_prefix=backends.redis_key_prefix,
                             database_url=backends.database_url, **overrides)

    return build


def batch(prompts: list[str], names: list[str]) -> dict[str, Any]:
    return {"model_name": "flux-dev", "prompts": prompts, "output_format": "png",
            "custom_filenames": names}


def assert_batch_in_order(data: dict[str, Any], prompts: list[str], names: list[str]) -> None:
    assert data["success"] is True, data
    assert [r["prompt"] for r in data["results"]] == prompts
    assert [Path(r["files"][0]).stem for r in data["results"]] == names


def run_on_both(hosts: dict[str, Gunicorn], size: int) -> None:
    """One batch per host at once; each comes back whole, in order, under its names."""
    jobs = {host: ([f"{host} {i}" for i in range(size)], [f"{host}_{i}" for i in range(size)])
            for host in hosts}
    with ThreadPoolExecutor(len(hosts)) as pool:
        answers = {host: pool.submit(server.post, "/generate-batch", batch(*jobs[host]), ADMIN)
                   for host, server in hosts.items()}
        for host, answer in answers.items():
            assert_batch_in_order(answer.result().json(), *jobs[host])


def test_two_hosts_hold_one_concurrency_limit(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    sim.config.run_seconds = 0.4
    hosts = {name: start_gunicorn(host_settings(name, concurrent_limit=5)) for name in "ab"}
    for server in hosts.values():
        health = requests.get(server.url + "/health", timeout=5).json()
        outputs = health["dependencies"].pop("outputs")
        assert health["dependencies"] == {"limits": {"backend": "redis", "status": "ok"},
                                          "jobs": {"backend": "postgresql", "status": "ok"}}
        assert (outputs["backend"], outputs["status"]) == ("disk", "ok")
    run_on_both(hosts, 10)
    stats = sim.stats(SERVER_TOKEN)
    assert stats["predictions"] == 20
    assert stats["inflight_peak"] == 5  # bound, and reached: the limit binds across hosts


def test_two_hosts_hold_one_create_rate(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    limits = {"concurrent_limit": 5, "requests_per_minute": 60, "create_burst": 3}
    hosts = {name: start_gunicorn(host_settings(name, **limits)) for name in "ab"}
    run_on_both(hosts, 5)
    assert sim.stats(SERVER_TOKEN)["creates_accepted"] == 10
    assert sim.stats(SERVER_TOKEN)["inflight_peak"] <= 5
    # GCRA at 1/s with a burst of 3, for both hosts together.
    assert sim.max_creates_in_window(SERVER_TOKEN, 60) <= 60 + 3
    for window in (1, 3, 5):
        assert sim.max_creates_in_window(SERVER_TOKEN, window) <= window + 3, window


def test_a_job_from_one_host_is_read_downloaded_and_canceled_on_the_other(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    a, b = (start_gunicorn(host_settings(name)) for name in "ab")
    done = wait_terminal(b, submit(a, ["first", "second"], ADMIN), ADMIN)
    assert done["state"] == "succeeded" and [i["prompt"] for i in done["items"]] == \
        ["first", "second"]
    for item in done["items"]:
        (url,) = item["urls"]
        download = requests.get(b.url + url, headers=ADMIN, timeout=10)
        assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
        assert requests.get(b.url + url, headers=OTHER, timeout=10).status_code == 404
    assert requests.get(f"{b.url}/jobs/{done['id']}", headers=OTHER,
                        timeout=10).status_code == 404

    hanging = submit(a, ["#hang one", "#hang two"], ADMIN)
    wait_for(lambda: sim.stats(SERVER_TOKEN)["inflight_now"] == 2, what="both running on a")
    canceled = requests.post(f"{b.url}/jobs/{hanging}/cancel", headers=ADMIN, timeout=10)
    assert canceled.status_code in (200, 202), canceled.text
    assert wait_terminal(b, hanging, ADMIN)["state"] == "canceled"
    assert sim.stats(SERVER_TOKEN)["inflight_now"] == 0


def test_the_other_host_finishes_a_killed_hosts_jobs_creating_nothing_twice(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator, tmp_path: Path) -> None:
    settings = {"concurrent_limit": SLOTS, "lease_ttl_seconds": LEASE_TTL,
                "task_timeout_seconds": 30}
    a, b = (start_gunicorn(host_settings(name, **settings), workers=1) for name in "ab")
    prompts = [f"#slow=2 slow {i}" for i in range(SLOTS)] + [f"#slow=0.2 quick {i}"
                                                            for i in range(5)]
    job_id = submit(a, prompts, ADMIN)
    before = all_slots_held(a, sim, job_id, SERVER_TOKEN, ADMIN)
    a.kill()
    done = wait_terminal(b, job_id, ADMIN)
    assert_all_done_once(done, sim, SERVER_TOKEN, prompts, before, tmp_path / "output")
    assert sim.stats(SERVER_TOKEN)["inflight_peak"] <= SLOTS


def test_configure_on_one_host_is_obeyed_by_the_other_at_once(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    sim.config.run_seconds = 0.3
    a, b = (start_gunicorn(host_settings(name, concurrent_limit=5)) for name in "ab")
    assert a.post("/configure", {"concurrent_limit": 2}, ADMIN).status_code == 200
    changed_at = sim.now()
    health = requests.get(b.url + "/health", timeout=5).json()
    assert health["concurrency_status"]["concurrent_limit"] == 2
    prompts = [f"p{i}" for i in range(6)]
    assert_batch_in_order(b.post("/generate-batch", batch(prompts, prompts), ADMIN).json(),
                          prompts, prompts)
    assert sim.max_inflight_at_create(SERVER_TOKEN, since=changed_at) <= 2


# -- fail closed: a backend down mid-run ---------------------------------------------------------

OUTAGE_SLOTS = 3
REDIS_PASSWORD = "redis-s3cret-pw"
OUTAGE_PROMPTS = [f"#slow=1 outage item {i}" for i in range(8)]


def assert_refused_while_down(server: Gunicorn, dependency: str, role: str) -> None:
    """New work gets 503 with Retry-After naming the dependency; /health says which is down."""
    answer = server.post("/generate-batch", batch(["refused"], ["refused"]), ADMIN, timeout=30)
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) >= 1
    body = answer.json()
    assert (body["error_type"], body["dependency"]) == ("dependency_unavailable", dependency)
    health = requests.get(server.url + "/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["dependencies"][role]["status"].startswith("unavailable")
    assert requests.get(server.url + "/ready", timeout=30).status_code == 503


def outage(server: Gunicorn, sim: Simulator, stop: Callable[[], None],
           start: Callable[[], None], dependency: str, role: str) -> str:
    """Fill every slot, take the backend away for a while, bring it back; return the job id."""
    job_id = submit(server, OUTAGE_PROMPTS, ADMIN)
    wait_for(lambda: sim.stats(SERVER_TOKEN)["inflight_now"] == OUTAGE_SLOTS,
             what="every slot in use")
    stop()
    created = len(sim.predictions(SERVER_TOKEN))
    assert_refused_while_down(server, dependency, role)
    # The running predictions end on Replicate meanwhile; nothing new may be created.
    wait_for(lambda: sim.stats(SERVER_TOKEN)["inflight_now"] == 0, what="predictions to end")
    assert len(sim.predictions(SERVER_TOKEN)) == created
    start()
    return job_id


def assert_resumed_once(server: Gunicorn, sim: Simulator, job_id: str) -> None:
    done = wait_terminal(server, job_id, ADMIN, timeout=60)
    assert done["state"] == "succeeded", done
    assert [i["prompt"] for i in done["items"]] == OUTAGE_PROMPTS
    assert creates_by_prompt(sim, SERVER_TOKEN) == dict.fromkeys(OUTAGE_PROMPTS, 1)
    assert sim.stats(SERVER_TOKEN)["inflight_peak"] <= OUTAGE_SLOTS
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "healthy"


def test_redis_down_creates_nothing_and_work_resumes_within_the_limit(
        make_settings: Callable[..., Settings], backends: Backends,
        start_gunicorn: Callable[..., Gunicorn], sim: Simulator, tmp_path: Path) -> None:
    persistent = ["--appendonly", "yes", "--appendfsync", "always"]  # as deployments run it
    with RedisServer(tmp_path / "redis", password=REDIS_PASSWORD,
                     options=persistent) as redis_server:
        settings = make_settings(concurrent_limit=OUTAGE_SLOTS, redis_url=redis_server.url,
                                 database_url=backends.database_url, task_timeout_seconds=60)
        server = start_gunicorn(settings)
        job_id = outage(server, sim, redis_server.stop, redis_server.start, "redis", "limits")
        assert_resumed_once(server, sim, job_id)
    assert "unavailable" in server.log() and REDIS_PASSWORD not in server.log()


def test_postgresql_down_creates_nothing_and_work_resumes_within_the_limit(
        make_settings: Callable[..., Settings], backends: Backends,
        start_gunicorn: Callable[..., Gunicorn], sim: Simulator) -> None:
    if not pg_server.available():
        missing("PostgreSQL 15 binaries are not installed")
    database = pg_server.PrivateServer()
    try:
        database.start()
        settings = make_settings(concurrent_limit=OUTAGE_SLOTS, redis_url=backends.redis_url,
                                 redis_key_prefix=backends.redis_key_prefix,
                                 database_url=database.url(), task_timeout_seconds=60)
        server = start_gunicorn(settings)
        job_id = outage(server, sim, database.stop, database.start, "postgresql", "jobs")
        assert_resumed_once(server, sim, job_id)
    finally:
        database.remove()


# -- a big job spreads over both hosts -------------------------------------------------------------

SPREAD_LIMIT = 4
SPREAD_ITEMS = 120


@pytest.fixture
def second_sim() -> Iterator[Simulator]:
    """Another Replicate for host b, so what each host created is told apart."""
    other = Simulator(SimConfig(run_seconds=0.2, queue_seconds=0.01))
    other.start()
    yield other
    other.stop()


def all_items(server: Gunicorn, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = ""
    while True:
        page = requests.get(f"{server.url}/jobs/{job_id}/items?limit=100{after}", headers=ADMIN,
                            timeout=10).json()
        items += page["data"]
        if not page.get("has_more"):
            return items
        after = f"&after={page['next_cursor']}"


def peak_in_flight(*sims: Simulator) -> int:
    """The most predictions of the server's account in flight at once on all simulators."""
    edges = sorted((at, step) for sim in sims for p in sim.predictions(SERVER_TOKEN)
                   for at, step in ((p["created_at_clock"], 1), (p["completed_at_clock"], -1)))
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_a_big_job_taken_by_one_host_runs_on_both(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator, second_sim: Simulator) -> None:
    sim.config.run_seconds = 0.2
    a = start_gunicorn(host_settings("a", concurrent_limit=SPREAD_LIMIT), workers=1)
    b = start_gunicorn(host_settings("b", concurrent_limit=SPREAD_LIMIT,
                                     replicate_base_url=second_sim.base_url), workers=1)
    prompts = [f"spread {i}" for i in range(SPREAD_ITEMS)]
    job_id = submit(a, prompts, ADMIN)
    done = wait_terminal(b, job_id, ADMIN, timeout=90)
    assert done["state"] == "succeeded" and done["counts"]["succeeded"] == SPREAD_ITEMS, done
    on_a, on_b = creates_by_prompt(sim, SERVER_TOKEN), creates_by_prompt(second_sim, SERVER_TOKEN)
    # Every item created exactly once, by one host or the other; b took a real share.
    assert {**on_a, **on_b} == dict.fromkeys(prompts, 1) and not set(on_a) & set(on_b)
    assert len(on_b) >= SPREAD_ITEMS // 4, (len(on_a), len(on_b))
    assert peak_in_flight(sim, second_sim) <= SPREAD_LIMIT
    items = all_items(a, job_id)
    assert [item["prompt"] for item in items] == prompts
    assert all(item["state"] == "succeeded" and len(item["files"]) == 1 for item in items)


def runners_of_running_items(database_url: str, job_id: str) -> set[str]:
    engine = open_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT DISTINCT runner FROM job_items WHERE job_id = :j"
                                     " AND state = 'running'"), {"j": job_id}).all()
    finally:
        engine.dispose()
    return {str(row.runner) for row in rows if row.runner is not None}


def test_items_a_killed_helper_held_are_finished_by_the_owner_creating_nothing_twice(
        host_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator, backends: Backends) -> None:
    sim.config.run_seconds = 1.0
    settings = {"concurrent_limit": SPREAD_LIMIT, "lease_ttl_seconds": LEASE_TTL,
                "task_timeout_seconds": 30}
    a, b = (start_gunicorn(host_settings(name, **settings), workers=1) for name in "ab")
    prompts = [f"kill spread {i}" for i in range(60)]
    job_id = submit(a, prompts, ADMIN)
    wait_for(lambda: len(runners_of_running_items(backends.database_url, job_id)) == 2,
             timeout=30, what="both hosts running items of the job")
    b.kill()
    done = wait_terminal(a, job_id, ADMIN, timeout=90)
    assert done["state"] == "succeeded" and done["counts"]["succeeded"] == len(prompts), done
    assert creates_by_prompt(sim, SERVER_TOKEN) == dict.fromkeys(prompts, 1)
    assert peak_in_flight(sim) <= SPREAD_LIMIT
