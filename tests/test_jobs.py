"""Durable jobs over HTTP (Flask test client) against the simulator: async submit, polling,
listing, files, cancel, ownership, idempotency, webhooks and retention (issue #3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, OTHER, OTHER_TOKEN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.clients import account_key
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.jobs import webhooks
from replicate_generation.limits.base import Limits
from replicate_generation.limits.sqlite import SQLiteLimitStore
from servers import wait_for

TERMINAL = {"succeeded", "partially_failed", "failed", "canceled"}
SIGNING_KEY = "test-webhook-signing-key-0123456789"


# --------------------------------------------------------------------------- helpers


def get_job(client: FlaskClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def wait_terminal(client: FlaskClient, job_id: str, headers: dict[str, str],
                  timeout: float = 10.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(get_job(client, job_id, headers))
        return found["state"] in TERMINAL

    wait_for(done, timeout, f"job {job_id} to end")
    return found


def batch(prompts: list[str], **extra: Any) -> dict[str, Any]:
    return {"model_name": "flux-dev", "prompts": prompts, **extra}


def submit_async(client: FlaskClient, body: dict[str, Any], headers: dict[str, str],
                 path: str = "/generate-batch") -> dict[str, Any]:
    response = client.post(path, json=body, headers={**headers, "Prefer": "respond-async"})
    assert response.status_code == 202, response.get_json()
    return dict(response.get_json())


def creates_by_prompt(sim: Simulator, token: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for prediction in sim.predictions(token):
        prompt = str(prediction["input"]["prompt"])
        counts[prompt] = counts.get(prompt, 0) + 1
    return counts


def fetch(client: FlaskClient, url: str, headers: dict[str, str]) -> tuple[int, str, bytes,
                                                                         dict[str, str]]:
    """GET a URL and close the response (send_file keeps the file open until then)."""
    response = client.get(url, headers=headers)
    try:
        return (response.status_code, response.mimetype or "", response.get_data(),
                dict(response.headers))
    finally:
        response.close()


def output_root(app: Flask) -> Path:
    return Path(app.extensions["settings"].output_dir).resolve()


# --------------------------------------------------------------------------- async submit


def test_async_submit_by_header_or_body_flag_then_poll_list_and_download(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    prompts = ["a red fox", "a blue whale", "a green frog"]
    names = ["fox", "whale", "frog"]
    body = batch(prompts, custom_filenames=names, output_format="png")

    by_header = client.post("/generate-batch", json=body,
                            headers={**ADMIN, "Prefer": "respond-async"})
    by_flag = client.post("/generate-batch", json={**body, "async": True}, headers=ADMIN)
    jobs = []
    for response in (by_header, by_flag):
        assert response.status_code == 202, response.get_json()
        job = response.get_json()
        assert response.headers["Location"] == f"/jobs/{job['id']}"
        assert job["status_url"] == f"/jobs/{job['id']}"
        assert job["object"] == "job" and job["kind"] == "batch" and job["total"] == 3
        assert job["state"] in ("queued", "running")
        assert sum(job["counts"].values()) == 3, job["counts"]
        assert "Idempotent-Replayed" not in response.headers
        jobs.append(job)
    assert jobs[0]["id"] != jobs[1]["id"]

    # A single /generate can be async too.
    single = submit_async(client, {"model_name": "flux-dev", "prompt": "a lone owl",
                                   "custom_filename": "owl", "output_format": "png"}, ADMIN,
                          path="/generate")
    assert single["kind"] == "generate" and single["total"] == 1

    for job in jobs:
        done = wait_terminal(client, job["id"], ADMIN)
        assert done["state"] == "succeeded"
        assert done["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0,
                                  "canceled": 0, "expired": 0}
        assert done["created_at"] and done["started_at"] and done["finished_at"]
        items = done["items"]
        assert [i["index"] for i in items] == [0, 1, 2]
        assert [i["prompt"] for i in items] == prompts
        assert [i["state"] for i in items] == ["succeeded"] * 3
        assert [Path(i["files"][0]).name for i in items] == [f"{n}.png" for n in names]
        for item in items:
            assert item["model_used"] == "flux-dev" and item["prediction_id"]
            assert len(item["attempts"]) == 1 and item["error"] is None
            (url,) = item["urls"]
            assert url == f"/files/{done['output_id']}/{Path(item['files'][0]).name}"
            status, mimetype, data, _ = fetch(client, url, ADMIN)
            assert status == 200 and mimetype == "image/png"
            on_disk = output_root(app) / url.removeprefix("/files/")
            assert data == on_disk.read_bytes() and data.startswith(b"\x89PNG")
            # Range requests are honoured (send_file is conditional).
            status, _, part, headers = fetch(client, url, {**ADMIN, "Range": "bytes=4-11"})
            assert status == 206 and part == data[4:12]
            assert headers["Content-Range"] == f"bytes 4-11/{len(data)}"
    done = wait_terminal(client, single["id"], ADMIN)
    assert done["state"] == "succeeded"
    assert Path(done["items"][0]["files"][0]).name == "owl.png"
    # Each prompt was created exactly once on Replicate.
    assert creates_by_prompt(sim, SERVER_TOKEN) == {"a red fox": 2, "a blue whale": 2,
                                                    "a green frog": 2, "a lone owl": 1}

    # GET /jobs: newest first, a page at a time, with a cursor.
    newest_first = [single["id"], jobs[1]["id"], jobs[0]["id"]]
    listing = client.get("/jobs", headers=ADMIN).get_json()
    assert [j["id"] for j in listing["data"]] == newest_first
    assert listing["has_more"] is False and listing["next"] is None
    assert "items" not in listing["data"][0]
    seen, url = [], "/jobs?limit=1"
    while url is not None:
        page = client.get(url, headers=ADMIN).get_json()
        assert len(page["data"]) == 1
        seen.append(page["data"][0]["id"])
        assert page["has_more"] is (page["next"] is not None)
        url = page["next"]
    assert seen == newest_first
    for bad in ("0", "101", "x", "-1", "\u00b2"):
        response = client.get(f"/jobs?limit={bad}", headers=ADMIN)
        assert response.status_code == 400 and response.get_json()["field"] == "limit"


def test_sync_batch_keeps_the_legacy_shape_and_names_its_job(
        client: FlaskClient, sim: Simulator) -> None:
    prompts = ["sync one", "sync two #fail"]
    response = client.post("/generate-batch", json=batch(prompts, custom_filenames=["one", "two"],
                                                         fallback=False), headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert data["success"] is False and data["total_prompts"] == 2
    assert data["successful_count"] == 1 and data["failed_count"] == 1
    assert [r["prompt_index"] for r in data["successful_results"]] == [0]
    assert [r["prompt_index"] for r in data["failed_results"]] == [1]
    assert [r["prompt"] for r in data["results"]] == prompts
    assert data["state"] == "partially_failed"
    assert response.headers["Location"] == f"/jobs/{data['job_id']}"
    job = get_job(client, data["job_id"], ADMIN)
    assert job["state"] == "partially_failed" and job["output_id"] == data["output_id"]
    assert data["request_id"] == response.headers["X-Request-ID"]
    assert job["counts"]["succeeded"] == 1 and job["counts"]["failed"] == 1
    assert [i["files"] for i in job["items"]] == [r["files"] for r in data["results"]]
    assert len(sim.predictions(SERVER_TOKEN)) == 2


# --------------------------------------------------------------------------- cancel


def test_an_item_waiting_for_a_slot_stays_queued_and_a_cancel_drops_it_unsent(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(concurrent_limit=1)
    client = app.test_client()
    # Another process on the same state file (a script, another worker) holds the only slot.
    other = ConcurrencyManager(SQLiteLimitStore(app.extensions["jobs"].settings.state_file,
                                                Limits(1, 600)), poll_interval=0.01)
    try:
        with other.slot(account_key(SERVER_TOKEN), time.time() + 60):
            job_id = submit_async(client, batch(["waits"]), ADMIN)["id"]
            wait_for(lambda: other.stats(account_key(SERVER_TOKEN))[0].waiting == 1,
                     what="the item's runner to wait for the slot")
            waiting = get_job(client, job_id, ADMIN)
            assert waiting["state"] == "queued" and waiting["items"][0]["state"] == "queued"
            canceled = client.post(f"/jobs/{job_id}/cancel", headers=ADMIN).get_json()
            assert canceled["state"] == "canceled"  # nothing was running: done at once
        # The slot frees; the runner takes it and finds its item ended: nothing is sent.
        wait_for(lambda: other.stats(account_key(SERVER_TOKEN))[0].waiting == 0,
                 what="the runner to take the slot")
        wait_for(lambda: other.stats(account_key(SERVER_TOKEN))[0].in_flight == 0,
                 what="the runner to give the slot back")
    finally:
        other.shutdown()
    assert sim.predictions(SERVER_TOKEN) == []
    item = get_job(client, job_id, ADMIN)["items"][0]
    assert (item["state"], item["attempts"], item["error_type"]) == ("canceled", [], "canceled")


def test_cancel_mid_run_cancels_running_predictions_and_never_creates_queued_ones(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(concurrent_limit=2)
    client = app.test_client()
    # Item 0 is quick and finishes; 1 and 2 then hold both slots; 3 to 5 wait.
    # Long enough that no load lets a slow one end before the cancel reaches it.
    prompts = ["quick one"] + [f"#slow=60 slow {i}" for i in range(1, 6)]
    job = submit_async(client, batch(prompts, output_format="png"), ADMIN)
    job_id = job["id"]

    def two_running_with_ids() -> dict[str, Any] | None:
        current = get_job(client, job_id, ADMIN)
        items = current["items"]
        running = [i for i in items if i["state"] == "running" and i["prediction_id"]]
        ok = (items[0]["state"] == "succeeded" and len(running) == 2
              and len(sim.predictions(SERVER_TOKEN)) == 3)
        return current if ok else None

    before = wait_for(two_running_with_ids, what="item 0 done and two slow items running")
    running_ids = {i["prediction_id"] for i in before["items"] if i["state"] == "running"}
    assert {i["index"] for i in before["items"] if i["state"] == "running"} == {1, 2}

    response = client.post(f"/jobs/{job_id}/cancel", headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    answered = response.get_json()
    assert answered["cancel_requested_at"] is not None
    # The queued items were dropped at once.
    assert [i["state"] for i in answered["items"][3:]] == ["canceled"] * 3

    done = wait_terminal(client, job_id, ADMIN)
    assert done["state"] == "canceled"
    assert done["counts"] == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0,
                              "canceled": 5, "expired": 0}
    assert [i["state"] for i in done["items"]] == ["succeeded"] + ["canceled"] * 5
    for item in done["items"][3:]:
        assert item["prediction_id"] is None and item["attempts"] == []
        assert item["error_type"] == "canceled"
    # The simulator: three creates (the queued three never), cancels for exactly the two running.
    predictions = {p["id"]: p for p in sim.predictions(SERVER_TOKEN)}
    assert len(predictions) == 3
    assert {p["input"]["prompt"] for p in predictions.values()} == set(prompts[:3])
    assert {pid for pid, p in predictions.items() if p["canceled"]} == running_ids
    cancels = {entry["path"] for entry in sim.requests_log()
               if entry["method"] == "POST" and entry["path"].endswith("/cancel")}
    assert cancels == {f"/v1/predictions/{pid}/cancel" for pid in running_ids}
    assert sim.stats(SERVER_TOKEN)["cancels"] == 2
    # The finished item keeps its file.
    (url,) = done["items"][0]["urls"]
    status, mimetype, data, _ = fetch(client, url, ADMIN)
    assert status == 200 and mimetype == "image/png" and data.startswith(b"\x89PNG")
    # Canceling a finished job changes nothing.
    again = client.post(f"/jobs/{job_id}/cancel", headers=ADMIN).get_json()
    assert again["state"] == "canceled" and again["counts"] == done["counts"]
    assert sim.stats(SERVER_TOKEN)["cancels"] == 2


# --------------------------------------------------------------------------- ownership


def test_jobs_and_files_are_visible_only_to_their_account_and_the_admin(
        client: FlaskClient, sim: Simulator) -> None:
    mine = submit_async(client, batch(["user picture"], output_format="png"), USER)
    theirs = submit_async(client, batch(["other picture"], output_format="png"), OTHER)
    admins = submit_async(client, batch(["admin picture"], output_format="png"), ADMIN)
    done = wait_terminal(client, mine["id"], USER)
    wait_terminal(client, theirs["id"], OTHER)
    wait_terminal(client, admins["id"], ADMIN)
    (url,) = done["items"][0]["urls"]
    # Each account paid for its own job.
    assert [p["input"]["prompt"] for p in sim.predictions(USER_TOKEN)] == ["user picture"]
    assert [p["input"]["prompt"] for p in sim.predictions(OTHER_TOKEN)] == ["other picture"]

    # Another account sees nothing of USER's job: not the job, not its cancel, not its files.
    for response in (client.get(f"/jobs/{mine['id']}", headers=OTHER),
                     client.post(f"/jobs/{mine['id']}/cancel", headers=OTHER),
                     client.get(url, headers=OTHER),
                     client.get(f"/jobs?after={mine['id']}", headers=OTHER)):
        assert response.status_code == 404, response.get_json()
        response.close()
    # ...and gets the same 404 as for a job or file that does not exist.
    missing = client.get("/jobs/job_does_not_exist", headers=OTHER)
    # The same 404 as for a job that does not exist (each carries its own request id).
    hidden = client.get(f"/jobs/{mine['id']}", headers=OTHER).get_json()
    assert {**missing.get_json(), "request_id": None} == {**hidden, "request_id": None}
    assert client.get("/files/nowhere/x.png", headers=OTHER).status_code == 404
    # No key: 401.
    assert client.get(f"/jobs/{mine['id']}").status_code == 401
    assert client.get(url).status_code == 401

    status, _, data, _ = fetch(client, url, USER)
    assert status == 200 and data.startswith(b"\x89PNG")
    status, _, admin_data, _ = fetch(client, url, ADMIN)
    assert status == 200 and admin_data == data
    assert get_job(client, mine["id"], ADMIN)["state"] == "succeeded"

    def listed(headers: dict[str, str]) -> list[str]:
        return [j["id"] for j in client.get("/jobs", headers=headers).get_json()["data"]]

    assert listed(USER) == [mine["id"]]
    assert listed(OTHER) == [theirs["id"]]
    assert listed(ADMIN) == [admins["id"], theirs["id"], mine["id"]]


# --------------------------------------------------------------------------- idempotency


def test_idempotency_key_replays_the_same_job_and_refuses_another_body(
        client: FlaskClient, sim: Simulator) -> None:
    body = batch(["idem one", "idem two"])
    keyed = {**USER, "Idempotency-Key": "order-42", "Prefer": "respond-async"}
    first = client.post("/generate-batch", json=body, headers=keyed)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert first.get_json()["cost_usd"] == 0.0  # nothing has run yet
    job_id = first.get_json()["id"]
    # Same key, same body (key order aside), while it runs: the same job, nothing new.
    reordered = dict(reversed(list(body.items())))
    second = client.post("/generate-batch", json=reordered, headers=keyed)
    assert second.status_code == 202, second.get_json()
    assert second.get_json()["id"] == job_id
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == f"/jobs/{job_id}"
    assert sum(second.get_json()["counts"].values()) == 2
    done = wait_terminal(client, job_id, USER)
    assert done["state"] == "succeeded" and done["cost_usd"] > 0
    # An asynchronous replay after the end shows what the job cost, as GET /jobs/<id> does.
    replayed = client.post("/generate-batch", json=body, headers=keyed)
    assert replayed.status_code == 202 and replayed.get_json()["cost_usd"] == done["cost_usd"]
    # A synchronous replay after the end answers the finished job at once.
    third = client.post("/generate-batch", json=body,
                        headers={**USER, "Idempotency-Key": "order-42"})
    assert third.status_code == 200 and third.headers["Idempotent-Replayed"] == "true"
    assert third.get_json()["job_id"] == job_id and third.get_json()["success"] is True
    assert creates_by_prompt(sim, USER_TOKEN) == {"idem one": 1, "idem two": 1}

    # Same key, another body (or another route): 422, nothing created.
    for path, other_body in (("/generate-batch", batch(["idem one", "idem three"])),
                             ("/generate", {"model_name": "flux-dev", "prompt": "idem one"})):
        conflict = client.post(path, json=other_body, headers=keyed)
        assert conflict.status_code == 422, conflict.get_json()
        assert conflict.get_json()["field"] == "Idempotency-Key"
    # The key belongs to the account: another account's same key is its own job.
    others = client.post("/generate-batch", json=body,
                         headers={**OTHER, "Idempotency-Key": "order-42",
                                  "Prefer": "respond-async"})
    assert others.status_code == 202 and others.get_json()["id"] != job_id
    assert "Idempotent-Replayed" not in others.headers
    wait_terminal(client, others.get_json()["id"], OTHER)
    # A malformed key: 400, nothing created.
    for bad in ("x" * 256, "tab\there", "caf\u00e9"):
        response = client.post("/generate-batch", json=batch(["never made"]),
                               headers={**USER, "Idempotency-Key": bad})
        assert response.status_code == 400, (bad, response.get_json())
        assert response.get_json()["field"] == "Idempotency-Key"
    assert creates_by_prompt(sim, USER_TOKEN) == {"idem one": 1, "idem two": 1}
    assert len(sim.predictions()) == 4


# --------------------------------------------------------------------------- webhooks


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    statuses: list[int]  # answered in turn; the last one repeats
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 that fails the first delivery (500), then accepts."""
    state = Receiver(url="", statuses=[500, 204])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.hits.append(Hit({k.lower(): v for k, v in self.headers.items()}, body))
                status = state.statuses[min(len(state.hits), len(state.statuses)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the API's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}/hooks/job-done"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def my_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written here from the spec (docs/webhooks.md)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
        return False
    return any(entry == f"v1,{expected}" for entry in headers["webhook-signature"].split(" "))


def test_admin_webhook_is_retried_until_delivered_and_verifies_with_the_callers_secret(
        make_app: Callable[..., Flask], sim: Simulator, receiver: Receiver) -> None:
    client = make_app(webhook_signing_key=SIGNING_KEY,
                      webhook_retry_base_seconds=0.05).test_client()
    job = submit_async(client, batch(["hooked"], webhook=receiver.url), ADMIN)
    assert job["webhook"] == {"url": receiver.url, "state": None, "attempts": 0, "error": None}

    def delivered() -> dict[str, Any] | None:
        current = get_job(client, job["id"], ADMIN)
        return current if current.get("webhook", {}).get("state") == "delivered" else None

    done = wait_for(delivered, what="the webhook to be delivered")
    assert done["state"] == "succeeded"
    assert done["webhook"]["attempts"] == 2 and done["webhook"]["url"] == receiver.url
    with receiver.lock:
        hits = list(receiver.hits)
    assert len(hits) == 2
    secret = client.get("/webhooks/secret", headers=ADMIN).get_json()["secret"]
    assert secret.startswith("whsec_")
    for hit in hits:
        assert hit.headers["content-type"] == "application/json"
        assert hit.headers["webhook-id"] == f"msg_{job['id']}"  # the same on every retry
        assert hit.headers["webhook-timestamp"].isdigit()
        assert hit.headers["webhook-signature"].startswith("v1,")
        assert webhooks.verify(secret, hit.headers, hit.body)
        assert my_verify(secret, hit.headers, hit.body)
        assert not my_verify(secret, hit.headers, hit.body.replace(b"succeeded", b"failed"))
        payload = json.loads(hit.body)
        assert payload["id"] == job["id"] and payload["state"] == "succeeded"
        assert payload["counts"]["succeeded"] == 1
        assert [i["prompt"] for i in payload["items"]] == ["hooked"]
    # Another account's secret does not verify the admin account's webhook.
    user_secret = client.get("/webhooks/secret", headers=USER).get_json()["secret"]
    assert user_secret != secret
    assert not webhooks.verify(user_secret, hits[1].headers, hits[1].body)
    assert len(sim.predictions()) == 1


def test_a_big_jobs_webhook_carries_its_first_page_and_the_link_to_the_rest(
        make_app: Callable[..., Flask], sim: Simulator, receiver: Receiver) -> None:
    client = make_app(webhook_signing_key=SIGNING_KEY, max_batch_size=100,
                      webhook_retry_base_seconds=0.05).test_client()
    prompts = [f"hooked {i}" for i in range(60)]
    job = submit_async(client, batch(prompts, webhook=receiver.url), ADMIN)
    wait_for(lambda: get_job(client, job["id"], ADMIN)["webhook"]["state"] == "delivered",
             what="the webhook to be delivered")
    with receiver.lock:
        payload = json.loads(receiver.hits[-1].body)
    assert payload["state"] == "succeeded" and payload["counts"]["succeeded"] == 60
    assert [i["prompt"] for i in payload["items"]] == prompts[:50]
    assert payload["items_has_more"] is True
    rest = client.get(payload["items_next"], headers=ADMIN).get_json()
    assert [i["prompt"] for i in rest["data"]] == prompts[50:] and rest["has_more"] is False


def test_webhook_targets_are_checked_per_caller_and_need_a_signing_key(
        make_app: Callable[..., Flask], sim: Simulator, receiver: Receiver) -> None:
    client = make_app(webhook_signing_key=SIGNING_KEY).test_client()
    for url in (receiver.url, receiver.url.replace("http://", "https://"),
                "https://localhost/hook", "https://10.0.0.8/hook", "ftp://example.com/x"):
        response = client.post("/generate-batch", json=batch(["never"], webhook=url),
                               headers=USER)
        assert response.status_code == 400, (url, response.get_json())
        assert response.get_json()["field"] == "webhook"
        assert url not in response.get_json()["error"]
    without_key = make_app(webhook_signing_key=None).test_client()
    response = without_key.post("/generate-batch", json=batch(["never"], webhook=receiver.url),
                                headers=ADMIN)
    assert response.status_code == 400 and response.get_json()["field"] == "webhook"
    assert without_key.get("/webhooks/secret", headers=ADMIN).status_code == 404
    assert sim.predictions() == [] and receiver.hits == []


# --------------------------------------------------------------------------- retention


def test_purge_expired_removes_finished_jobs_and_their_files_only(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(job_retention_seconds=60)
    client = app.test_client()
    data = client.post("/generate-batch", json=batch(["keep me briefly"], output_format="png"),
                       headers=ADMIN).get_json()
    assert data["success"] is True
    job_id = data["job_id"]
    (url,) = data["results"][0]["urls"]
    path = output_root(app) / url.removeprefix("/files/")
    assert path.is_file()
    running = submit_async(client, batch(["#hang still running"]), ADMIN)
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == 2, what="the hung create")

    runner = app.extensions["jobs"]
    assert runner.maintenance.purge_expired(time.time()) == 0  # nothing is past its retention yet
    assert get_job(client, job_id, ADMIN)["state"] == "succeeded"
    assert runner.maintenance.purge_expired(time.time() + 120) == 1
    assert not path.exists() and not path.parent.exists()
    assert client.get(f"/jobs/{job_id}", headers=ADMIN).status_code == 404
    assert client.get(url, headers=ADMIN).status_code == 404
    assert [j["id"] for j in client.get("/jobs", headers=ADMIN).get_json()["data"]] == \
        [running["id"]]
    # A job that has not finished is never removed, however old.
    assert get_job(client, running["id"], ADMIN)["state"] in ("queued", "running")
    client.post(f"/jobs/{running['id']}/cancel", headers=ADMIN)
    assert wait_terminal(client, running["id"], ADMIN)["state"] == "canceled"
