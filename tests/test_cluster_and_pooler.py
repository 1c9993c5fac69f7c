"""The service behind a real 3-master Redis Cluster (REDIS_CLUSTER=true) and a real PgBouncer in
transaction pooling mode (issue #20, findings 13 and 14). The servers start once per module on
free ports; the shared Redis and PostgreSQL keep their configuration."""

from __future__ import annotations

import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from backend_servers import PgBouncer, RedisClusterServers
from conftest import ADMIN, OTHER, OTHER_TOKEN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.errors import SettingsError, StoreUnavailable
from replicate_generation.jobs.migrations import migrate
from replicate_generation.limits.base import Limits
from replicate_generation.limits.redis import RedisLimitStore
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for
from shared_backends import REDIS_URL, missing, postgres_database, redis_prefix
from test_job_processes import submit, wait_terminal
from test_limit_store_contract import exercise_every_operation

LIMIT = 3
ACCOUNTS = {SERVER_TOKEN: ADMIN, USER_TOKEN: USER, OTHER_TOKEN: OTHER}


# --------------------------------------------------------------------------- Redis Cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    if (absent := RedisClusterServers.missing()) is not None:
        missing(absent)
    with tempfile.TemporaryDirectory(prefix="rg-cluster-") as directory:
        servers = RedisClusterServers(Path(directory))
        try:
            servers.start()
            yield servers
        finally:
            servers.stop()


def cluster_store(cluster: RedisClusterServers, node: int, prefix: str, *,
                  plain: bool = False) -> RedisLimitStore:
    return RedisLimitStore(cluster.url(node), Limits(1, 60), key_prefix=prefix,
                           cluster=not plain)


@pytest.mark.xdist_group("redis_cluster")
def test_every_store_operation_runs_on_a_cluster_and_a_plain_client_is_told_why_not(
        cluster: RedisClusterServers) -> None:
    prefix = "t" + secrets.token_hex(6)
    store = cluster_store(cluster, 0, prefix)
    try:
        exercise_every_operation(store)  # each script on the node holding its keys' slot
    finally:
        store.close()
    assert sum(1 for count in cluster.keys_per_node(prefix) if count) >= 2  # across nodes

    plain = cluster_store(cluster, 0, "t" + secrets.token_hex(6), plain=True)
    try:
        with pytest.raises(SettingsError, match="set REDIS_CLUSTER=true"):
            exercise_every_operation(plain)
    finally:
        plain.close()


@pytest.mark.xdist_group("redis_cluster")
def test_a_release_through_one_node_wakes_a_waiter_listening_on_another(
        cluster: RedisClusterServers) -> None:
    prefix = "t" + secrets.token_hex(6)
    waiter, releaser = cluster_store(cluster, 0, prefix), cluster_store(cluster, 2, prefix)
    woken = threading.Event()
    try:
        waiter.on_release(woken.set)
        # The listener subscribes in its own thread: release until it hears one.
        for attempt in range(50):
            lease = releaser.try_acquire("acct-wake", f"t{attempt}")
            assert lease is not None
            releaser.release(lease)
            if woken.wait(0.2):
                break
        assert woken.is_set()
    finally:
        waiter.close()
        releaser.close()


@pytest.mark.xdist_group("redis_cluster")
def test_the_service_on_a_cluster_holds_each_accounts_limit(
        cluster: RedisClusterServers, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn], sim: Simulator) -> None:
    sim.config.run_seconds = 0.3
    with redis_prefix() as prefix:  # a fresh prefix: the cluster is private, nothing to clean
        settings = make_settings(redis_url=cluster.url(1), redis_key_prefix=prefix,
                                 concurrent_limit=LIMIT)
        server = start_gunicorn(settings, REDIS_CLUSTER="true")
        health = requests.get(server.url + "/health", timeout=5).json()
        assert health["dependencies"]["limits"] == {"backend": "redis", "status": "ok"}

        jobs = {token: submit(server, [f"{token[-8:]} item {i}" for i in range(3 * LIMIT)],
                              headers) for token, headers in ACCOUNTS.items()}
        for token, job_id in jobs.items():
            done = wait_terminal(server, job_id, ACCOUNTS[token])
            assert done["state"] == "succeeded", done["counts"]
        for token in ACCOUNTS:
            stats = sim.stats(token)
            assert stats["predictions"] == 3 * LIMIT
            assert stats["inflight_peak"] == LIMIT  # bound, and reached

        status = requests.get(server.url + "/status", headers=ADMIN, timeout=5)
        assert status.status_code == 200, status.text
        assert sum(1 for count in cluster.keys_per_node(prefix) if count) >= 2


