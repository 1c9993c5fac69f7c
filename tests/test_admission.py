"""Fair admission and bounded memory per account (issue #10, findings 3 and 5), over HTTP (Flask
test client) against the simulator: a flooder cannot starve another account, a token Replicate
answers 401 stops costing queue space at once, and nothing is kept for an account whose work
ended, even with as many accounts as SQLite has query variables."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, OTHER, USER, USER_TOKEN
from replicate_generation.clients import account_key
from replicate_generation.devtools.simulator import Simulator, token_hash
from replicate_generation.jobs.rows import NewItem, NewJob
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.request_parsing import parse_single
from servers import wait_for

TERMINAL = {"succeeded", "partially_failed", "failed", "canceled"}
FLOODER_TOKEN = "r8_flooder_rejected_tok"
FLOODER = {"X-Replicate-API-Key": FLOODER_TOKEN}


def batch(prompts: list[str]) -> dict[str, Any]:
    return {"model_name": "flux-dev", "prompts": prompts}


def submit_async(client: FlaskClient, body: dict[str, Any], headers: dict[str, str],
                 path: str = "/generate-batch") -> Any:
    return client.post(path, json=body, headers={**headers, "Prefer": "respond-async"})


def job_state(client: FlaskClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def ended(client: FlaskClient, job_id: str) -> bool:
    return job_state(client, job_id)["state"] in TERMINAL


def held(client: FlaskClient) -> dict[str, int]:
    """What the process keeps per account, from the admin view of /status."""
    return dict(client.get("/status", headers=ADMIN).get_json()["process"])


def requests_of(sim: Simulator, token: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests_log() if r["token_hash"] == token_hash(token)]


# --------------------------------------------------------------------------- finding 3


def test_a_flooder_with_a_rejected_token_never_starves_a_bystander(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    # Replicate's real create pace: without the fix, 401s drain the flood at 10 items a second.
    app = make_app(requests_per_minute=600)
    sim.config.invalid_tokens = {FLOODER_TOKEN}
    prompts = [f"flood {i}" for i in range(1000)]
    flooder = app.test_client()
    flood = [submit_async(flooder, batch(prompts), FLOODER) for _ in range(20)]
    bystander_done = threading.Event()

    def keep_flooding() -> None:
        # The pressure stays on while the bystander tries: small batches retake freed places.
        again = app.test_client()
        while not bystander_done.is_set():
            flood.append(submit_async(again, batch(prompts[:5]), FLOODER))

    flooding = threading.Thread(target=keep_flooding)
    flooding.start()
    bystander = app.test_client()
    try:
        answers = [bystander.post("/generate", json={"model_name": "flux-dev",
                                                     "prompt": f"b{i}"}, headers=OTHER)
                   for i in range(10)]
    finally:
        bystander_done.set()
        flooding.join()

    assert [a.status_code for a in answers] == [200] * 10, [a.get_json() for a in answers]
    assert flood[0].status_code == 202
    # A second batch may slip in before the first 401 comes back; then the token is refused.
    assert {r.status_code for r in flood} <= {202, 401, 429}
    rejected = [r for r in flood if r.status_code == 401]
    assert rejected, [r.status_code for r in flood]
    for response in rejected:
        body = response.get_json()
        assert body["error_type"] == "replicate_unauthorized" and "error" in body
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    accepted = [r.get_json()["id"] for r in flood if r.status_code == 202]
    client = app.test_client()
    for job_id in accepted:
        wait_for(partial(ended, client, job_id), 10.0, f"flood job {job_id} to fail")
        job = job_state(client, job_id)
        assert job["state"] == "failed"
        assert {i["error_type"] for i in job["items"]} == {"replicate_unauthorized"}
    # Only the creates already under way when the first 401 came back reached Replicate (and
    # the token's one check, GET /v1/account, which it passed: it was revoked after).
    sent = [r for r in requests_of(sim, FLOODER_TOKEN) if r["path"] != "/v1/account"]
    assert 1 <= len(sent) <= app.extensions["settings"].concurrent_limit, len(sent)
    assert all(r["status"] == 401 for r in sent)


def test_one_account_is_held_to_its_own_bound_while_another_is_admitted(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(max_queued_per_account=3, concurrent_limit=1).test_client()
    slow = [f"#slow=30 {i}" for i in range(3)]
    first = submit_async(client, batch(slow), USER)
    assert first.status_code == 202, first.get_json()
    over = submit_async(client, batch(slow), USER)
    assert over.status_code == 429, over.get_json()
    assert over.get_json()["error_type"] == "account_queue_full"
    assert int(over.headers["Retry-After"]) > 0
    other = submit_async(client, batch(slow), OTHER)
    assert other.status_code == 202, other.get_json()
    for job in (first, other):
        client.post(f"/jobs/{job.get_json()['id']}/cancel", headers=ADMIN)


def test_an_account_over_its_share_leaves_room_for_a_newcomer(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(max_queued_tasks=20, max_queued_per_account=20,
                      concurrent_limit=1).test_client()
    accepted: list[str] = []
    for i in range(25):
        response = submit_async(client, batch([f"#slow=30 {i}"]), USER)
        if response.status_code != 202:
            break
        accepted.append(response.get_json()["id"])
    assert response.status_code == 429, "the flooder was never refused"
    assert len(accepted) < 20  # refused before the whole global queue was its
    newcomer = submit_async(client, {"model_name": "flux-dev", "prompt": "#slow=30 hi"}, OTHER,
                            path="/generate")
    assert newcomer.status_code == 202, newcomer.get_json()
    for job_id in [*accepted, newcomer.get_json()["id"]]:
        client.post(f"/jobs/{job_id}/cancel", headers=ADMIN)


# --------------------------------------------------------------------------- finding 5


def test_nothing_is_kept_for_tokens_whose_work_ended(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app()
    tokens = [f"r8_many_distinct_{i:05d}" for i in range(200)]

    def one_request(token: str) -> int:
        response = app.test_client().post(
            "/generate", json={"model_name": "flux-dev", "prompt": "quick"},
            headers={"X-Replicate-API-Key": token})
        return int(response.status_code)

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one_request, tokens))
    assert statuses == [200] * len(tokens)
    client = app.test_client()
    # Only the server's token (from the settings) and its client, built at start-up, stay.
    wait_for(lambda: held(client) == {"clients_cached": 1, "tokens_remembered": 1}, 15.0,
             f"per-account memory to be released (now {held(client)})")


def test_orphans_resume_with_more_accounts_than_sqlite_has_variables(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app()
    runner: JobRunner = app.extensions["jobs"]
    store = runner.store
    variables = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    # 40,000 accounts with jobs another live process runs: rows written at once, as 40,000
    # creates through the API would cost the parallel suite minutes for no more coverage.
    store.owners.heartbeat("another-live-process", time.time() + 3600)
    with sqlite3.connect(app.extensions["settings"].state_file) as conn:
        conn.executemany(
            "INSERT INTO jobs (id, account, kind, state, request_id, item_count, created_at,"
            " owner, fence) VALUES (?, ?, 'batch', 'queued', ?, 0, ?, 'another-live-process', 1)",
            [(f"job_live_{i}", account_key(f"r8_known_{i:06d}"), f"r{i}", time.time())
             for i in range(40_000)])
    # One job of a user whose process died, waiting for its owner's token.
    task = parse_single({"model_name": "flux-dev", "prompt": "orphan"},
                        app.extensions["chains"]).tasks[0]
    request_id, _ = runner.generator.new_request_dir()
    store.create(NewJob(id="job_orphan", account=account_key(USER_TOKEN), kind="generate",
                        request_id=request_id, items=[NewItem(spec=task.to_record())]),
                 "a-dead-process", time.time())
    # More tokens known at once than an IN (...) of them could take.
    for i in range(variables):
        runner.accounts.remember(f"r8_known_{i:06d}")
    runner.accounts.remember(USER_TOKEN)

    client = app.test_client()
    wait_for(partial(ended, client, "job_orphan"), 20.0, "the orphan to be resumed")
    assert job_state(client, "job_orphan")["state"] == "succeeded"
    assert [p["input"]["prompt"] for p in sim.predictions(USER_TOKEN)] == ["orphan"]
    wait_for(lambda: held(client)["tokens_remembered"] == 1, 20.0,
             "the remembered tokens to be dropped")
