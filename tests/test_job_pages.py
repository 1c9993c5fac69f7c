"""Reading a job costs the same whatever its size: GET /jobs/<id> shows the kept counts and cost
and a bounded first page, GET /jobs/<id>/items pages through the rest by cursor (and by state),
and the lists and /metrics read indexes and kept totals, never every job (EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, text

from conftest import ADMIN, ADMIN_KEY, OTHER, SERVER_TOKEN, USER, HeldClock
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.http.ended_pages import EndedPages
from replicate_generation.jobs import migrations
from replicate_generation.jobs.rows import ItemOutcome, NewItem, NewJob
from replicate_generation.jobs.schema import PG_POOL_OVERFLOW, PG_POOL_SIZE, open_engine
from replicate_generation.jobs.store import JobStore
from replicate_generation.settings import Settings
from replicate_generation.sqlite_db import WRITE_PATIENCE_S
from servers import ROOT, Gunicorn, service_env, wait_for
from shared_backends import postgres_database
from test_job_store_contract import together

# What GET /jobs/<id> of a 1,000-item job may weigh: the summary and 50 items, not 1,000.
SUMMARY_BYTES_MAX = 64 * 1024
ENDED = ("succeeded", "partially_failed", "failed", "canceled")


def _batch(client: FlaskClient, prompts: list[str], headers: dict[str, str] = USER) -> str:
    response = client.post("/generate-batch", headers=headers, json={
        "model_name": "flux-dev", "prompts": prompts, "async": True})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def _job(client: FlaskClient, job_id: str, headers: dict[str, str] = USER) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def _ended(client: FlaskClient, job_id: str, headers: dict[str, str] = USER) -> dict[str, Any]:
    return dict(wait_for(lambda: (job := _job(client, job_id, headers))["state"] in ENDED and job,
                         what=f"job {job_id} to end"))


def _walk(client: FlaskClient, job_id: str, limit: int, state: str | None = None,
          headers: dict[str, str] = USER) -> list[dict[str, Any]]:
    """Every item, page after page, following each answer's next link."""
    items: list[dict[str, Any]] = []
    url: str | None = f"/jobs/{job_id}/items?limit={limit}" + (f"&state={state}" if state else "")
    while url is not None:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        assert len(page["data"]) <= limit
        assert page["has_more"] == (page["next"] is not None) == (page["next_cursor"] is not None)
        if page["has_more"]:
            assert page["next_cursor"] == str(page["data"][-1]["index"])
        items += page["data"]
        url = page["next"]
    return items


def _tally(items: list[dict[str, Any]]) -> dict[str, int]:
    counted = Counter(item["state"] for item in items)
    return {state: counted.get(state, 0) for state in
            ("queued", "running", "succeeded", "failed", "canceled", "expired")}


