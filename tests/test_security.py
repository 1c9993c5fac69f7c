"""Auth fails closed, names stay inside the output root, tokens never cross users or reach logs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, ADMIN_KEY, OTHER, OTHER_TOKEN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator

AUTH_MESSAGE = ("No valid API key provided. Either provide X-Admin-API-Key or "
                "X-Replicate-API-Key header")
SIMPLE = {"model_name": "flux-dev", "prompt": "x"}
TRAVERSALS = ["../x", "../../app", "/etc/passwd", "a/b", "..\\x", "a\\b", "..", ".", ".env",
              "x\x00y", "x\ny", "C:evil", "", " padded"]


def test_missing_or_wrong_keys_get_401_with_the_seed_message(
        client: FlaskClient, sim: Simulator) -> None:
    for headers in ({}, {"X-Admin-API-Key": "wrong"}, {"X-Admin-API-Key": ""},
                    {"X-Admin-API-Key": ADMIN_KEY + "x"}, {"X-Replicate-API-Key": ""},
                    {"X-Replicate-API-Key": "has space in it"},
                    # A wrong admin key never falls through to a user key.
                    {"X-Admin-API-Key": "wrong", "X-Replicate-API-Key": USER_TOKEN}):
        for path in ("/generate", "/generate-batch", "/configure"):
            response = client.post(path, json=SIMPLE, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.get_json() == {"error": AUTH_MESSAGE,
                                           "request_id": response.headers["X-Request-ID"]}
    assert sim.predictions() == []


def test_unset_admin_key_closes_admin_access(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(admin_api_key=None).test_client()
    for value in ("", "None", "null", "anything"):
        headers = {"X-Admin-API-Key": value}
        assert client.post("/generate", json=SIMPLE, headers=headers).status_code == 401
        assert client.post("/configure", json={"concurrent_limit": 1},
                           headers=headers).status_code == 401
    assert client.post("/generate", json=SIMPLE, headers={}).status_code == 401
    assert sim.predictions(SERVER_TOKEN) == []
    assert client.get("/health").get_json()["admin_key_configured"] is False


def test_user_key_on_admin_route_gets_403(client: FlaskClient) -> None:
    response = client.post("/configure", json={"concurrent_limit": 1}, headers=USER)
    assert response.status_code == 403 and "admin" in response.get_json()["error"]
    assert client.get("/health").get_json()["concurrency_status"]["concurrent_limit"] == 5


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_in_every_name_field_gets_400(
        app: Flask, client: FlaskClient, sim: Simulator, name: str) -> None:
    requests = [
        ("/generate", {**SIMPLE, "custom_filename": name}, "custom_filename"),
        ("/generate-batch", {"model_name": "flux-dev", "prompts": ["a", "b"],
                             "custom_filenames": ["ok", name]}, "custom_filenames[1]"),
        ("/generate-batch", {"tasks": [{"model_name": "flux-dev", "prompt": "a",
                                        "custom_filename": name}]}, "tasks[0].custom_filename"),
    ]
    for path, body, field in requests:
        response = client.post(path, json=body, headers=ADMIN)
        assert response.status_code == 400, (path, name, response.get_json())
        assert response.get_json()["field"] == field
    assert sim.predictions() == []
    output_root: Path = app.extensions["settings"].output_dir
    assert not output_root.exists() or not any(output_root.rglob("*"))


def test_a_server_path_is_never_an_input_image(client: FlaskClient, sim: Simulator) -> None:
    for value in ("/etc/passwd", "file:///etc/passwd", "../../.env", "output/x.png",
                  "/proc/self/environ", "ftp://example.com/a.png", "https://", 12):
        body = {"model_name": "flux-kontext-max", "prompt": "x", "input_image": value}
        response = client.post("/generate", json=body, headers=ADMIN)
        assert response.status_code == 400, value
        assert response.get_json()["field"] == "input_image"
    assert sim.predictions() == []


def test_two_users_at_once_each_spend_only_their_own_token(
        client: FlaskClient, sim: Simulator) -> None:
    sim.config.run_seconds = 0.2
    start = threading.Barrier(3)
    answers: dict[str, int] = {}

    def batch(name: str, headers: dict[str, str]) -> None:
        body = {"model_name": "flux-dev", "prompts": [f"{name}-{i}" for i in range(6)]}
        start.wait()
        answers[name] = client.post("/generate-batch", json=body, headers=headers).status_code

    threads = [threading.Thread(target=batch, args=a) for a in
               (("one", USER), ("two", OTHER), ("admin", ADMIN))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {"one": 200, "two": 200, "admin": 200}
    for token, name in ((USER_TOKEN, "one"), (OTHER_TOKEN, "two"), (SERVER_TOKEN, "admin")):
        prompts = sorted(p["input"]["prompt"] for p in sim.predictions(token))
        assert prompts == [f"{name}-{i}" for i in range(6)]


def test_no_token_or_key_reaches_any_log_line(
        client: FlaskClient, sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sim.config.invalid_tokens = {OTHER_TOKEN}
    client.post("/generate", json=SIMPLE, headers=USER)
    client.post("/generate", json=SIMPLE, headers=OTHER)
    client.post("/generate", json={**SIMPLE, "prompt": "#fail"}, headers=ADMIN)
    client.post("/configure", json={"concurrent_limit": 4}, headers=ADMIN)
    client.post("/configure", json={"concurrent_limit": 4}, headers=USER)
    sim.inject("POST", r"/predictions$", 429, {"detail": "Request was throttled. Your rate "
                                               "limit resets in ~1s.", "status": 429})
    client.post("/generate", json=SIMPLE, headers=ADMIN)
    assert len(caplog.records) > 3  # the logging we inspect really happened
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for secret in (USER_TOKEN, OTHER_TOKEN, SERVER_TOKEN, ADMIN_KEY):
        assert secret not in text
