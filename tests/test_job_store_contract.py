"""The job store's contract, asserted alike on SQLite (a temp file) and PostgreSQL.

PostgreSQL: a fresh database on the shared server (127.0.0.1:5432) per module, dropped at the end;
the outage test runs a private server (tests/pg_server.py) that it stops and restarts.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, text

import pg_server
from replicate_generation.errors import AccountStoreFull, IdempotencyConflict, StoreUnavailable
from replicate_generation.jobs.keys import KeyNameTaken
from replicate_generation.jobs.migrations import migrate
from replicate_generation.jobs.retention import AccountBounds
from replicate_generation.jobs.rows import CANCEL_UNCONFIRMED, ItemOutcome, NewItem, NewJob
from replicate_generation.jobs.schema import database_url, open_engine
from replicate_generation.jobs.store import INSERT_CHUNK, ItemFinished, JobStore
from replicate_generation.sqlite_db import patient_writes
from shared_backends import missing

SHARED_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
HEAD = "0008_item_runners"
TABLES = ("job_files", "job_values", "job_items", "jobs", "job_workers", "api_keys",
          "spend_ledger", "audit_log", "job_totals")
OK = ItemOutcome(state="succeeded", model_used="flux-dev")

# The schema as the store made it before migrations (CREATE TABLE IF NOT EXISTS, no
# alembic_version): the fixture an old state file is built from.
OLD_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        kind TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'service',
        state TEXT NOT NULL,
        request_id TEXT NOT NULL,
        item_count INTEGER NOT NULL,
        owner TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        cancel_requested_at REAL,
        idempotency_key TEXT,
        request_hash TEXT,
        webhook_url TEXT,
        webhook_private INTEGER NOT NULL DEFAULT 0,
        webhook_state TEXT,
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        webhook_next_at REAL,
        webhook_error TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(account, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs(account, created_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_open ON jobs(state) WHERE state IN ('queued', 'running')",
    "CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs(webhook_next_at)"
    " WHERE webhook_state = 'pending'",
    """CREATE TABLE IF NOT EXISTS job_items (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        prediction_id TEXT,
        prediction_model TEXT,
        model_used TEXT,
        attempts TEXT NOT NULL DEFAULT '[]',
        files TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        error_type TEXT,
        cost_usd REAL,
        placeholder INTEGER NOT NULL DEFAULT 0,
        notes TEXT NOT NULL DEFAULT '[]',
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (job_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS job_files (
        path TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS job_files_by_job ON job_files(job_id)",
    """CREATE TABLE IF NOT EXISTS job_values (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (job_id, digest)
    )""",
    """CREATE TABLE IF NOT EXISTS job_workers (
        id TEXT PRIMARY KEY,
        heartbeat_at REAL NOT NULL
    )""",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_server() -> Iterator[Callable[[], str]]:
    """Makes databases rg_<random> on the shared server (as URLs); drops them all at the end."""
    admin = create_engine(SHARED_SERVER, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def new_database() -> str:
        name = f"rg_{secrets.token_hex(6)}"
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except exc.OperationalError:
            missing("no PostgreSQL server on 127.0.0.1:5432")
        made.append(name)
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    yield new_database
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def module_database(shared_server: Callable[[], str]) -> str:
    return shared_server()


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the stores of one test live: a new SQLite file, or the module's PostgreSQL
    database emptied."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    url: str = request.getfixturevalue("module_database")
    migrate(url)
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    engine.dispose()
    return url


@pytest.fixture
def open_store(target: str) -> Iterator[Callable[[], JobStore]]:
    """Opens stores on the test's target (a second one is another process's view)."""
    stores: list[JobStore] = []

    def make() -> JobStore:
        stores.append(JobStore(target))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], JobStore]) -> JobStore:
    return open_store()


def new_job(job_id: str, items: int = 1, *, account: str = "acct_a", key: str | None = None,
            body: str = "h", origin: str = "service", webhook: str | None = None,
            spec: dict[str, Any] | None = None) -> NewJob:
    return NewJob(id=job_id, account=account, kind="batch", request_id=f"req_{job_id}",
                  items=[NewItem(spec=spec or {"n": i}) for i in range(items)],
                  idempotency_key=key, request_hash=body, webhook_url=webhook, origin=origin)


def rows(target: str, table: str) -> int:
    engine = open_engine(target)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())  # noqa: S608
    finally:
        engine.dispose()


def stored_column(target: str, query: str) -> list[str]:
    engine = open_engine(target)
    try:
        with engine.connect() as conn:
            return [str(value) for (value,) in conn.execute(text(query))]
    finally:
        engine.dispose()


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at once; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as error:  # noqa: BLE001 - returned to the test
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


# --------------------------------------------------------------------------- submitting


def test_create_returns_the_job_once_per_idempotency_key_and_refuses_another_body(
        store: JobStore) -> None:
    job, created = store.create(new_job("job_1", 2, key="k1"), "w", 10.0)
    assert created and job.state == "queued" and job.owner == "w" and job.fence == 1
    assert job.counts["queued"] == 2 and job.item_count == 2
    again, created = store.create(new_job("job_2", 2, key="k1"), "w", 11.0)
    assert not created and again.id == "job_1"
    with pytest.raises(IdempotencyConflict):
        store.create(new_job("job_3", 2, key="k1", body="other"), "w", 12.0)
    # The key is per account.
    other, created = store.create(new_job("job_4", key="k1", account="acct_b"), "w", 13.0)
    assert created and other.id == "job_4"
    assert store.get("job_2") is None and store.get("job_3") is None


