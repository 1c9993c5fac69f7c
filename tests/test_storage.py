"""Issue #10: what a job costs in the state file, and a busy state file (issue #10, 1 and 2).

A batch whose items share one big input stores it once; a request whose items' inputs add up to
too much is refused before anything is stored; a state file locked by another process (this test,
with its own sqlite3 connection) never turns into a 500, a lost prediction id or a job that says
"canceled" while its predictions still run.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from flask import Flask

from conftest import ADMIN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation import sqlite_db
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.jobs.store import JobStore
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for

TERMINAL = {"succeeded", "partially_failed", "failed", "canceled"}
# Longer than one wait in SQLite's busy handler, so every writer meets SQLITE_BUSY.
LOCK_SECONDS = max(3.0, sqlite_db.BUSY_TIMEOUT_S + 1.5)


def data_uri(size: int) -> str:
    raw = os.urandom(size * 3 // 4)
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def state_bytes(path: Path) -> int:
    """The state file's size once its WAL is folded in (as a backup or a copy would see it)."""
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the state file's write lock, as another process's long transaction would."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def fast_simulator(sim: Simulator) -> None:
    sim.configure(create_rate_per_minute=100000, create_burst=100000,
                  other_rate_per_minute=100000, other_burst=100000)


# --------------------------------------------------------------------------- storage