@pytest.fixture
def held_app(make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> Flask:
    """The service on a simulator whose predictions run until the test lets them end."""
    sim, _ = held_sim
    return make_app(replicate_base_url=sim.base_url, concurrent_limit=3)


def test_a_big_jobs_answer_stays_small_and_its_pages_walk_every_item_once(
        held_app: Flask) -> None:
    client = held_app.test_client()
    job_id = _batch(client, [f"prompt {i}" for i in range(1000)])
    response = client.get(f"/jobs/{job_id}", headers=USER)
    assert response.status_code == 200
    assert len(response.data) < SUMMARY_BYTES_MAX, len(response.data)
    job = response.get_json()
    assert job["total"] == 1000 and sum(job["counts"].values()) == 1000
    assert [item["index"] for item in job["items"]] == list(range(50))
    assert job["items_has_more"] and job["items_next"] == f"/jobs/{job_id}/items?after=49&limit=50"

    items = _walk(client, job_id, limit=97)
    assert [item["index"] for item in items] == list(range(1000))  # no gap, no duplicate
    assert [item["prompt"] for item in items[995:]] == [f"prompt {i}" for i in range(995, 1000)]

    canceled = client.post(f"/jobs/{job_id}/cancel", headers=USER)
    assert canceled.status_code == 200 and len(canceled.data) < SUMMARY_BYTES_MAX
    job = _ended(client, job_id)
    items = _walk(client, job_id, limit=500)
    assert job["state"] == "canceled" and job["counts"] == _tally(items)
    assert job["counts"]["canceled"] >= 997  # all but the three that may have been created
    only_canceled = _walk(client, job_id, limit=333, state="canceled")
    assert {item["state"] for item in only_canceled} == {"canceled"}
    assert len(only_canceled) == job["counts"]["canceled"]
    assert [i["index"] for i in only_canceled] == sorted(
        i["index"] for i in items if i["state"] == "canceled")


def test_counts_and_cost_are_the_items_after_completion_and_a_retry(client: FlaskClient) -> None:
    prompts = ["one", "two #fail", "three", "four #fail", "five", "six"]
    job_id = _batch(client, prompts)
    job = _ended(client, job_id)
    items = _walk(client, job_id, limit=4)
    assert job["state"] == "partially_failed"
    assert job["counts"] == _tally(items) == {**_tally([]), "succeeded": 4, "failed": 2}
    assert not job["items_has_more"] and job["items_next"] is None and len(job["items"]) == 6
    # The list, the job and its items agree on the cost: one kept sum, not three.
    cost = round(sum(item["cost_usd"] or 0.0 for item in items), 6)
    listed = next(j for j in client.get("/jobs", headers=USER).get_json()["data"]
                  if j["id"] == job_id)
    assert listed["cost_usd"] == job["cost_usd"] == cost > 0
    assert listed["counts"] == job["counts"]
    assert [i["index"] for i in _walk(client, job_id, limit=10, state="failed")] == [1, 3]

    retried = client.post(f"/jobs/{job_id}/retry", headers=USER)
    assert retried.status_code == 202
    again = _ended(client, retried.get_json()["id"])
    assert again["counts"] == _tally(_walk(client, again["id"], limit=1))
    assert again["counts"]["failed"] == 2 and again["total"] == 2


def test_a_bad_cursor_limit_or_state_is_a_clear_400_and_a_strangers_job_a_404(
        client: FlaskClient) -> None:
    job_id = _batch(client, ["a", "b", "c"])
    for query, field in [("after=-1", "after"), ("after=abc", "after"), ("after=1.5", "after"),
                         ("after=" + "9" * 30, "after"), ("limit=0", "limit"),
                         ("limit=501", "limit"), ("limit=x", "limit"), ("state=done", "state")]:
        response = client.get(f"/jobs/{job_id}/items?{query}", headers=USER)
        assert response.status_code == 400, query
        body = response.get_json()
        assert body["field"] == field and field in body["error"], body
    assert client.get(f"/jobs/{job_id}/items?after=999", headers=USER).get_json() == {
        "object": "list", "job_id": job_id, "data": [], "has_more": False,
        "next_cursor": None, "next": None}
    assert client.get(f"/jobs/{job_id}/items", headers=OTHER).status_code == 404
    assert client.get(f"/jobs/{job_id}/items").status_code == 401
    assert client.get("/jobs/job_nothing/items", headers=USER).status_code == 404
    _ended(client, job_id)


def test_the_console_reads_a_jobs_items_a_page_at_a_time(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    assert client.post("/console/sign-in", data={
        "csrf_token": csrf.group(1), "kind": "admin", "key": ADMIN_KEY}).status_code == 303
    job_id = _batch(client, ["p0", "p1", "p2"], ADMIN)
    first = client.get(f"/console/api/jobs/{job_id}/items?limit=2").get_json()
    assert [i["index"] for i in first["data"]] == [0, 1] and first["next_cursor"] == "1"
    rest = client.get("/console/api" + first["next"]).get_json()
    assert [i["index"] for i in rest["data"]] == [2] and rest["next"] is None
    with client.get("/console/static/job.js") as script:
        assert "items_next" in script.get_data(as_text=True)  # the job page pages on
    _ended(client, job_id, ADMIN)


# --------------------------------------------------------------------------- query plans


@contextmanager
def _statements(engines: tuple[Engine, ...]) -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement the store's engines (writes, reads) run meanwhile for this thread
    (the test client's requests, not the service's background work), with its parameters."""
    seen: list[tuple[str, Any]] = []
    mine = threading.get_ident()

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               _many: bool) -> None:
        if threading.get_ident() == mine:
            seen.append((statement, parameters))

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def _plans(engine: Engine, statements: list[tuple[str, Any]], table: str) -> list[list[str]]:
    """The plan of each SELECT that reads `table`, a line per step: SQLite's EXPLAIN QUERY PLAN,
    or PostgreSQL's plan nodes with sequential scans and sorts priced out (the tables here are
    small: the question is whether an index can serve it, not whether the planner prefers one)."""
    plans = []
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
        for statement, parameters in statements:
            if statement.lstrip().upper().startswith("SELECT") and f"FROM {table}" in statement:
                plans.append(_plan(conn, statement, parameters))
    return plans


def _plan(conn: Any, statement: str, parameters: Any) -> list[str]:
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        return [str(row[3]) for row in rows]
    (document,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
    steps: list[str] = []
    nodes = [document[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        steps.append(f"{node['Node Type']} {node.get('Relation Name', '')} "
                     f"{node.get('Index Name', '')}".strip())
        nodes += node.get("Plans", [])
    return steps


def _uses_an_index_only(plan: list[str], table: str) -> bool:
    """Each step searches or walks an index: no scan of the table, no sort of what it read."""
    return all("TEMP B-TREE" not in step and not step.startswith(("Sort", f"Seq Scan {table}"))
               and not (step.startswith(f"SCAN {table}") and "USING" not in step)
               for step in plan)


def _store_many_jobs(app: Flask, count: int) -> None:
    """Finished jobs of two accounts, made through the app's store (what long use leaves)."""
    store = app.extensions["jobs"].store
    for n in range(count):
        job = NewJob(id=f"job_old{n:05d}", account=f"acct_{n % 2}", kind="batch",
                     request_id=f"req_old{n}", items=[NewItem(spec={"n": n})])
        store.create(job, "elsewhere", 1000.0 + n)
        store.finish_item(job.id, 0, ItemOutcome(state="succeeded"), 1000.5 + n)
        assert store.finish_job_if_done(job.id, 1000.5 + n) is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lists_and_metrics_read_indexes_and_kept_counts_not_every_job(
        make_app: Callable[..., Flask], backend: str) -> None:
    with contextlib.ExitStack() as stack:
        overrides = ({} if backend == "sqlite" else
                     {"database_url": stack.enter_context(postgres_database())})
        app = make_app(**overrides)
        stack.callback(app.extensions["jobs"].close)  # before its database goes
        # PostgreSQL commits each write to disk: fewer stored jobs keep the test short.
        _assert_lists_read_indexes(app, stored=300 if backend == "sqlite" else 40)


def _assert_lists_read_indexes(app: Flask, stored: int) -> None:
    client = app.test_client()
    _store_many_jobs(app, stored)
    job_id = _batch(client, ["a", "b"])
    _ended(client, job_id)
    db = app.extensions["jobs"].store.db
    engine = db.engine
    with _statements(db.engines) as seen:
        first = client.get("/jobs?limit=5", headers=ADMIN).get_json()
        assert len(first["data"]) == 5 and first["has_more"]
        assert client.get(first["next"], headers=ADMIN).status_code == 200
        mine = client.get("/jobs?limit=1", headers=USER).get_json()
        assert [j["id"] for j in mine["data"]] == [job_id]
        assert client.get(mine["next"] or f"/jobs?after={job_id}", headers=USER).status_code == 200
    lists = _plans(engine, seen, "jobs")
    assert len(lists) >= 4, lists
    for plan in lists:
        assert _uses_an_index_only(plan, "jobs"), plan
    assert any("jobs_by_created" in " ".join(p) for p in lists), lists
    assert not any("FROM job_items" in statement for statement, _ in seen)

    with _statements(db.engines) as seen:
        scrape = client.get("/metrics", headers=ADMIN)
    assert scrape.status_code == 200
    text_body = scrape.get_data(as_text=True)
    assert f'replicate_generation_jobs{{state="succeeded"}} {stored + 1}.0' in text_body
    assert f'replicate_generation_job_items{{state="succeeded"}} {stored + 2}.0' in text_body
    assert not any("FROM job_items" in statement for statement, _ in seen)
    reads = _plans(engine, seen, "jobs")
    assert reads and all(_uses_an_index_only(p, "jobs") for p in reads), reads
    assert all("jobs_open" in " ".join(p) for p in reads), reads


def test_a_page_of_ended_items_is_read_from_the_store_once_and_answered_the_same(
        app: Flask) -> None:
    client = app.test_client()
    job_id = _batch(client, [f"p{i}" for i in range(7)] + ["x #fail"])
    db = app.extensions["jobs"].store.db
    first = _ended(client, job_id)
    first_page = client.get(f"/jobs/{job_id}/items?limit=3", headers=USER).get_json()
    with _statements(db.engines) as seen:
        again = _job(client, job_id)
        again_page = client.get(f"/jobs/{job_id}/items?limit=3", headers=USER).get_json()
        failed = client.get(f"/jobs/{job_id}/items?state=failed", headers=USER).get_json()
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    assert json.dumps(again_page, sort_keys=True) == json.dumps(first_page, sort_keys=True)
    assert [i["prompt"] for i in failed["data"]] == ["x #fail"]
    # Only the filtered page read items again: the ended pages are kept, the job row is not.
    item_reads = [statement for statement, _ in seen if "FROM job_items" in statement]
    assert len(item_reads) == 1, item_reads
    assert any("FROM jobs" in statement for statement, _ in seen)


def test_kept_pages_stay_within_their_byte_bound_dropping_the_least_recent() -> None:
    pages = EndedPages(max_bytes=1000)
    body = [{"prompt": "x" * 280}]
    for n in range(5):
        pages.put((f"job_{n}", -1, 50), body, None)
        assert pages.get(("job_0", -1, 50)) is not None or n >= 3
    kept = [n for n in range(5) if pages.get((f"job_{n}", -1, 50)) is not None]
    assert kept == [0, 3, 4]  # job_0 was read at each step, so the others went first
    pages.put(("huge", -1, 50), [{"prompt": "x" * 2000}], None)
    assert pages.get(("huge", -1, 50)) is None


def test_a_job_body_is_the_same_json_from_the_list_and_from_the_job(client: FlaskClient) -> None:
    job_id = _batch(client, ["x", "y #fail"])
    job = _ended(client, job_id)
    listed = next(j for j in client.get("/jobs", headers=USER).get_json()["data"]
                  if j["id"] == job_id)
    summary = {k: v for k, v in job.items() if k not in ("items", "items_has_more", "items_next")}
    assert json.dumps(listed, sort_keys=True) == json.dumps(summary, sort_keys=True)


# --------------------------------------------------------------------------- both backends


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new SQLite file, or a new database on the shared PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "state.sqlite3")
        return
    with postgres_database() as url:
        yield url