def test_concurrent_creates_with_one_key_make_one_job(
        open_store: Callable[[], JobStore]) -> None:
    first, second = open_store(), open_store()
    results = together(lambda: first.create(new_job("job_a", 3, key="k"), "w1", 1.0),
                       lambda: second.create(new_job("job_b", 3, key="k"), "w2", 1.0))
    assert all(isinstance(r, tuple) for r in results), results
    assert sorted(created for _, created in results) == [False, True], results
    assert {job.id for job, _ in results} == {next(j.id for j, c in results if c)}
    assert len(first.list_jobs("acct_a", 10)) == 1


def test_concurrent_creates_of_one_account_never_pass_its_job_bound(
        open_store: Callable[[], JobStore]) -> None:
    stores = [open_store() for _ in range(4)]
    bounds = AccountBounds(max_jobs=3, max_bytes=10_000_000, retention_seconds=60.0)
    results = together(*(partial(stores[i % 4].create, new_job(f"job_{i}", 2), "w", 1.0,
                                 bounds=bounds) for i in range(12)))
    created = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, AccountStoreFull)]
    assert len(created) == 3 and len(refused) == 9, results
    assert len(stores[0].list_jobs("acct_a", 20)) == 3


def test_items_keep_their_order_and_a_long_shared_value_is_stored_once(
        store: JobStore, target: str) -> None:
    image = "data:image/png;base64," + "A" * 5000
    items = [NewItem(spec={"input": {"prompt": f"p{i}", "image": image, "refs": [image]}})
             for i in range(5)]
    store.create(NewJob(id="job_v", account="a", kind="batch", request_id="r", items=items),
                 "w", 1.0)
    stored = stored_column(target, "SELECT value FROM job_values")
    assert sum(image in value for value in stored) == 1  # the template holds its reference
    loaded = store.items("job_v")
    assert [i.index for i in loaded] == list(range(5))
    assert [i.spec["input"]["prompt"] for i in loaded] == [f"p{i}" for i in range(5)]
    assert all(i.spec["input"]["image"] == image and i.spec["input"]["refs"] == [image]
               for i in loaded)
    one = store.item("job_v", 3)
    assert one is not None and one.spec["input"]["image"] == image
    assert store.open_indexes("job_v") == list(range(5))
    assert store.item("job_v", 9) is None


def test_items_store_only_what_differs_from_the_first_and_load_whole(
        store: JobStore, target: str) -> None:
    shared = {"aspect_ratio": "1:1", "output_format": "webp", "guidance": 3.5,
              "go_fast": True, "num_outputs": 1, "note": "x" * 300}
    first = {"model": "flux-dev", "input": {"prompt": "p0", "seed": 1, **shared},
             "stem": "s0", "chain": ["qwen-image"], "routed": None, "notes": []}
    specs = [first] + [{**first, "input": {**first["input"], "prompt": f"p{i}", "seed": i},
                        "stem": f"s{i}"} for i in range(1, 40)]
    # A mixed job: another model, a key the first lacks, and keys of the first left out.
    specs.append({"model": "qwen-image", "input": {"prompt": "other", "width": 512},
                  "stem": "other", "extra": {"k": [1, 2]}})
    specs.append({"model": "flux-dev", "input": "not an object", "stem": "odd"})
    store.create(NewJob(id="job_t", account="a", kind="batch", request_id="r",
                        items=[NewItem(spec=spec) for spec in specs]), "w", 1.0)
    assert [item.spec for item in store.items("job_t")] == specs
    assert all((one := store.item("job_t", i)) is not None and one.spec == specs[i]
               for i in (0, 7, 40, 41))
    sizes = [len(v) for v in stored_column(
        target, "SELECT spec FROM job_items WHERE job_id = 'job_t' ORDER BY idx")]
    whole = len(json.dumps(first))
    assert max(sizes[:40]) < whole / 4, sizes  # a prompt, a seed and a name each


def test_a_job_of_several_insert_chunks_keeps_every_item_its_spec_and_first_claims(
        store: JobStore, target: str) -> None:
    count = 2 * INSERT_CHUNK + 7  # two whole chunks and part of a third
    items = [NewItem(spec={"input": {"prompt": f"p{i}"}}) for i in range(count)]
    job, created = store.create(NewJob(id="job_c", account="a", kind="batch", request_id="r",
                                       items=items), "w", 1.0, first_window=3)
    assert created and job.item_count == count
    loaded = store.items("job_c")
    assert [i.index for i in loaded] == list(range(count))
    assert [i.spec["input"]["prompt"] for i in loaded] == [f"p{i}" for i in range(count)]
    engine = open_engine(target)
    try:
        with engine.connect() as conn:
            claimed = conn.execute(text("SELECT idx FROM job_items WHERE runner = 'w'")).all()
    finally:
        engine.dispose()
    assert sorted(row.idx for row in claimed) == [0, 1, 2]