def test_a_shared_input_is_stored_once_and_every_item_still_gets_it(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    fast_simulator(sim)
    app = make_app(concurrent_limit=50, dispatch_threads=64, requests_per_minute=100000,
                   create_burst=1000, polls_per_minute=100000, task_timeout_seconds=120)
    client = app.test_client()
    state = Path(app.extensions["settings"].state_file)
    image = data_uri(100_000)
    # 400 items: copies would be 40 MB, far from the bound; more only loads the 2 cores.
    prompts = [f"shared reference {i}" for i in range(400)]
    before = state_bytes(state)
    response = client.post("/generate-batch", json={
        "model_name": "flux-dev", "prompts": prompts, "input_image": image,
        "output_format": "png"}, headers={**ADMIN, "Prefer": "respond-async"})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    stored = state_bytes(state) - before
    # One copy and 400 small rows are well under 2 MB.
    assert stored < 2_000_000, stored

    # The runner's end-of-job event: polling GET /jobs/<id> (400 items) costs as much as the work.
    jobs = app.extensions["jobs"]
    wait_for(lambda: jobs.wait(job_id, timeout=1), timeout=240, what="the 400 items to end")
    done = client.get(f"/jobs/{job_id}", headers=ADMIN).get_json()
    assert done["state"] == "succeeded", done["counts"]
    items = client.get(f"/jobs/{job_id}/items?limit=500", headers=ADMIN).get_json()["data"]
    assert [i["prompt"] for i in items] == prompts
    assert all(i["model_used"] == "flux-kontext-max" and i["files"] for i in items)
    # Replicate received the whole image with every item, exactly once per prompt.
    sent = sim.predictions(SERVER_TOKEN)
    assert sorted(p["input"]["prompt"] for p in sent) == sorted(prompts)
    assert all(p["input"]["input_image"] == image for p in sent)
    assert state_bytes(state) - before < 4_000_000


def test_old_rows_without_references_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    JobStore(str(path))  # the schema
    spec = {"model": "flux-dev", "input": {"prompt": "old", "input_image": "x" * 5000},
            "stem": "old", "requested": "flux-dev", "chain": [], "routed": None, "notes": [],
            "fallback_on_content_policy": False, "placeholder": False}
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO jobs (id, account, kind, state, request_id, item_count,"
                     " created_at) VALUES ('job_old', 'acct', 'batch', 'queued', 'r', 1, 0)")
        conn.execute("INSERT INTO job_items (job_id, idx, spec, state, queued_at)"
                     " VALUES ('job_old', 0, ?, 'queued', 0)", (json.dumps(spec),))
    store = JobStore(str(path))
    (item,) = store.items("job_old")
    assert item.spec == spec
    assert store.item("job_old", 0) is not None
    started = store.start_item("job_old", 0, 1.0)
    assert started is not None and started.spec == spec


def test_a_request_that_expands_past_the_bound_is_refused_before_anything_is_stored(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(max_expanded_request_bytes=5_000_000)
    client = app.test_client()
    state = Path(app.extensions["settings"].state_file)
    image = data_uri(100_000)
    before = state_bytes(state)
    for headers in (ADMIN, {**ADMIN, "Prefer": "respond-async"}):
        response = client.post("/generate-batch", json={
            "model_name": "flux-dev", "prompts": [f"too much {i}" for i in range(60)],
            "input_image": image}, headers=headers)
        assert response.status_code == 413, response.get_json()
        body = response.get_json()
        assert "MAX_EXPANDED_REQUEST_BYTES" in body["error"] and body["limit"] == 5_000_000
        assert body["expanded_bytes"] > 5_000_000
    assert client.get("/jobs", headers=ADMIN).get_json()["data"] == []
    assert sim.predictions() == []
    assert state_bytes(state) - before < 50_000
    # Under the bound it runs.
    small = client.post("/generate-batch", json={
        "model_name": "flux-dev", "prompts": ["fits 1", "fits 2"], "input_image": image},
        headers=ADMIN)
    assert small.status_code == 200, small.get_json()
    assert len(sim.predictions()) == 2


# --------------------------------------------------------------------------- a busy file


def call_in_thread(call: Callable[[], requests.Response]) -> tuple[threading.Thread,
                                                                    list[Any]]:
    out: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            response = call()
            out.append((response, time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def assert_answered_honestly(out: list[Any], ok: set[int], what: str) -> requests.Response:
    (response, _elapsed), = out
    assert isinstance(response, requests.Response), (what, response)
    if response.status_code == 503:
        assert response.headers.get("Retry-After"), what
        assert "error" in response.json(), what
    else:
        assert response.status_code in ok, (what, response.status_code, response.text)
    return response


def test_a_locked_state_file_never_gives_a_500_loses_an_id_or_lies_about_a_cancel(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    settings = make_settings(concurrent_limit=8, sync_wait_seconds=1, task_timeout_seconds=60,
                             lease_ttl_seconds=10)
    server = start_gunicorn(settings, workers=1)
    prompts = [f"#hang held create {i}" for i in range(4)]
    response = server.post("/generate-batch", {"model_name": "flux-dev", "prompts": prompts},
                           {**ADMIN, "Prefer": "respond-async"}, timeout=10)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    # Every create has reached Replicate, which holds it (Prefer: wait): the ids come back while
    # the file is locked, and must be stored once it is free.
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == len(prompts), what="4 creates")
    job_url = f"{server.url}/jobs/{job_id}"
    with locked(settings.state_file):
        cancel = call_in_thread(lambda: requests.post(job_url + "/cancel", headers=ADMIN,
                                                      timeout=60))
        other = call_in_thread(lambda: server.post(
            "/generate", {"model_name": "flux-dev", "prompt": "unrelated while locked"}, USER,
            timeout=60))
        look = call_in_thread(lambda: requests.get(job_url, headers=ADMIN, timeout=60))
        time.sleep(LOCK_SECONDS)
    for thread, _ in (cancel, other, look):
        thread.join(60)
    assert_answered_honestly(look[1], {200}, "GET /jobs/<id>")
    assert_answered_honestly(other[1], {200}, "an unrelated /generate")
    canceled = assert_answered_honestly(cancel[1], {200}, "POST /jobs/<id>/cancel")
    if canceled.status_code == 503:
        canceled = requests.post(job_url + "/cancel", headers=ADMIN, timeout=60)
        assert canceled.status_code == 200, canceled.text

    def ended() -> dict[str, Any] | None:
        job = requests.get(job_url, headers=ADMIN, timeout=10).json()
        if job["state"] == "canceled":
            # Honest: "canceled" only once nothing of the job runs on Replicate any more.
            assert all(p["canceled"] for p in sim.predictions(SERVER_TOKEN)
                       if p["input"]["prompt"] in prompts), job
        return job if job["state"] in TERMINAL else None

    done = wait_for(ended, timeout=60, what="the canceled job to end")
    assert done["state"] == "canceled", done
    assert done["counts"]["canceled"] == len(prompts), done["counts"]
    made = {p["id"]: p for p in sim.predictions(SERVER_TOKEN) if p["input"]["prompt"] in prompts}
    assert len(made) == len(prompts)
    # Every id Replicate gave while the file was locked was stored, and every one was canceled.
    assert {i["prediction_id"] for i in done["items"]} == set(made)
    assert all(p["canceled"] for p in made.values())
    store = JobStore(str(settings.state_file))
    assert {i.prediction_id for i in store.items(job_id)} == set(made)
    # The unrelated request's prediction was made once, and its item ended.
    assert sim.creates_by_prompt(USER_TOKEN) == {"unrelated while locked": 1}
    assert "Traceback" not in server.log(), server.log()[-3000:]
