"""A big job waits in the store, not in the process: only a window of its items is queued here
(issue #22, point 2), over HTTP against a simulator whose predictions end when the test says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.jobs.windows import window_size
from servers import wait_for

ITEMS = 120
LIMIT = 4


def status_totals(client: FlaskClient) -> dict[str, Any]:
    return dict(client.get("/status", headers=ADMIN).get_json()["totals"])


def job(client: FlaskClient, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/jobs/{job_id}", headers=ADMIN).get_json())


def created(sim: Simulator) -> list[str]:
    return [str(p["input"].get("prompt")) for p in sim.predictions(SERVER_TOKEN)]


def test_a_job_larger_than_the_queue_waits_in_the_store_and_runs_in_input_order(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    # The per-account queue bound is far below the job's size: before windows this was a 429.
    app = make_app(replicate_base_url=sim.base_url, concurrent_limit=LIMIT,
                   max_queued_per_account=40)
    client = app.test_client()
    prompts = [f"item {i:03d}" for i in range(ITEMS)]
    answer = client.post("/generate-batch", json={"model_name": "flux-dev", "prompts": prompts,
                                                  "async": True}, headers=ADMIN)
    assert answer.status_code == 202, answer.get_json()
    job_id = answer.get_json()["id"]
    wait_for(lambda: status_totals(client)["in_flight"] == LIMIT, 30.0, "every slot held")
    queued_here = status_totals(client)["queued_in_this_process"]
    assert 0 < queued_here <= window_size(LIMIT)  # the other ~100 items are rows in the store
    assert job(client, job_id)["counts"]["queued"] >= ITEMS - window_size(LIMIT) - LIMIT

    clock.release()  # predictions now end as real time passes
    wait_for(lambda: job(client, job_id)["state"] == "succeeded", 120.0, "the job to finish")
    # One create per item, each within a window of its input position: the window moves in order.
    order = created(sim)
    assert sorted(order) == prompts
    assert max(abs(position - prompts.index(p)) for position, p in enumerate(order)) \
        <= window_size(LIMIT)
    assert status_totals(client)["queued_in_this_process"] == 0