def test_jobs_are_listed_newest_first_page_by_page(store: JobStore) -> None:
    for i in range(5):
        store.create(new_job(f"job_{i}", account="acct_b" if i == 2 else "acct_a"), "w", float(i))
    page = store.list_jobs("acct_a", 2)
    assert [j.id for j in page] == ["job_4", "job_3"]
    rest = store.list_jobs("acct_a", 10, after=(page[-1].created_at, page[-1].id))
    assert [j.id for j in rest] == ["job_1", "job_0"]
    assert [j.id for j in store.list_jobs(None, 10)] == [f"job_{i}" for i in (4, 3, 2, 1, 0)]
    assert all(j.counts["queued"] == 1 for j in store.list_jobs(None, 10))


# --------------------------------------------------------------------------- running


def test_an_item_starts_records_its_prediction_and_finishes_its_job(store: JobStore) -> None:
    store.create(new_job("job_r", 2, webhook="https://example.test/hook"), "w", 1.0)
    started = store.start_item("job_r", 0, 2.0)
    assert started is not None and started.state == "running" and started.started_at == 2.0
    assert store.get("job_r").state == "running"  # type: ignore[union-attr]
    assert store.record_attempts("job_r", 0, [{"model": "m"}], ("pred_1", "m")) is True
    item = store.item("job_r", 0)
    assert item is not None and (item.prediction_id, item.prediction_model) == ("pred_1", "m")
    assert item.attempts == [{"model": "m"}]
    assert store.finish_item("job_r", 0, ItemOutcome(
        state="succeeded", model_used="m", files=["req/a.png"], cost_usd=0.03, notes=["n"],
        placeholder=True), 3.0) == ItemFinished(open_items=1)
    assert store.finish_job_if_done("job_r", 3.0) is None  # item 1 still queued
    assert store.finish_item("job_r", 1, ItemOutcome(state="failed", error="boom",
                                                     error_type="model_error"), 4.0) == \
        ItemFinished(open_items=0)  # the last: its writer closes the job
    assert store.start_item("job_r", 1, 5.0) is None  # it ended
    done = store.finish_job_if_done("job_r", 6.0)
    assert done is not None and done.state == "partially_failed" and done.finished_at == 6.0
    assert done.webhook_state == "pending"
    assert store.finish_job_if_done("job_r", 7.0) is None  # closed once
    job = store.get("job_r")
    assert job is not None and job.owner is None and job.terminal
    first, second = store.items("job_r")
    assert (first.files, first.cost_usd, first.placeholder, first.notes) == (
        ["req/a.png"], 0.03, True, ["n"])
    assert (second.state, second.error, second.error_type) == ("failed", "boom", "model_error")


def test_an_intent_marks_a_fresh_item_running_and_is_refused_unless_it_may_be_sent(
        store: JobStore) -> None:
    job, _ = store.create(new_job("job_i", 4), "w", 1.0)
    waiting = store.item_to_run("job_i", 0, fence=job.fence)
    assert waiting is not None and waiting.state == "queued"  # a read: still queued
    assert store.get("job_i").state == "queued"  # type: ignore[union-attr]
    intent = [{"model": "m", "status": "creating"}]
    assert store.record_intent("job_i", 0, intent, 2.0, owner="w", fence=job.fence) == "stored"
    item = store.item("job_i", 0)
    assert item is not None and (item.state, item.started_at, item.attempts) == (
        "running", 2.0, intent)
    job_now = store.get("job_i")
    assert job_now is not None and (job_now.state, job_now.started_at) == ("running", 2.0)
    # Another worker, or a stale fence: nothing is written.
    assert store.record_intent("job_i", 1, intent, 3.0, owner="other", fence=job.fence) == \
        "not_ours"
    assert store.record_intent("job_i", 1, intent, 3.0, owner="w", fence=job.fence + 1) == \
        "not_ours"
    assert store.item_to_run("job_i", 1, fence=job.fence + 1) is None
    # Ended meanwhile (canceled while it waited for a slot), then the running one sees the cancel.
    assert store.request_cancel("job_i", 4.0) == [0]
    assert store.item_to_run("job_i", 1, fence=job.fence) is None
    assert store.record_intent("job_i", 1, intent, 5.0, owner="w", fence=job.fence) == "ended"
    assert store.record_intent("job_i", 0, intent * 2, 5.0, owner="w", fence=job.fence) == \
        "canceled"
    assert [i.attempts for i in store.items("job_i")] == [intent, [], [], []]
    # Handed back: the fence is unchanged, but the job is no longer this worker's.
    handed, _ = store.create(new_job("job_h", 1), "w", 1.0)
    store.owners.release_job("job_h", "w")
    assert store.record_intent("job_h", 0, intent, 2.0, owner="w", fence=handed.fence) == \
        "not_ours"
    assert store.item("job_h", 0).state == "queued"  # type: ignore[union-attr]


def test_only_one_of_two_concurrent_closers_gets_the_job(
        open_store: Callable[[], JobStore]) -> None:
    first, second = open_store(), open_store()
    first.create(new_job("job_c", 2), "w", 1.0)
    for index in (0, 1):
        first.finish_item("job_c", index, OK, 2.0)
    results = together(lambda: first.finish_job_if_done("job_c", 3.0),
                       lambda: second.finish_job_if_done("job_c", 3.0))
    assert sum(r is not None for r in results) == 1, results


