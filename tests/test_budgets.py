"""Hard budgets and the spend ledger over HTTP (issue #21, parts 3 and 4): an issued key's request
holds its most possible cost before anything is stored, a request that does not fit is a 402 with
nothing created, concurrent requests never overshoot, each finished item is settled at its real
cost, and /usage and /metrics report what the simulator billed."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN, USER
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for
from shared_backends import postgres_database
from test_issued_keys import as_key, mint
from test_jobs import wait_terminal

FLUX = "flux-dev"


def most_cost(client: FlaskClient, prompts: int = 1) -> float:
    """What one flux-dev item may cost at most (its fallback included), as a dry run says."""
    body = {"model_name": FLUX, "prompts": ["x"] * prompts, "dry_run": True}
    items = client.post("/generate-batch", json=body, headers=ADMIN).get_json()["items"]
    return float(items[0]["max_cost_usd_with_fallbacks"])


def batch(client: FlaskClient, key: dict[str, str], count: int) -> Any:
    body = {"model_name": FLUX, "prompts": [f"p{i}" for i in range(count)], "async": True}
    return client.post("/generate-batch", json=body, headers=key)


def test_a_request_that_does_not_fit_is_a_402_and_creates_nothing(
        client: FlaskClient, sim: Simulator) -> None:
    most = most_cost(client)
    key = as_key(mint(client, name="capped", budget_usd=round(2 * most, 6),
                      budget_period="day")["key"])
    refused = batch(client, key, 3)
    assert refused.status_code == 402, refused.get_json()
    body = refused.get_json()
    assert body["error_type"] == "budget_exceeded" and body["budget_period"] == "day"
    assert body["remaining_usd"] == round(2 * most, 6)
    assert body["required_usd"] == round(3 * most, 6)
    assert client.get("/jobs", headers=key).get_json()["data"] == []
    accepted = batch(client, key, 2)
    assert accepted.status_code == 202, accepted.get_json()
    held = client.post("/generate", json={"model_name": FLUX, "prompt": "one more",
                                          "async": True}, headers=key)
    assert held.status_code == 402  # the two open items hold the whole budget
    done = wait_terminal(client, accepted.get_json()["id"], key)
    assert len(sim.predictions(SERVER_TOKEN)) == 2
    shown = client.get(f"/jobs/{done['id']}", headers=ADMIN).get_json()
    key_id = client.get("/keys", headers=ADMIN).get_json()["data"][0]["id"]
    spent = client.get(f"/keys/{key_id}", headers=ADMIN).get_json()
    # Settled at the real cost (flux-dev alone ran), the fallback's share given back.
    assert spent["spent_usd"] == shown["cost_usd"] < 2 * most
    assert spent["remaining_usd"] == round(2 * most - shown["cost_usd"], 6)


def test_the_ledger_and_usage_match_what_the_simulator_billed(
        client: FlaskClient, sim: Simulator) -> None:
    key = as_key(mint(client, name="reports", budget_usd=100)["key"])
    mine = wait_terminal(client, batch(client, key, 3).get_json()["id"], key)
    admin_job = client.post("/generate-batch", json={"model_name": FLUX, "prompts": ["a", "b"],
                                                     "async": True}, headers=ADMIN).get_json()
    theirs = wait_terminal(client, admin_job["id"], ADMIN)
    billed = {p["id"]: p["billed_seconds"] for p in sim.predictions(SERVER_TOKEN)}
    usage = client.get("/usage?group_by=key,model", headers=ADMIN).get_json()
    rows = {row["key"]: row for row in usage["data"]}
    assert set(rows) == {"admin", "reports"}
    assert rows["reports"]["predictions"] == 3 and rows["admin"]["predictions"] == 2
    assert rows["reports"]["cost_usd"] == mine["cost_usd"]
    assert rows["admin"]["cost_usd"] == theirs["cost_usd"]
    assert round(sum(r["billed_seconds"] for r in rows.values()), 5) == round(
        sum(billed.values()), 5)
    assert usage["total_cost_usd"] == round(mine["cost_usd"] + theirs["cost_usd"], 6)
    # A key sees its own rows only; CSV says the same.
    own = client.get("/usage?group_by=model", headers=key).get_json()["data"]
    assert [(r["model"], r["predictions"]) for r in own] == [(FLUX, 3)]
    exported = client.get("/usage?group_by=key,day&format=csv", headers=ADMIN)
    assert exported.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert sorted(r["key"] for r in table) == ["admin", "reports"]
    assert {r["day"] for r in table} == {usage_day(client)}


def usage_day(client: FlaskClient) -> str:
    [row] = client.get("/usage?group_by=day", headers=ADMIN).get_json()["data"]
    return str(row["day"])


def test_usage_refuses_odd_queries(client: FlaskClient) -> None:
    for query in ("group_by=owner", "group_by=", "from=yesterday", "format=xml",
                  "from=2026-12-02&to=2026-12-01"):
        response = client.get(f"/usage?{query}", headers=ADMIN)
        assert response.status_code == 400, query
    assert client.get("/usage").status_code == 401


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_concurrent_requests_never_overshoot_a_budget(
        store: str, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn], sim: Simulator) -> None:
    with ExitStack() as stack:
        database = stack.enter_context(postgres_database()) if store == "postgresql" else None
        _race_for_the_budget(make_settings(database_url=database, single_host=bool(database)),
                             start_gunicorn, sim)


def _race_for_the_budget(settings: Settings, start_gunicorn: Callable[..., Gunicorn],
                         sim: Simulator) -> None:
    # No fallback: an item's most possible cost is its real cost, so 10 items are exactly 10.
    server = start_gunicorn(settings, workers=2, REPLICATE_FALLBACK_CHAINS='{"flux-dev": []}')
    admin = requests.Session()
    most = float(admin.post(f"{server.url}/generate", json={
        "model_name": FLUX, "prompt": "x", "dry_run": True}, headers=ADMIN,
        timeout=10).json()["items"][0]["max_cost_usd_with_fallbacks"])
    secret = admin.post(f"{server.url}/keys", json={"name": "racer", "budget_usd": 10 * most},
                        headers=ADMIN, timeout=10).json()["key"]
    start = threading.Barrier(100)

    def one(index: int) -> int:
        start.wait()
        return requests.post(f"{server.url}/generate", json={
            "model_name": FLUX, "prompt": f"race {index}", "async": True},
            headers=as_key(secret), timeout=60).status_code

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(one, range(100)))
    assert sorted(set(statuses)) == [202, 402] and statuses.count(202) == 10, statuses
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) >= 10, 30, "the 10 creates")
    jobs = admin.get(f"{server.url}/jobs?limit=100", headers=ADMIN, timeout=10).json()["data"]
    assert len(jobs) == 10
    for job in jobs:
        wait_for(lambda job=job: admin.get(f"{server.url}/jobs/{job['id']}", headers=ADMIN,
                                           timeout=10).json()["state"] == "succeeded",
                 30, "each job to end")
    assert len(sim.predictions(SERVER_TOKEN)) == 10
    server.stop()  # before its database is dropped


def test_metrics_count_spend_by_key_name_never_by_secret(
        client: FlaskClient, sim: Simulator) -> None:
    secret = mint(client, name="dashboards")["key"]
    wait_terminal(client, batch(client, as_key(secret), 2).get_json()["id"], as_key(secret))
    text = client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    lines = [line for line in text.splitlines() if line.startswith(
        'replicate_generation_spend_predictions_total{caller="dashboards"')]
    assert lines and lines[0].endswith(" 2.0")
    assert secret not in text


def test_an_account_budget_holds_the_admin_key_and_every_issued_key_together(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    probe = make_app().test_client()
    most = most_cost(probe)
    client = make_app(account_budget_usd=round(2 * most, 6), account_budget_period="day"
                      ).test_client()
    key = as_key(mint(client, name="no-budget-of-its-own")["key"])
    assert batch(client, ADMIN, 1).status_code == 202
    assert batch(client, key, 1).status_code == 202
    for caller in (ADMIN, key):
        refused = batch(client, caller, 1)
        assert refused.status_code == 402, refused.get_json()
        assert "the account's" in refused.get_json()["error"]
    # A user pays with their own account: the server's budget is not theirs.
    assert batch(client, USER, 1).status_code == 202
    assert len(sim.predictions(SERVER_TOKEN)) <= 2
