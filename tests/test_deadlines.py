"""Start deadlines over HTTP against the simulator (issue #21, part 5): `deadline_seconds` ends an
item not created in time `expired` with nothing created, and a created one carries Replicate's
`Cancel-After`, so a prediction that has not started by then is aborted unbilled."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, USER, USER_TOKEN, HeldClock
from replicate_generation.clients import GuardedTransport, create_headers
from replicate_generation.devtools.simulator import Simulator
from servers import wait_for
from test_jobs import get_job, submit_async, wait_terminal

# Held-clock runs: creates answered at once (no Prefer: wait hold), polls every 50 ms.
HELD = {"sync_wait_seconds": 0, "poll_interval_seconds": 0.05}
# Long enough for a first create to be in time on a busy machine; short enough for a quick test.
IN_TIME = 2.0


def batch(prompts: list[str], **extra: Any) -> dict[str, Any]:
    return {"model_name": "flux-dev", "prompts": prompts, **extra}


def creates_seen(sim: Simulator) -> list[dict[str, Any]]:
    """The create requests the simulator answered 201, in order."""
    return [e for e in sim.requests_log()
            if e["method"] == "POST" and e["path"].endswith("/predictions")
            and e["status"] == 201]


def items(client: FlaskClient, job_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    return list(get_job(client, job_id, headers)["items"])


def assert_expired_unsent(item: dict[str, Any]) -> None:
    assert (item["state"], item["error_type"], item["success"]) == ("expired", "expired", False)
    assert "not created within deadline_seconds" in item["error"]
    assert item["prediction_id"] is None and item["attempts"] == [] and item["files"] == []


def test_items_waiting_for_a_slot_past_their_deadline_expire_and_create_nothing(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    # Two workers on one state file and one slot: the holder's prediction keeps it.
    holder, waiter = (make_app(replicate_base_url=sim.base_url, concurrent_limit=1, **HELD)
                      .test_client() for _ in range(2))
    held = submit_async(holder, batch(["holder #slow=1"]), USER)
    wait_for(lambda: len(sim.predictions(USER_TOKEN)) == 1, 10, "the holder's create")
    began = time.monotonic()
    job = submit_async(waiter, batch(["late one", "late two"], deadline_seconds=IN_TIME), USER)
    done = wait_terminal(waiter, job["id"], USER, timeout=10)
    # Given up at the deadline, not when the slot came free (the holder still runs).
    assert time.monotonic() - began < IN_TIME + 3
    assert done["state"] == "failed"
    assert done["counts"]["expired"] == 2 and done["counts"]["failed"] == 0
    for item in items(waiter, job["id"], USER):
        assert_expired_unsent(item)
    assert [p["input"]["prompt"] for p in sim.predictions(USER_TOKEN)] == ["holder #slow=1"]
    assert len(creates_seen(sim)) == 1
    clock.advance(2)
    sim.wake_waiters()
    assert wait_terminal(holder, held["id"], USER)["state"] == "succeeded"


def test_items_queued_behind_a_running_one_expire_and_the_job_partially_fails(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    client = make_app(replicate_base_url=sim.base_url, concurrent_limit=1, **HELD).test_client()
    accepted = time.time()
    job = submit_async(client, batch(["first #slow=1", "second", "third"],
                                     deadline_seconds=IN_TIME), USER)
    wait_for(lambda: len(sim.predictions(USER_TOKEN)) == 1, 10, "the first create")
    wait_for(lambda: time.time() > accepted + IN_TIME + 0.2, 5, "the deadline to pass")
    clock.advance(2)  # the first prediction ends: its runner is free for the others
    sim.wake_waiters()
    done = wait_terminal(client, job["id"], USER, timeout=10)
    assert done["state"] == "partially_failed"
    assert {k: done["counts"][k] for k in ("succeeded", "expired", "failed")} == {
        "succeeded": 1, "expired": 2, "failed": 0}
    first, *rest = items(client, job["id"], USER)
    assert first["state"] == "succeeded" and first["files"]
    for item in rest:
        assert_expired_unsent(item)
    creates = creates_seen(sim)
    assert [c["json"]["input"]["prompt"] for c in creates] == ["first #slow=1"]
    # Under 5 s were left when it was created: Replicate's minimum is sent.
    assert creates[0]["cancel_after"] == "5s"
    retried = client.post(f"/jobs/{job['id']}/retry", headers=USER)
    assert retried.status_code == 202, retried.get_json()
    clock.release()
    again = wait_terminal(client, retried.get_json()["id"], USER, timeout=10)
    assert again["state"] == "succeeded" and again["total"] == 2
    # A retry is asked for now: it runs without the old deadline (no Cancel-After).
    assert [c["cancel_after"] for c in creates_seen(sim)[1:]] == [None, None]


def test_items_whose_create_token_comes_after_the_deadline_expire_unsent(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    # One create every 10 s: one item (whichever is first) takes the burst, the others' turn
    # is past their deadline.
    client = make_app(requests_per_minute=6, create_burst=1).test_client()
    began = time.monotonic()
    job = submit_async(client, batch(["a", "b", "c"], deadline_seconds=IN_TIME), USER)
    done = wait_terminal(client, job["id"], USER, timeout=10)
    assert time.monotonic() - began < IN_TIME + 3
    assert done["state"] == "partially_failed" and done["counts"]["expired"] == 2
    by_state: dict[str, list[dict[str, Any]]] = {}
    for item in items(client, job["id"], USER):
        by_state.setdefault(item["state"], []).append(item)
    (created,) = by_state["succeeded"]
    for item in by_state["expired"]:
        assert_expired_unsent(item)
    assert [c["json"]["input"]["prompt"] for c in creates_seen(sim)] == [created["prompt"]]


def test_a_fallback_is_not_created_after_the_deadline(client: FlaskClient,
                                                      sim: Simulator) -> None:
    # flux-dev fails after the deadline; its fallback (qwen-image) is never sent.
    job = submit_async(client, batch([f"a fox #slow={IN_TIME + 0.5} #fail@flux-dev"],
                                     deadline_seconds=IN_TIME), USER)
    done = wait_terminal(client, job["id"], USER, timeout=10)
    assert done["state"] == "failed" and done["counts"]["expired"] == 1
    (item,) = items(client, job["id"], USER)
    (made,) = sim.predictions(USER_TOKEN)
    assert made["model"] == "black-forest-labs/flux-dev" and made["status"] == "failed"
    assert (item["state"], item["error_type"]) == ("expired", "expired")
    # The earlier attempt is kept with its prediction; no placeholder, no second create.
    assert [(a["model"], a["prediction_id"], a["status"]) for a in item["attempts"]] == [
        ("black-forest-labs/flux-dev", made["id"], "failed")]
    assert item["prediction_id"] == made["id"] and item["files"] == []
    assert len(creates_seen(sim)) == 1


def test_a_prediction_still_queued_at_replicate_at_its_deadline_is_aborted_and_the_item_expires(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    sim.configure(queue_seconds=100.0)  # Replicate has no GPU for it in time
    client = make_app(replicate_base_url=sim.base_url, **HELD).test_client()
    job = submit_async(client, batch(["waits for a GPU"], deadline_seconds=30), USER)
    # The request log gets its line once the answer is sent, after the prediction exists.
    (create,) = wait_for(lambda: creates_seen(sim), 10, "the create's answer")
    header = create["cancel_after"]
    match = re.fullmatch(r"(\d+)s", header or "")
    assert match is not None and 25 <= int(match.group(1)) <= 30, header
    clock.advance(31)
    sim.wake_waiters()
    done = wait_terminal(client, job["id"], USER, timeout=10)
    prediction = sim.predictions(USER_TOKEN)[0]
    assert prediction["status"] == "aborted" and prediction["billed_seconds"] == 0.0
    assert done["state"] == "failed" and done["counts"]["expired"] == 1
    (item,) = items(client, job["id"], USER)
    assert (item["state"], item["error_type"]) == ("expired", "expired")
    assert item["prediction_id"] == prediction["id"]
    assert [(a["prediction_id"], a["status"]) for a in item["attempts"]] == [
        (prediction["id"], "aborted")]
    assert item["cost_usd"] is None and item["files"] == []
    assert "aborted it unbilled" in item["error"]
    assert len(creates_seen(sim)) == 1  # no fallback, no second create


def test_a_job_resumed_after_a_restart_keeps_its_deadline(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    settings = {"replicate_base_url": sim.base_url, "concurrent_limit": 1, **HELD}
    first = make_app(shutdown_grace_seconds=0.1, **settings)
    accepted = time.time()
    job = submit_async(first.test_client(), batch(["first #slow=1", "second"],
                                                  deadline_seconds=IN_TIME), USER)
    wait_for(lambda: len(sim.predictions(USER_TOKEN)) == 1, 10, "the first create")
    first.extensions["jobs"].close()  # "second" never left the queue
    wait_for(lambda: time.time() > accepted + IN_TIME + 0.2, 5, "the deadline to pass")
    second = make_app(**settings).test_client()
    get_job(second, job["id"], USER)  # the owner's request resumes the job
    clock.advance(2)
    sim.wake_waiters()
    done = wait_terminal(second, job["id"], USER, timeout=15)
    assert done["state"] == "partially_failed"
    # The prediction made in time was polled to its end; the other was never created.
    first_item, second_item = items(second, job["id"], USER)
    assert first_item["state"] == "succeeded"
    assert_expired_unsent(second_item)
    assert len(creates_seen(sim)) == 1


@pytest.mark.parametrize("value", [0, -1, 86401, 86400.5, "10", True, [5]])
def test_a_bad_deadline_is_a_400_naming_it_and_creates_nothing(
        client: FlaskClient, sim: Simulator, value: object) -> None:
    for path, body in (("/generate", {"model_name": "flux-dev", "prompt": "a fox"}),
                       ("/generate-batch", batch(["a fox", "a cat"]))):
        response = client.post(path, json={**body, "deadline_seconds": value}, headers=ADMIN)
        assert response.status_code == 400, response.get_json()
        answer = response.get_json()
        assert answer["field"] == "deadline_seconds" and "deadline_seconds" in answer["error"]
    assert sim.predictions() == [] and sim.requests_log() == []


def test_cancel_after_is_sent_only_with_a_deadline(client: FlaskClient, sim: Simulator) -> None:
    plain = client.post("/generate", headers=ADMIN,
                        json={"model_name": "flux-dev", "prompt": "no deadline"})
    assert plain.status_code == 200, plain.get_json()
    timed = client.post("/generate-batch", headers=ADMIN,
                        json=batch(["timed"], deadline_seconds=86400.0))
    assert timed.status_code == 200, timed.get_json()
    by_prompt = {c["json"]["input"]["prompt"]: c["cancel_after"] for c in creates_seen(sim)}
    assert by_prompt["no deadline"] is None
    assert by_prompt["timed"] in ("86399s", "86398s")
    # Only creates carry it: polls and downloads never do.
    assert all(e["cancel_after"] is None for e in sim.requests_log()
               if not e["path"].endswith("/predictions"))


def test_create_headers_go_on_this_threads_creates_only_and_are_forgotten_after_an_error(
        sim: Simulator) -> None:
    http = httpx.Client(transport=GuardedTransport(httpx.Timeout(5.0), 4), base_url=sim.base_url,
                        headers={"Authorization": f"Bearer {USER_TOKEN}"})
    creates = ["/v1/models/o/n/predictions", "/v1/deployments/o/n/predictions", "/v1/predictions"]
    with pytest.raises(RuntimeError), create_headers({"Cancel-After": "9s"}):
        for path in creates:
            http.post(path, json={})
        http.get("/v1/predictions/p1")
        http.post("/v1/predictions/p1/cancel")
        other = threading.Thread(target=lambda: http.post("/v1/predictions", json={}))
        other.start()
        other.join()
        raise RuntimeError  # the block ends by an error: the headers are forgotten anyway
    http.post("/v1/predictions", json={})
    http.close()
    seen = [(e["method"], e["path"], e["cancel_after"]) for e in sim.requests_log()]
    assert seen == [*[("POST", path, "9s") for path in creates],
                    ("GET", "/v1/predictions/p1", None),
                    ("POST", "/v1/predictions/p1/cancel", None),
                    ("POST", "/v1/predictions", None),  # another thread's create
                    ("POST", "/v1/predictions", None)]  # after the block


def test_a_synchronous_call_that_expires_answers_504_and_creates_nothing(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    client = make_app(replicate_base_url=sim.base_url, concurrent_limit=1, **HELD).test_client()
    submit_async(client, batch(["holder #slow=1"]), USER)
    wait_for(lambda: len(sim.predictions(USER_TOKEN)) == 1, 10, "the holder's create")
    began = time.monotonic()
    late = client.post("/generate", json={"model_name": "flux-dev", "prompt": "too late",
                                          "deadline_seconds": 1}, headers=USER)
    assert late.status_code == 504, late.get_json()
    # At its deadline, not when the running batch item gave its runner back (the task timeout).
    assert time.monotonic() - began < 8
    assert late.get_json()["results"][0]["error_type"] == "expired"
    assert [p["input"]["prompt"] for p in sim.predictions(USER_TOKEN)] == ["holder #slow=1"]
    clock.release()
    sim.wake_waiters()