def test_cancel_drops_queued_items_and_ends_canceled_only_once_confirmed(
        store: JobStore) -> None:
    store.create(new_job("job_x", 3), "w", 1.0)
    store.start_item("job_x", 0, 2.0)
    store.record_attempts("job_x", 0, [], ("pred_x", "m"))
    assert store.request_cancel("job_x", 3.0) == [0]
    assert store.cancel_requested("job_x") and store.cancel_requested("job_missing")
    job = store.get("job_x")
    assert job is not None and job.state == "cancel_requested" and job.counts["canceled"] == 2
    assert store.open_indexes("job_x") == [0]
    store.finish_item("job_x", 0, ItemOutcome(state="canceled", error_type="canceled"), 4.0)
    done = store.finish_job_if_done("job_x", 4.0)
    assert done is not None and done.state == "canceled"
    # A cancel never seen to stop on Replicate is not "canceled".
    store.create(new_job("job_u", 1), "w", 1.0)
    store.start_item("job_u", 0, 2.0)
    store.request_cancel("job_u", 3.0)
    store.finish_item("job_u", 0, ItemOutcome(state="failed", error_type=CANCEL_UNCONFIRMED),
                      4.0)
    unconfirmed = store.finish_job_if_done("job_u", 4.0)
    assert unconfirmed is not None and unconfirmed.state == "failed"


def test_files_belong_to_the_job_that_wrote_them_last(store: JobStore) -> None:
    store.create(new_job("job_f1"), "w", 1.0)
    store.create(new_job("job_f2"), "w", 1.0)
    store.finish_item("job_f1", 0, ItemOutcome(state="succeeded", files=["r/1.png", "r/2.png"]),
                      2.0)
    assert store.file_job("r/1.png") == "job_f1" and store.file_job("r/none.png") is None
    store.finish_item("job_f2", 0, ItemOutcome(state="succeeded", files=["r/2.png"]), 3.0)
    assert store.file_job("r/2.png") == "job_f2" and store.file_job("r/1.png") == "job_f1"


def test_state_counts_and_prediction_ids_span_every_job(store: JobStore) -> None:
    store.create(new_job("job_s1", 2), "w", 1.0)
    store.create(new_job("job_s2", 1, account="acct_b"), "w", 100.0)
    store.start_item("job_s1", 0, 2.0)
    store.record_attempts("job_s1", 0, [], ("pred_old", "m"))
    store.start_item("job_s2", 0, 101.0)
    store.record_attempts("job_s2", 0, [], ("pred_b", "m"))
    store.finish_item("job_s2", 0, OK, 102.0)
    store.finish_job_if_done("job_s2", 102.0)
    jobs, items = store.state_counts()
    assert jobs == {"running": 1, "succeeded": 1}
    assert items == {"running": 1, "queued": 1, "succeeded": 1}
    assert store.prediction_ids("acct_a", 0.0) == {"pred_old"}
    assert store.prediction_ids("acct_a", 50.0) == set()
    assert store.prediction_ids("acct_b", 50.0) == {"pred_b"}


# --------------------------------------------------------------------------- owners and fencing


def make_orphan(store: JobStore, job_id: str, origin: str, owner: str, now: float) -> None:
    store.create(new_job(job_id, origin=origin), owner, now)


def test_orphans_are_claimed_by_their_own_origin_only_and_once(store: JobStore) -> None:
    owners = store.owners
    owners.heartbeat("dead", 0.0)
    make_orphan(store, "job_service", "service", "dead", 0.0)
    make_orphan(store, "job_script", "library", "dead", 0.0)
    owners.heartbeat("alive", 100.0)
    make_orphan(store, "job_alive", "service", "alive", 100.0)
    assert owners.claim_orphans("script", ["acct_a"], 100.0, 30.0, "library") == ["job_script"]
    assert owners.claim_orphans("svc", ["acct_b"], 100.0, 30.0, "service") == []
    assert owners.claim_orphans("svc", ["acct_a"], 100.0, 30.0, "service") == ["job_service"]
    assert owners.owner("job_service") == "svc" and owners.fence_of("job_service") == 2
    owners.heartbeat("svc", 100.0)
    owners.heartbeat("script", 100.0)
    assert owners.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == []
    owners.retire("svc")
    assert owners.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == ["job_service"]
    assert owners.fence_of("job_service") == 3 and owners.fence_of("job_alive") == 1
    owners.release_job("job_service", "someone else")
    assert owners.owner("job_service") == "other"
    owners.release_job("job_service", "other")
    assert owners.owner("job_service") is None
    assert owners.fence_of("job_missing") == 0


def test_two_stores_claiming_at_once_take_every_orphan_exactly_once(
        open_store: Callable[[], JobStore]) -> None:
    first, second = open_store(), open_store()
    for i in range(40):
        first.create(new_job(f"job_{i:02}"), "gone", 1.0)  # an owner that never beat
    first.owners.heartbeat("a", 100.0)
    first.owners.heartbeat("b", 100.0)
    results = together(lambda: first.owners.claim_orphans("a", ["acct_a"], 100.0, 30.0),
                       lambda: second.owners.claim_orphans("b", ["acct_a"], 100.0, 30.0))
    claimed_a, claimed_b = results
    assert isinstance(claimed_a, list) and isinstance(claimed_b, list), results
    assert not set(claimed_a) & set(claimed_b)
    assert sorted(claimed_a + claimed_b) == [f"job_{i:02}" for i in range(40)]
    assert {first.owners.fence_of(job_id) for job_id in claimed_a + claimed_b} == {2}
    assert {first.owners.owner(job_id) for job_id in claimed_a} <= {"a"}
    assert together(lambda: first.owners.claim_orphans("a", ["acct_a"], 101.0, 30.0),
                    lambda: second.owners.claim_orphans("b", ["acct_a"], 101.0, 30.0)) == [[], []]