def _counted(store: JobStore) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, int]]:
    """The kept counts counted the slow way: per job, and jobs and items by state."""
    with store.db.read() as conn:
        per_job: dict[str, dict[str, int]] = {}
        for job_id, state, count in conn.execute(text(
                "SELECT job_id, state, COUNT(*) FROM job_items GROUP BY job_id, state")):
            per_job.setdefault(str(job_id), {})[str(state)] = int(count)
        by_job = {str(state): int(count) for state, count in conn.execute(text(
            "SELECT state, COUNT(*) FROM jobs GROUP BY state"))}
        by_item = {str(state): int(count) for state, count in conn.execute(text(
            "SELECT state, COUNT(*) FROM job_items GROUP BY state"))}
    return per_job, by_job, by_item


def _assert_kept_is_counted(store: JobStore, job_ids: list[str]) -> None:
    per_job, by_job, by_item = _counted(store)
    for job_id in job_ids:
        job = store.get(job_id)
        assert job is not None
        assert {s: n for s, n in job.counts.items() if n} == per_job.get(job_id, {}), job_id
    assert store.state_counts() == (by_job, by_item)


def _new(job_id: str, items: int, account: str = "acct_a") -> NewJob:
    return NewJob(id=job_id, account=account, kind="batch", request_id=f"req_{job_id}",
                  items=[NewItem(spec={"n": i}) for i in range(items)])


