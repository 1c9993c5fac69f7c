"""/metrics across gunicorn workers, /ready, X-Request-ID and JSON log lines."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN, ADMIN_KEY, OTHER_TOKEN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for

CREATE_PATH = r"^/v1/models/[^/]+/[^/]+/predictions$"
METRICS_TOKEN = "metrics-token-0123456789"


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == w for k, w in labels.items()))


def _batch(server: Gunicorn, n: int) -> requests.Response:
    body = {"model_name": "flux-dev", "prompts": [f"metrics prompt {n}-{i}" for i in range(3)]}
    return server.post("/generate-batch", body, ADMIN)


def test_metrics_across_two_workers_match_the_simulator(
        sim: Simulator, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=2)
    sim.inject("POST", CREATE_PATH, 429, headers={"Retry-After": "1"}, count=3)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: _batch(server, n), range(4)))
    assert all(a.status_code == 200 and a.json()["success"] for a in answers)
    scrape = requests.get(server.url + "/metrics", headers=ADMIN, timeout=10)
    assert scrape.status_code == 200
    samples = _samples(scrape.text)
    sent = [r for r in sim.requests_log() if r["method"] == "POST"
            and re.match(CREATE_PATH, r["path"])]
    create = "predictions.create"
    assert _total(samples, "replicate_generation_replicate_requests_total",
                  endpoint=create) == len(sent)
    assert _total(samples, "replicate_generation_replicate_throttled_total",
                  endpoint=create) == 3
    assert _total(samples, "replicate_generation_predictions_created_total",
                  model="flux-dev") == sim.stats(SERVER_TOKEN)["creates_accepted"] == 12
    assert _total(samples, "replicate_generation_predictions_finished_total",
                  outcome="succeeded") == 12
    assert _total(samples, "replicate_generation_backoff_seconds_total") >= 3
    assert _total(samples, "replicate_generation_jobs", state="succeeded") == 4
    assert _total(samples, "replicate_generation_cost_usd_total") > 0
    _assert_no_secret_labels(samples)


def _assert_no_secret_labels(samples: list[tuple[str, dict[str, str], float]]) -> None:
    for name, labels, _value in samples:
        for value in labels.values():
            assert not value.startswith("acct_"), (name, labels)
            assert not any(s in value for s in (SERVER_TOKEN, USER_TOKEN, OTHER_TOKEN,
                                                ADMIN_KEY)), (name, labels)


def test_metrics_access_admin_token_and_open(make_app: Callable[..., Flask]) -> None:
    admin = make_app().test_client()
    assert admin.get("/metrics").status_code == 401
    assert admin.get("/metrics", headers=USER).status_code == 403
    assert admin.get("/metrics", headers=ADMIN).status_code == 200
    token = make_app(metrics_access="token", metrics_token=METRICS_TOKEN).test_client()
    assert token.get("/metrics", headers=ADMIN).status_code == 401
    bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert token.get("/metrics", headers=bearer).status_code == 200
    opened = make_app(metrics_access="open").test_client()
    answer = opened.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")


# --------------------------------------------------------------------------- readiness


def test_ready_flips_when_the_state_file_is_unusable(app: Flask, client: FlaskClient) -> None:
    assert client.get("/ready").get_json()["status"] == "ready"
    state = Path(app.extensions["settings"].state_file)
    aside = state.with_name("aside.sqlite3")
    os.rename(state, aside)
    state.mkdir()  # the state file replaced by a directory
    try:
        answer = client.get("/ready")
        assert answer.status_code == 503
        assert answer.get_json()["checks"]["state_file"].startswith("unusable")
        assert "request_id" in answer.get_json()
    finally:
        shutil.rmtree(state)
        os.rename(aside, state)
    assert client.get("/ready").status_code == 200
    assert client.get("/health").status_code == 200


def test_ready_is_503_once_the_dispatcher_stops(app: Flask, client: FlaskClient) -> None:
    app.extensions["jobs"].close()
    answer = client.get("/ready")
    assert answer.status_code == 503
    assert answer.get_json()["checks"]["dispatcher"] == "stopped"


# --------------------------------------------------------------------------- request ids


def test_request_id_on_success_and_error_responses(client: FlaskClient) -> None:
    mine = client.get("/health", headers={"X-Request-ID": "trace:abc-1.2_3"})
    assert mine.headers["X-Request-ID"] == "trace:abc-1.2_3"
    fresh = client.get("/models")
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", fresh.headers["X-Request-ID"])
    for insane in ("has space", "x" * 129, "semi;colon", ""):
        answer = client.get("/health", headers={"X-Request-ID": insane})
        assert answer.headers["X-Request-ID"] != insane
    for error in (client.post("/generate", json={}, headers={"X-Request-ID": "err-1"}),
                  client.get("/nowhere", headers={"X-Request-ID": "err-1"}),
                  client.post("/generate", data="x", headers={**ADMIN, "X-Request-ID": "err-1"}),
                  client.post("/generate", headers={**ADMIN, "X-Request-ID": "err-1"},
                              json={"model_name": "flux-dev", "prompt": "#fail fails",
                                    "fallback": False})):
        assert error.status_code >= 400
        assert error.headers["X-Request-ID"] == "err-1"
        assert error.get_json()["request_id"] == "err-1"


def test_request_id_in_every_log_line_of_the_request_and_its_job_as_json(
        sim: Simulator, make_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=1, LOG_FORMAT="json")
    answer = requests.post(server.url + "/generate", timeout=60,
                           json={"model_name": "flux-dev", "prompt": "a traced lighthouse"},
                           headers={**ADMIN, "X-Request-ID": "trace-lighthouse-1"})
    assert answer.status_code == 200
    assert answer.headers["X-Request-ID"] == "trace-lighthouse-1"
    wait_for(lambda: "POST /generate HTTP" in server.log(), what="the access line")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    traced = [line for line in lines if line["request_id"] == "trace-lighthouse-1"]
    assert any(line["message"].startswith("prediction ") for line in traced)  # the job's line
    assert any("POST /generate HTTP" in line["message"] for line in traced)  # access line
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