def test_processes_claiming_one_job_at_once_get_every_item_once(
        open_store: Callable[[], JobStore]) -> None:
    first, second = open_store(), open_store()
    first.create(new_job("job_c", 30), "owner", 1.0)
    results = together(*(partial(store.claims.claim, "job_c", name, 4, fence=1)
                         for store in (first, second) for name in ("a", "b", "c", "d")))
    assert all(isinstance(r, list) for r in results), results
    claimed = [index for batch in results for index in batch]
    assert sorted(claimed) == list(range(30)) and len(claimed) == 30
    assert first.claims.claim("job_c", "e", 4, fence=1) == []
    assert first.claims.claim("job_c", "e", 4, fence=2) == []  # a stale fence claims nothing


def test_only_an_items_runner_writes_it_and_a_dead_runners_items_return_to_the_owner(
        store: JobStore) -> None:
    store.create(new_job("job_r", 4), "owner", 1.0)
    store.owners.heartbeat("owner", 1.0)
    store.owners.heartbeat("helper", 1.0)
    assert store.claims.claim("job_r", "helper", 2, fence=1) == [0, 1]
    assert store.item_to_run("job_r", 0, fence=1, runner="owner") is None
    assert store.record_intent("job_r", 0, [{"a": 1}], 2.0, owner="owner", fence=1) == "not_ours"
    assert store.record_intent("job_r", 0, [{"a": 1}], 2.0, owner="helper", fence=1) == "stored"
    assert not store.finish_item("job_r", 0, OK, 3.0, fence=1, runner="owner")
    assert store.claims.runs("job_r", 0, "helper", 1) and not store.claims.runs("job_r", 0,
                                                                                "owner", 1)
    store.claims.give_back("helper", ["job_r"])  # the unstarted item 1 only
    assert store.claims.claim("job_r", "owner", 9, fence=1, as_owner=True) == [1, 2, 3]
    # The helper stops beating: its started item goes back to the job's owner.
    store.owners.heartbeat("owner", 100.0)
    assert store.owners.claim_orphans("owner", ["acct_a"], 100.0, 30.0) == []
    assert store.claims.free_dead_runners("owner") == ["job_r"]
    assert store.claims.claim("job_r", "owner", 9, fence=1, as_owner=True) == [0]
    assert store.finish_item("job_r", 0, OK, 101.0, fence=1, runner="owner")


def test_a_helper_is_offered_only_live_owners_open_uncanceled_jobs(store: JobStore) -> None:
    for job_id, owner in (("job_1", "a"), ("job_2", "a"), ("job_3", "dead"), ("job_4", "b")):
        store.create(new_job(job_id, 2), owner, 1.0)
    for worker in ("a", "b"):
        store.owners.heartbeat(worker, 1.0)
    store.request_cancel("job_2", 2.0)
    assert store.claims.to_help("b", ["acct_a"], "service") == [("job_1", 1)]
    assert store.claims.to_help("b", ["acct_other"], "service") == []
    assert store.claims.claim("job_1", "b", 5, fence=1) == [0, 1]
    assert store.claims.to_help("b", ["acct_a"], "service") == []


def test_a_new_jobs_first_window_is_its_owners_and_given_back_items_are_left_behind(
        store: JobStore) -> None:
    store.create(new_job("job_w", 5), "a", 1.0, first_window=3)
    store.create(new_job("job_v", 2), "a", 1.0, first_window=3)
    store.owners.heartbeat("a", 1.0)
    store.owners.heartbeat("b", 1.0)
    assert store.claims.runs("job_w", 2, "a", 1) and not store.claims.runs("job_w", 2, "b", 1)
    assert store.claims.claim("job_w", "b", 9, fence=1) == [3, 4]
    # Nothing unclaimed: nothing left behind, whatever runs here.
    assert store.claims.left_behind("a", []) == []
    store.claims.give_back("b")
    assert store.claims.left_behind("a", []) == [("job_w", 1)]
    assert store.claims.left_behind("a", ["job_w"]) == []  # a window here claims them itself
    assert store.claims.left_behind("b", []) == []  # only the owner takes them back this way
    assert store.claims.claim("job_w", "a", 9, fence=1, as_owner=True) == [3, 4]