def test_kept_counts_cost_and_totals_follow_every_item_write(target: str) -> None:
    store = JobStore(target)
    try:
        for job_id, items in (("job_a", 4), ("job_b", 3), ("job_c", 2)):
            store.create(_new(job_id, items), "w", 1.0)
        ids = ["job_a", "job_b", "job_c"]
        _assert_kept_is_counted(store, ids)
        store.start_item("job_a", 0, 2.0)
        assert store.record_intent("job_a", 1, [{}], 2.0, owner="w", fence=None) == "stored"
        assert store.record_intent("job_a", 1, [{}, {}], 2.1, owner="w", fence=None) == "stored"
        store.start_item("job_a", 0, 2.2)  # already running: no count moves twice
        _assert_kept_is_counted(store, ids)
        store.finish_item("job_a", 0, ItemOutcome(state="succeeded", cost_usd=0.025), 3.0)
        store.finish_item("job_a", 1, ItemOutcome(state="failed", cost_usd=0.5), 3.0)
        store.finish_item("job_a", 2, ItemOutcome(state="expired"), 3.0)  # never started
        assert store.request_cancel("job_a", 4.0) == []
        assert sorted(store.owners.fail_queued_items("w", "acct_a", ItemOutcome(
            state="failed", error="401", error_type="replicate_unauthorized"), 5.0)) == [
            "job_a", "job_b", "job_c"]
        _assert_kept_is_counted(store, ids)
        for job_id in ids:
            assert store.finish_job_if_done(job_id, 6.0) is not None
        job = store.get("job_a")
        assert job is not None and job.state == "canceled" and job.cost_usd == 0.525
        assert job.counts == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1,
                              "canceled": 1, "expired": 1}
        _assert_kept_is_counted(store, ids)
        store.retention.delete(["job_b"])
        _assert_kept_is_counted(store, ["job_a", "job_c"])
        store.retention.delete(["job_a", "job_c"])
        assert store.state_counts() == ({}, {})
    finally:
        store.close()