@pytest.mark.xdist_group("redis_cluster")
def test_a_plain_client_on_a_cluster_stops_start_up_with_a_clear_message(
        cluster: RedisClusterServers, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn]) -> None:
    settings = make_settings(redis_url=cluster.url(0), redis_key_prefix="t" + secrets.token_hex(6))
    with pytest.raises(RuntimeError, match="gunicorn exited") as stopped:
        start_gunicorn(settings, workers=1)
    assert "REDIS_URL names a node of a Redis Cluster" in str(stopped.value)
    assert "set REDIS_CLUSTER=true" in str(stopped.value)


@pytest.mark.xdist_group("redis_cluster")
def test_a_dead_node_fails_its_accounts_closed_and_then_the_whole_cluster(tmp_path: Path) -> None:
    if (absent := RedisClusterServers.missing()) is not None:
        missing(absent)
    doomed = RedisClusterServers(tmp_path / "cluster")  # its own: this one loses a node
    doomed.start()
    store = RedisLimitStore(doomed.url(0), Limits(2, 60), key_prefix="t", cluster=True,
                            socket_timeout=1)
    try:
        # acct-hash-1's slot (16062) is on the last node, acct-hash-2's (3805) on the first.
        assert store.try_acquire("acct-hash-1", "before") is not None
        doomed.kill(2)
        with pytest.raises(StoreUnavailable):
            store.try_acquire("acct-hash-1", "after")
        assert store.try_acquire("acct-hash-2", "elsewhere") is not None

        def cluster_down() -> bool:
            try:
                store.check()
            except StoreUnavailable as exc:
                return "the cluster is down" in str(exc)
            return False

        wait_for(cluster_down, timeout=30, what="the nodes to agree the cluster is down")
    finally:
        store.close()
        doomed.stop()


# --------------------------------------------------------------------------- PgBouncer


@pytest.fixture(scope="module")
def pgbouncer() -> Iterator[PgBouncer]:
    if (absent := PgBouncer.missing()) is not None:
        missing(absent)
    bouncer = PgBouncer()
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_database(pgbouncer: PgBouncer) -> Iterator[str]:
    """A fresh database on the shared server, reached through PgBouncer; dropped afterwards."""
    with postgres_database() as direct_url:
        yield pgbouncer.url(direct_url.rsplit("/", 1)[1])


def hammer(server: Gunicorn, paths: list[str], threads: int = 24) -> dict[int, int]:
    """GET every path at once from many threads; how many answers per status."""
    def get(path: str) -> int:
        return requests.get(server.url + path, headers=ADMIN, timeout=30).status_code

    with ThreadPoolExecutor(threads) as pool:
        codes = list(pool.map(get, paths))
    return {code: codes.count(code) for code in set(codes)}


@pytest.mark.xdist_group("pgbouncer")
def test_the_service_behind_pgbouncer_in_transaction_mode_never_answers_500(
        pooled_database: str, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn], sim: Simulator) -> None:
    with redis_prefix() as prefix:
        settings = make_settings(database_url=pooled_database, redis_url=REDIS_URL,
                                 redis_key_prefix=prefix)
        server = start_gunicorn(settings)  # both workers migrate at start, through PgBouncer
        job_ids = [submit(server, [f"job {n} item {i}" for i in range(3)], ADMIN)
                   for n in range(4)]
        for job_id in job_ids:
            assert wait_terminal(server, job_id, ADMIN)["state"] == "succeeded"

        paths = [f"/jobs/{job_ids[i % len(job_ids)]}" for i in range(240)] + \
            ["/jobs?limit=3", "/jobs"] * 60
        codes = hammer(server, paths)
        assert codes == {200: len(paths)}, codes
        answer = requests.post(f"{server.url}/jobs/{job_ids[0]}/cancel", headers=ADMIN,
                               timeout=10)
        assert answer.status_code < 500, answer.text
    assert "prepared statement" not in server.log()
    assert migrate(pooled_database) == current_revision(pooled_database)


def current_revision(url: str) -> Any:
    with psycopg.connect(url, prepare_threshold=None) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None



@pytest.mark.parametrize("environ", [
    {"REDIS_CLUSTER": "true"},
    {"REDIS_CLUSTER": "true", "REDIS_URL": "unix:///run/redis.sock"},
])
def test_redis_cluster_needs_a_tcp_redis_url(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="REDIS_CLUSTER=true needs REDIS_URL"):
        Settings.from_env(environ)


def test_a_cluster_url_must_name_database_0() -> None:
    assert Settings.from_env({"REDIS_CLUSTER": "yes", "REDIS_URL": "redis://a:6379/0"}).redis_cluster
    with pytest.raises(ValueError, match="only database 0"):
        RedisLimitStore("redis://127.0.0.1:1/2", Limits(1, 60), cluster=True)