def test_a_stale_owner_changes_nothing_once_another_claimed_its_job(store: JobStore) -> None:
    job, _ = store.create(new_job("job_f", 3), "old", 0.0)
    store.owners.heartbeat("old", 0.0)
    assert job.fence == store.owners.fence_of("job_f") == 1
    assert store.start_item("job_f", 0, 1.0, fence=1) is not None
    assert store.record_attempts("job_f", 0, [{"a": 1}], ("pred_1", "m"), fence=1)
    store.owners.heartbeat("new", 100.0)
    assert store.owners.claim_orphans("new", ["acct_a"], 100.0, 30.0) == ["job_f"]
    assert store.owners.fence_of("job_f") == 2
    before = store.items("job_f")
    # Every late write of the old owner is fenced off, and says so.
    assert store.start_item("job_f", 1, 101.0, fence=1) is None
    assert store.record_attempts("job_f", 0, [], None, fence=1) is False
    assert store.finish_item("job_f", 0, ItemOutcome(state="failed", files=["r/x"]), 101.0,
                             fence=1) is None
    assert store.owners.fail_queued_items("new", "acct_a", OK, 101.0, fence={"job_f": 1}) == []
    assert store.finish_job_if_done("job_f", 101.0, fence=1) is None
    assert store.items("job_f") == before and store.file_job("r/x") is None
    assert store.get("job_f").state == "running"  # type: ignore[union-attr]
    # The new owner's writes (and unfenced ones, as before fencing) apply.
    assert store.record_attempts("job_f", 0, [{"a": 2}], ("pred_1", "m"), fence=2)
    assert store.finish_item("job_f", 0, OK, 102.0, fence=2)
    assert store.start_item("job_f", 1, 102.0, fence=2) is not None
    assert store.finish_item("job_f", 1, OK, 103.0)
    assert store.owners.fail_queued_items("new", "acct_a", ItemOutcome(
        state="failed", error="token rejected", error_type="auth"), 104.0,
        fence={"job_f": 2}) == ["job_f"]
    done = store.finish_job_if_done("job_f", 105.0, fence=2)
    assert done is not None and done.state == "partially_failed"
    assert [i.state for i in store.items("job_f")] == ["succeeded", "succeeded", "failed"]


def test_failing_queued_items_touches_only_the_workers_open_jobs(store: JobStore) -> None:
    store.create(new_job("job_mine", 2), "me", 1.0)
    store.create(new_job("job_theirs", 1), "them", 1.0)
    store.create(new_job("job_other_acct", 1, account="acct_b"), "me", 1.0)
    store.start_item("job_mine", 0, 2.0)
    outcome = ItemOutcome(state="failed", error="rejected", error_type="auth")
    assert store.owners.fail_queued_items("me", "acct_a", outcome, 3.0) == ["job_mine"]
    assert [i.state for i in store.items("job_mine")] == ["running", "failed"]
    assert [i.state for i in store.items("job_theirs")] == ["queued"]
    assert [i.state for i in store.items("job_other_acct")] == ["queued"]


# --------------------------------------------------------------------------- webhooks, retention


def test_a_webhook_is_claimed_by_one_deliverer_at_a_time_until_done(
        open_store: Callable[[], JobStore]) -> None:
    store, other = open_store(), open_store()
    store.create(new_job("job_w", webhook="https://example.test/h"), "w", 1.0)
    store.finish_item("job_w", 0, OK, 2.0)
    store.finish_job_if_done("job_w", 2.0)
    assert store.outbox.next_webhook_at() == 2.0
    claims = together(lambda: store.outbox.claim_webhook(3.0, 120.0),
                      lambda: other.outbox.claim_webhook(3.0, 120.0))
    assert sum(c is not None for c in claims) == 1, claims
    claimed = next(c for c in claims if c is not None)
    assert claimed.id == "job_w" and claimed.counts["succeeded"] == 1
    assert store.outbox.claim_webhook(4.0, 120.0) is None  # leased
    assert store.outbox.next_webhook_at() == 123.0
    store.outbox.webhook_done("job_w", "pending", 1, 10.0, "HTTP 500")
    again = store.outbox.claim_webhook(10.0, 120.0)
    assert again is not None and again.webhook_attempts == 1 and again.webhook_error == "HTTP 500"
    assert store.retention.expired(1000.0) == []  # awaiting its webhook
    store.outbox.webhook_done("job_w", "delivered", 2, None, None)
    assert (store.outbox.next_webhook_at() is None
            and store.outbox.claim_webhook(1000.0, 1.0) is None)
    assert store.retention.expired(1000.0) == [("job_w", "req_job_w")]


def test_expired_jobs_are_listed_and_deleted_with_everything_they_own(
        store: JobStore, target: str) -> None:
    image = "x" * 3000
    store.create(new_job("job_old", 2, spec={"input": {"image": image}}), "w", 1.0)
    store.create(new_job("job_new"), "w", 1.0)
    store.create(new_job("job_open"), "w", 1.0)
    for job_id, at in (("job_old", 10.0), ("job_new", 500.0)):
        for index in range(len(store.items(job_id))):
            store.finish_item(job_id, index, ItemOutcome(
                state="succeeded", files=[f"{job_id}/{index}.png"]), at)
        store.finish_job_if_done(job_id, at)
    assert store.retention.expired(100.0) == [("job_old", "req_job_old")]
    assert len(store.retention.expired(1000.0, limit=1)) == 1
    store.retention.delete(["job_old"])
    assert store.get("job_old") is None and store.items("job_old") == []
    assert store.file_job("job_old/0.png") is None and store.file_job("job_new/0.png")
    assert rows(target, "job_values") == 0
    assert store.retention.expired(1000.0) == [("job_new", "req_job_new")]


# --------------------------------------------------------------------------- health


def test_the_store_names_its_backend_and_checks_and_probes_it(store: JobStore,
                                                              target: str) -> None:
    assert store.db.backend == ("sqlite" if "://" not in target else "postgresql")
    store.db.check()
    store.db.probe_write()
    store.db.probe_write()