def test_items_ending_while_the_job_is_canceled_never_deadlock_and_keep_the_counts(
        target: str) -> None:
    stores = [JobStore(target), JobStore(target)]
    try:
        store = stores[0]
        store.create(_new("job_race", 24), "w", 1.0)
        for index in range(12):
            assert store.record_intent("job_race", index, [{}], 1.5, owner="w",
                                       fence=None) == "stored"
        ok = ItemOutcome(state="succeeded", cost_usd=0.01)
        late = ItemOutcome(state="expired", error="past its deadline", error_type="expired")
        calls: list[Callable[[], Any]] = [
            *(lambda i=i: stores[i % 2].finish_item("job_race", i, ok, 2.0) for i in range(12)),
            # Queued items ending (past their deadline) as the cancel drops the queued ones.
            *(lambda i=i: stores[i % 2].finish_item("job_race", i, late, 2.0)
              for i in range(12, 20)),
            lambda: stores[1].request_cancel("job_race", 2.0),
            lambda: stores[0].owners.fail_queued_items("w", "acct_a", ItemOutcome(
                state="failed", error="401", error_type="replicate_unauthorized"), 2.0)]
        results = together(*calls)
        assert not [r for r in results if isinstance(r, Exception)], results
        _assert_kept_is_counted(store, ["job_race"])
        job = store.get("job_race")
        assert job is not None and job.counts["succeeded"] == 12 and job.cost_usd == 0.12
        assert job.counts["queued"] == job.counts["running"] == 0
        assert store.finish_job_if_done("job_race", 3.0) is not None
        _assert_kept_is_counted(store, ["job_race"])
    finally:
        for one in stores:
            one.close()


