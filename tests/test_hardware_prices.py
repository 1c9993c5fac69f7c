"""Prices of models outside the curated catalogue (issue #21, part 3), over HTTP against the
simulator: a model whose hardware the operator named (MODEL_HARDWARE) holds its hardware's price
for the longest it can be billed (the task timeout), settles at the seconds Replicate billed
(metrics.predict_time) x that price, and every report agrees with the simulator; a model of
unknown cost is refused a budget unless the key allows unknown cost; concurrent requests never
hold more than the budget."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator, schema_models
from replicate_generation.errors import SettingsError
from replicate_generation.model_functions import CANCEL_WAIT_SECONDS
from replicate_generation.models.hardware import (
    HARDWARE_USD_PER_SECOND,
    PRICES_AS_OF,
    ModelHardware,
)
from replicate_generation.models.schemas import ModelPolicy
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for
from shared_backends import postgres_database
from test_any_model import creates, fresh_schema_cache  # noqa: F401
from test_issued_keys import as_key, mint
from test_jobs import wait_terminal

SCHNELL = schema_models.FLUX_SCHNELL  # on the operator's list: its cost is known
LLAMA = schema_models.LLAMA  # not on it: its cost is unknown
HARDWARE = f"{SCHNELL}=gpu-l40s"
RATE = HARDWARE_USD_PER_SECOND["gpu-l40s"]
TASK_TIMEOUT = 20.0
# The longest a prediction is billed: its task timeout, then the cancel (which may wait).
MOST = round(RATE * (TASK_TIMEOUT + CANCEL_WAIT_SECONDS), 6)
# Predictions end only when the test moves the simulator's clock; creates are not held.
HELD = {"sync_wait_seconds": 0, "poll_interval_seconds": 0.05}


def priced_app(make_app: Callable[..., Flask], **overrides: Any) -> Flask:
    return make_app(**{"model_policy": ModelPolicy("any"),
                       "model_hardware": ModelHardware.parse(HARDWARE),
                       "task_timeout_seconds": TASK_TIMEOUT, **overrides})


def run(client: FlaskClient, headers: dict[str, str], model: str, prompt: str) -> Any:
    return client.post("/generate", json={"model_name": model, "prompt": prompt,
                                          "async": True}, headers=headers)


def key_of(client: FlaskClient, name: str) -> dict[str, Any]:
    listed = client.get("/keys", headers=ADMIN).get_json()["data"]
    key_id = next(k["id"] for k in listed if k["name"] == name)
    return dict(client.get(f"/keys/{key_id}", headers=ADMIN).get_json())


def spend_metric(client: FlaskClient, caller: str, model: str) -> float:
    text = client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    line = f'replicate_generation_spend_usd_total{{caller="{caller}",model="{model}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    assert found, f"no spend line for {caller} / {model}"
    return float(found[0][len(line):])


def test_the_price_table_is_dated_and_the_setting_is_checked_at_start() -> None:
    assert PRICES_AS_OF[:2] == "20" and len(PRICES_AS_OF) == 10
    for sku in ("cpu", "gpu-t4", "gpu-l40s", "gpu-a100-large", "gpu-h100"):
        assert 0 < HARDWARE_USD_PER_SECOND[sku] < 0.1
    hardware = Settings.from_env({"MODEL_HARDWARE": "acme=cpu, acme/big=GPU-H100"}).model_hardware
    assert hardware.of("acme/big") == "gpu-h100" and hardware.of("Acme/small") == "cpu"
    assert hardware.of(f"acme/big:{'0' * 64}") == "gpu-h100" and hardware.of("meta/x") is None
    assert Settings.from_env({}).model_hardware.of("acme/big") is None
    for bad in ("acme/big=gpu-x9", "acme/big", "a b=cpu", "=cpu"):
        with pytest.raises(SettingsError, match="MODEL_HARDWARE"):
            Settings.from_env({"MODEL_HARDWARE": bad})


def test_a_known_hardware_model_holds_its_most_and_settles_at_the_billed_seconds(
        make_app: Callable[..., Flask], held_sim: tuple[Simulator, HeldClock]) -> None:
    sim, clock = held_sim
    client = priced_app(make_app, replicate_base_url=sim.base_url, **HELD).test_client()
    dry = client.post("/generate", json={"model_name": SCHNELL, "prompt": "x", "dry_run": True},
                      headers=ADMIN).get_json()
    assert dry["items"][0]["max_cost_usd_with_fallbacks"] == MOST
    assert dry["estimated_cost_usd"] is None and "MODEL_HARDWARE" in dry["cost_note"]
    key = as_key(mint(client, name="pricer", budget_usd=1)["key"])
    accepted = run(client, key, SCHNELL, "#slow=2.5 a fox")
    assert accepted.status_code == 202, accepted.get_json()
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == 1, 10, "the create")
    # Running: the item holds its hardware's price for the whole task timeout.
    assert key_of(client, "pricer")["spent_usd"] == MOST
    clock.advance(3)
    sim.wake_waiters()
    done = wait_terminal(client, accepted.get_json()["id"], key)
    assert done["state"] == "succeeded", done
    billed = sim.predictions(SERVER_TOKEN)[0]["billed_seconds"]
    assert billed == 2.5
    cost = round(billed * RATE, 6)
    assert done["cost_usd"] == cost and done["items"][0]["cost_usd"] == cost
    assert client.get("/jobs", headers=key).get_json()["data"][0]["cost_usd"] == cost
    assert key_of(client, "pricer")["spent_usd"] == cost
    usage = client.get("/usage?group_by=key,model", headers=ADMIN).get_json()["data"]
    assert len(usage) == 1
    row = usage[0]
    assert (row["key"], row["predictions"], row["cost_usd"], row["billed_seconds"]) == (
        "pricer", 1, cost, billed)
    assert spend_metric(client, "pricer", row["model"]) == pytest.approx(cost, abs=1e-12)


def test_a_failed_prediction_of_a_time_billed_model_is_paid_for_all_the_same(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = priced_app(make_app).test_client()
    key = as_key(mint(client, name="unlucky", budget_usd=1)["key"])
    accepted = run(client, key, SCHNELL, "#fail #slow=0.3 a fox")
    assert accepted.status_code == 202, accepted.get_json()
    done = wait_terminal(client, accepted.get_json()["id"], key)
    assert done["state"] == "failed", done
    [prediction] = sim.predictions(SERVER_TOKEN)
    assert prediction["status"] == "failed" and prediction["billed_seconds"] >= 0.3
    cost = round(prediction["billed_seconds"] * RATE, 6)
    assert done["items"][0]["cost_usd"] == cost and done["cost_usd"] == cost
    assert key_of(client, "unlucky")["spent_usd"] == cost
    row = client.get("/usage?group_by=key", headers=ADMIN).get_json()["data"][0]
    assert (row["cost_usd"], row["billed_seconds"]) == (cost, prediction["billed_seconds"])


def test_a_prediction_canceled_at_the_task_timeout_is_billed_within_its_hold(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    timeout = 3.0  # room for the create on a loaded host: at 1.5 s, CI once timed out before it
    client = priced_app(make_app, task_timeout_seconds=timeout).test_client()
    dry = client.post("/generate", json={"model_name": SCHNELL, "prompt": "x", "dry_run": True},
                      headers=ADMIN).get_json()
    hold = timeout + CANCEL_WAIT_SECONDS
    assert dry["items"][0]["max_cost_usd_with_fallbacks"] == round(RATE * hold, 6)
    job = run(client, ADMIN, SCHNELL, "#slow=30 a fox that takes too long").get_json()
    done = wait_terminal(client, job["id"], ADMIN)
    assert done["items"][0]["error_type"] == "deadline_exceeded", done
    [prediction] = sim.predictions(SERVER_TOKEN)
    # Canceled at the timeout: billed about that long (the cancel's round trip aside).
    assert prediction["status"] == "canceled" and 0 < prediction["billed_seconds"] < hold
    assert prediction["billed_seconds"] == pytest.approx(timeout, abs=1.0)
    cost = round(prediction["billed_seconds"] * RATE, 6)
    assert done["items"][0]["cost_usd"] == cost and done["cost_usd"] == cost
    row = client.get("/usage?group_by=key", headers=ADMIN).get_json()["data"][0]
    assert (row["cost_usd"], row["billed_seconds"]) == (cost, prediction["billed_seconds"])


def test_a_model_of_unknown_cost_needs_a_key_that_allows_it(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = priced_app(make_app).test_client()
    body = mint(client, name="careful", budget_usd=1)
    key = as_key(body["key"])
    assert body["allow_unknown_cost"] is False
    refused = run(client, key, LLAMA, "hi")
    assert refused.status_code == 402, refused.get_json()
    answer = refused.get_json()
    assert answer["error_type"] == "budget_exceeded" and answer["required_usd"] is None
    assert "cost is unknown" in answer["error"] and "allow_unknown_cost" in answer["error"]
    assert creates(sim) == [] and client.get("/jobs", headers=key).get_json()["data"] == []
    changed = client.patch(f"/keys/{body['id']}", json={"allow_unknown_cost": True},
                           headers=ADMIN)
    assert changed.status_code == 200 and changed.get_json()["allow_unknown_cost"] is True
    accepted = run(client, key, LLAMA, "hi")
    assert accepted.status_code == 202, accepted.get_json()
    done = wait_terminal(client, accepted.get_json()["id"], key)
    assert done["state"] == "succeeded" and done["items"][0]["cost_usd"] is None
    # Recorded with what Replicate billed, at no known cost; the budget holds nothing for it.
    row = client.get("/usage?group_by=model", headers=ADMIN).get_json()["data"][0]
    assert row["predictions"] == 1 and row["cost_usd"] == 0.0
    assert row["billed_seconds"] == sim.predictions(SERVER_TOKEN)[0]["billed_seconds"] > 0
    assert key_of(client, "careful")["spent_usd"] == 0.0


def test_an_account_budget_refuses_unknown_cost_to_all_but_keys_allowed_it(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = priced_app(make_app, account_budget_usd=5.0).test_client()
    plain = as_key(mint(client, name="plain")["key"])
    trusted = as_key(mint(client, name="trusted", allow_unknown_cost=True)["key"])
    for caller in (ADMIN, plain):
        refused = run(client, caller, LLAMA, "hi")
        assert refused.status_code == 402, refused.get_json()
        assert "the account's" in refused.get_json()["error"]
    assert creates(sim) == []
    for caller, model in ((trusted, LLAMA), (ADMIN, SCHNELL), (plain, SCHNELL)):
        accepted = run(client, caller, model, "a fox")
        assert accepted.status_code == 202, accepted.get_json()
        assert wait_terminal(client, accepted.get_json()["id"], caller)["state"] == "succeeded"
    assert len(creates(sim)) == 3


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_concurrent_requests_hold_exactly_the_budgets_worth_of_most_costs(
        store: str, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn], held_sim: tuple[Simulator, HeldClock]) -> None:
    with ExitStack() as stack:
        database = stack.enter_context(postgres_database()) if store == "postgresql" else None
        # Room for every racer's prediction at once: an overshoot would show as extra creates.
        settings = make_settings(replicate_base_url=held_sim[0].base_url, concurrent_limit=50,
                                 task_timeout_seconds=TASK_TIMEOUT, database_url=database,
                                 single_host=bool(database), **HELD)
        server = start_gunicorn(settings, workers=2, MODEL_POLICY="any",
                                MODEL_HARDWARE=HARDWARE)
        _race_for_the_budget(server, *held_sim)
        server.stop()  # before its database is dropped


def _race_for_the_budget(server: Gunicorn, sim: Simulator, clock: HeldClock) -> None:
    fits, racers = 5, 30
    admin = requests.Session()
    secret = admin.post(f"{server.url}/keys", json={"name": "racer", "budget_usd": fits * MOST},
                        headers=ADMIN, timeout=10).json()["key"]
    start = threading.Barrier(racers)

    def one(index: int) -> int:
        start.wait()
        return requests.post(f"{server.url}/generate", json={
            "model_name": SCHNELL, "prompt": f"#slow=1 race {index}", "async": True},
            headers=as_key(secret), timeout=60).status_code

    with ThreadPoolExecutor(racers) as pool:
        statuses = list(pool.map(one, range(racers)))
    assert sorted(set(statuses)) == [202, 402] and statuses.count(202) == fits, statuses
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) >= fits, 30, "the creates")
    clock.release()  # the held predictions end; settled below their most, nothing else runs
    jobs = admin.get(f"{server.url}/jobs?limit=100", headers=ADMIN, timeout=10).json()["data"]
    assert len(jobs) == fits

    def all_succeeded() -> bool:
        return all(admin.get(f"{server.url}/jobs/{job['id']}", headers=ADMIN, timeout=10)
                   .json()["state"] == "succeeded" for job in jobs)

    wait_for(all_succeeded, 30, "every job to end")
    billed = sum(p["billed_seconds"] for p in sim.predictions(SERVER_TOKEN))
    assert len(sim.predictions(SERVER_TOKEN)) == fits
    usage = admin.get(f"{server.url}/usage", headers=ADMIN, timeout=10).json()["data"]
    assert usage[0]["billed_seconds"] == pytest.approx(billed, abs=1e-6)
    assert usage[0]["cost_usd"] == pytest.approx(billed * RATE, abs=fits * 1e-6)