def test_targets_are_paths_or_urls_and_a_url_never_shows_its_password(tmp_path: Path) -> None:
    url = database_url("postgresql://me:s3cr3t@db.example:5433/jobs")
    assert url.drivername == "postgresql+psycopg" and url.port == 5433
    assert "s3cr3t" not in repr(url)
    assert database_url("postgres://me@db/jobs").drivername == "postgresql+psycopg"
    with pytest.raises(ValueError) as bad:
        database_url("postgresql://me:s3cr3t@db:notaport/jobs")
    assert "s3cr3t" not in str(bad.value)
    with pytest.raises(ValueError):
        JobStore(":memory:")
    via_url = JobStore(f"sqlite:///{tmp_path}/a/state.sqlite3")
    assert via_url.db.backend == "sqlite" and (tmp_path / "a" / "state.sqlite3").exists()
    via_url.close()


# --------------------------------------------------------------------------- migrations


def test_an_old_state_file_is_adopted_with_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        for statement in OLD_SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO jobs (id, account, kind, state, request_id, item_count, owner,"
                     " created_at, idempotency_key, request_hash) VALUES ('job_old', 'acct_a',"
                     " 'batch', 'running', 'r', 2, 'gone', 1.0, 'k', 'h')")
        conn.executemany("INSERT INTO job_items (job_id, idx, spec, state, prediction_id,"
                         " queued_at) VALUES ('job_old', ?, '{\"n\": 1}', ?, ?, 1.0)",
                         [(0, "running", "pred_0"), (1, "queued", None)])
        conn.execute("INSERT INTO job_files VALUES ('r/0.png', 'job_old')")
        conn.execute("INSERT INTO job_workers VALUES ('gone', 1.0)")
    conn.close()
    store = JobStore(str(path))
    job = store.get("job_old")
    assert job is not None and job.state == "running" and job.fence == 0
    assert [(i.state, i.prediction_id) for i in store.items("job_old")] == [
        ("running", "pred_0"), ("queued", None)]
    assert store.file_job("r/0.png") == "job_old"
    assert store.create(new_job("job_dup", key="k"), "w", 2.0)[0].id == "job_old"
    assert store.owners.claim_orphans("w", ["acct_a"], 100.0, 30.0) == ["job_old"]
    assert store.owners.fence_of("job_old") == 1
    store.close()
    assert migrate(str(path)) == HEAD


def test_migrating_twice_changes_nothing(target: str) -> None:
    assert migrate(target) == HEAD
    store = JobStore(target)
    store.create(new_job("job_m"), "w", 1.0)
    assert migrate(target) == HEAD
    assert migrate(target) == HEAD
    assert rows(target, "alembic_version") == 1 and store.get("job_m") is not None
    store.close()