def _at_revision(target: str, revision: str) -> None:
    """The store's tables as that migration left them (the path an older release took)."""
    engine = open_engine(target)
    try:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(Path(migrations.__file__).parent))
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def test_the_migration_counts_the_jobs_an_older_release_kept(target: str) -> None:
    _at_revision(target, "0006_job_events")
    engine = open_engine(target)
    with engine.begin() as conn:
        for job_id, state in (("job_open", "running"), ("job_done", "partially_failed")):
            conn.execute(text(
                "INSERT INTO jobs (id, account, kind, state, request_id, item_count,"
                " created_at) VALUES (:id, 'acct', 'batch', :state, 'r', 3, 1.0)"),
                {"id": job_id, "state": state})
        conn.execute(text(
            "INSERT INTO job_items (job_id, idx, spec, state, cost_usd, queued_at)"
            " VALUES (:job, :idx, '{}', :state, :cost, 1.0)"), [
            {"job": "job_open", "idx": 0, "state": "succeeded", "cost": 0.25},
            {"job": "job_open", "idx": 1, "state": "running", "cost": None},
            {"job": "job_open", "idx": 2, "state": "queued", "cost": None},
            {"job": "job_done", "idx": 0, "state": "succeeded", "cost": 0.5},
            {"job": "job_done", "idx": 1, "state": "succeeded", "cost": 0.125},
            {"job": "job_done", "idx": 2, "state": "failed", "cost": None}])
    engine.dispose()
    store = JobStore(target)  # upgrades to the head, counting what is there once
    try:
        done, running = store.get("job_done"), store.get("job_open")
        assert done is not None and running is not None
        assert (done.counts["succeeded"], done.counts["failed"], done.cost_usd) == (2, 1, 0.625)
        assert (running.counts["queued"], running.counts["running"], running.cost_usd) == (
            1, 1, 0.25)
        _assert_kept_is_counted(store, ["job_done", "job_open"])
    finally:
        store.close()


# --------------------------------------------------------------------------- the CLI


def test_a_service_run_records_every_item_of_a_job_bigger_than_its_first_page(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    settings = make_settings(concurrent_limit=10)
    service = Gunicorn(service_env(settings, workers=1), tmp_path / "gunicorn.log")
    try:
        service.wait_ready()
        prompts = [f"row {i}" for i in range(120)]
        source = tmp_path / "rows.jsonl"
        source.write_text("".join(json.dumps({"prompt": p, "model_name": "flux-dev"}) + "\n"
                                  for p in prompts))
        env = {**service_env(settings), "PATH": os.environ.get("PATH", ""),
               "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [sys.executable, "-m", "replicate_generation", "run", str(source), "--service-url",
             service.url, "--api-key", ADMIN_KEY, "--poll-interval", "0.05", "--output-dir",
             str(tmp_path / "files")], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=90, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        manifest = (tmp_path / "rows.jsonl.manifest.jsonl").read_text().splitlines()
        found = [json.loads(line) for line in manifest if line.strip()]
        # One job of 120 items: the rows past its first page came from GET /jobs/<id>/items.
        assert sorted(r["index"] for r in found) == list(range(120))
        assert all(r["success"] for r in found) and len({r["job_id"] for r in found}) == 1
    finally:
        service.stop()


def test_a_jobs_page_answers_at_once_while_its_item_writers_wait_on_the_jobs_row(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    """PostgreSQL: item writes queued on a busy job's row hold every write connection; a GET
    reads through its own pool and answers at once, not after the store's patience."""
    sim, clock = held_sim
    writers = PG_POOL_SIZE + PG_POOL_OVERFLOW
    items = writers + 6
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        app = make_app(database_url=url, replicate_base_url=sim.base_url, sync_wait_seconds=0,
                       concurrent_limit=items)
        stack.callback(app.extensions["jobs"].close)  # before its database goes
        client = app.test_client()
        job_id = _batch(client, [f"a lake at dawn {i}" for i in range(items)], ADMIN)
        wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == items, what="every create")
        with psycopg.connect(url) as holder:
            holder.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            clock.release()  # every item ends, and its write queues on the job's row
            wait_for(lambda: _waiting_on_locks(url) >= writers,
                     what="every write connection waiting on the job's row")
            started = time.monotonic()
            response = client.get(f"/jobs/{job_id}", headers=ADMIN)
            assert response.status_code == 200, response.get_json()
            assert time.monotonic() - started < WRITE_PATIENCE_S / 2
            assert response.get_json()["counts"]["succeeded"] < items
        job = _ended(client, job_id, ADMIN)
        assert job["state"] == "succeeded" and job["counts"]["succeeded"] == items
        assert len(sim.predictions(SERVER_TOKEN)) == items


def _waiting_on_locks(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0