START_UP = """
import sys, time
from replicate_generation.jobs.store import ItemFinished, JobStore
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
store = JobStore(sys.argv[1])
store.owners.heartbeat(sys.argv[3], 1.0)
store.close()
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_start_ups_on_a_new_database_all_succeed(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        new = str(tmp_path / "new.sqlite3")
    else:
        new = request.getfixturevalue("shared_server")()
    at = time.time() + 3.0  # past every process's imports: they open the store together
    procs = [subprocess.Popen([sys.executable, "-c", START_UP, new, str(at), f"w{i}"],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert rows(new, "alembic_version") == 1 and rows(new, "job_workers") == 4
    assert migrate(new) == HEAD


# --------------------------------------------------------------------------- PostgreSQL down


@pytest.fixture
def private_server() -> Iterator[pg_server.PrivateServer]:
    if not pg_server.available():
        missing("PostgreSQL 15 binaries are not installed")
    server = pg_server.PrivateServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def test_a_stopped_server_is_unavailable_and_the_same_store_works_once_it_is_back(
        private_server: pg_server.PrivateServer, caplog: pytest.LogCaptureFixture) -> None:
    url = private_server.url(password="never-sh0wn")
    store = JobStore(url)
    store.create(new_job("job_down", 2), "w", 1.0)
    private_server.stop()
    for call in (lambda: store.get("job_down"), store.db.check, store.db.probe_write,
                 lambda: store.owners.heartbeat("w", 2.0), lambda: JobStore(url),
                 lambda: store.create(new_job("job_lost"), "w", 2.0)):
        with pytest.raises(StoreUnavailable) as down:
            call()
        assert down.value.dependency == "postgresql"
        assert "never-sh0wn" not in str(down.value) and down.value.__cause__ is None
    # A patient write (a paid prediction's id) waits for the server instead of failing.
    waited: list[bool] = []

    def record() -> None:
        with patient_writes():
            waited.append(store.record_attempts("job_down", 0, [], ("pred_kept", "m")))

    writer = threading.Thread(target=record)
    writer.start()
    writer.join(1.5)
    assert writer.is_alive()
    private_server.start()
    writer.join(30)
    assert waited == [True]
    store.db.check()
    item = store.item("job_down", 0)
    assert item is not None and item.prediction_id == "pred_kept"
    assert store.create(new_job("job_after"), "w", 3.0)[1]
    store.close()
    assert "never-sh0wn" not in caplog.text


# --------------------------------------------------------------------------- fork


def backend_session(store: JobStore) -> object:
    """Which connection the pool hands out: PostgreSQL's backend pid, SQLite's connection."""
    with store.db.engine.connect() as conn:  # the pool, as the store's calls use it
        if store.db.backend == "postgresql":
            return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        return id(conn.connection.driver_connection)


def test_a_forked_child_opens_its_own_connections_and_leaves_the_parents_alone(
        store: JobStore) -> None:
    store.create(new_job("job_fork"), "w", 1.0)
    before = backend_session(store)
    pid = os.fork()
    if pid == 0:  # the child: any failure is its exit status
        try:
            ok = backend_session(store) != before and store.get("job_fork") is not None
            store.owners.heartbeat("child", 2.0)
            os._exit(0 if ok else 1)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection survived the child (not closed nor reused by it).
    assert backend_session(store) == before
    store.owners.heartbeat("w", 2.0)
    assert store.owners.claim_orphans("x", ["acct_a"], 2.0, 30.0) == []
    assert store.state_counts()[0] == {"queued": 1}


# --------------------------------------------------------------------------- issued keys


def test_a_minted_key_opens_with_its_secret_only_and_keeps_no_copy_of_it(
        open_store: Callable[[], JobStore], target: str) -> None:
    store = open_store()
    key, secret = store.keys.mint({"name": "renderer", "models": ["flux-dev"]}, now=100.0)
    assert secret.startswith("rgk_") and len(secret) > 40
    assert key.prefix == secret[:10] and key.models == ("flux-dev",) and key.weight == 1.0
    other = open_store()  # another process's view
    assert other.keys.authenticate(secret, now=101.0) == key
    assert other.keys.authenticate(secret[:-1] + "x", now=101.0) is None
    engine = open_engine(target)
    with engine.connect() as conn:
        stored = repr(conn.execute(text("SELECT * FROM api_keys")).all())
    engine.dispose()
    assert secret not in stored and secret[10:] not in stored


def test_a_live_name_belongs_to_one_key(store: JobStore) -> None:
    first, _ = store.keys.mint({"name": "svc"}, now=1.0)
    with pytest.raises(KeyNameTaken):
        store.keys.mint({"name": "svc"}, now=2.0)
    second, _ = store.keys.mint({"name": "svc-2"}, now=2.0)
    with pytest.raises(KeyNameTaken):
        store.keys.update(second.id, {"name": "svc"}, now=3.0)
    assert store.keys.revoke(first.id, now=4.0) is not None
    assert store.keys.mint({"name": "svc"}, now=5.0)[0].name == "svc"  # a revoked name is free


def test_revoked_and_expired_keys_open_nothing(open_store: Callable[[], JobStore]) -> None:
    store, other = open_store(), open_store()
    key, secret = store.keys.mint({"name": "a", "expires_at": 50.0}, now=1.0)
    assert other.keys.authenticate(secret, now=49.0) is not None
    assert other.keys.authenticate(secret, now=50.0) is None
    live, live_secret = store.keys.mint({"name": "b"}, now=1.0)
    assert store.keys.revoke(live.id, now=2.0) is not None
    assert other.keys.authenticate(live_secret, now=2.0) is None
    assert store.keys.revoke(live.id, now=3.0) is None  # already revoked
    assert store.keys.update(live.id, {"weight": 2.0}, now=3.0) is None


def test_a_rotated_key_accepts_its_old_secret_for_the_grace_only(store: JobStore) -> None:
    key, old = store.keys.mint({"name": "a"}, now=1.0)
    rotated = store.keys.rotate(key.id, grace_seconds=60.0, now=10.0)
    assert rotated is not None
    after, new = rotated
    assert new != old and after.prefix == new[:10] and after.previous_until == 70.0
    assert store.keys.authenticate(new, now=11.0) == after
    assert store.keys.authenticate(old, now=69.0) == after
    assert store.keys.authenticate(old, now=70.0) is None
    again = store.keys.rotate(key.id, grace_seconds=0, now=80.0)
    assert again is not None and store.keys.authenticate(new, now=80.0) is None
    assert store.keys.revoke(key.id, now=90.0) is not None
    assert store.keys.rotate(key.id, grace_seconds=5, now=91.0) is None


def test_an_issued_keys_jobs_and_idempotency_keys_are_its_own(store: JobStore) -> None:
    mine = NewJob(id="j1", account="acct", kind="batch", request_id="r1",
                  items=[NewItem(spec={"n": 0})], idempotency_key="k1/same", request_hash="h",
                  key_id="k1")
    theirs = NewJob(id="j2", account="acct", kind="batch", request_id="r2",
                    items=[NewItem(spec={"n": 0})], idempotency_key="k2/same",
                    request_hash="h", key_id="k2")
    assert store.create(mine, "w", 1.0)[1] and store.create(theirs, "w", 2.0)[1]
    assert [j.id for j in store.list_jobs("acct", 10, key_id="k1")] == ["j1"]
    assert [j.id for j in store.list_jobs("acct", 10)] == ["j2", "j1"]
    job = store.get("j1")
    assert job is not None and job.key_id == "k1"
    forged = NewJob(id="j3", account="acct", kind="batch", request_id="r3",
                    items=[NewItem(spec={"n": 0})], idempotency_key="k1/same",
                    request_hash="h", key_id="k2")
    with pytest.raises(IdempotencyConflict):
        store.create(forged, "w", 3.0)


def test_the_audit_log_reads_newest_first_in_pages(store: JobStore) -> None:
    for i in range(5):
        store.audit.append("admin", "key.minted", f"key_{i}", {"name": f"n{i}"}, now=float(i))
    first = store.audit.newest(2)
    assert [r["target"] for r in first] == ["key_4", "key_3"]
    assert first[0]["details"] == {"name": "n4"} and first[0]["actor"] == "admin"
    assert [r["target"] for r in store.audit.newest(10, before=first[-1]["id"])] == [
        "key_2", "key_1", "key_0"]
