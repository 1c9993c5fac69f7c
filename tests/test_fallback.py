"""Reference routing, fallback and the placeholder over HTTP, asserting on what Replicate saw.

Each trigger of a fallback (failed prediction, 5xx after retries, model missing, model refusing its
input, content policy when asked) and each non-trigger (429, 401, 402, the caller's bad input,
content policy by default) is driven through the simulator; `#fail@<model>` fails one model only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator

FLUX_DEV = "black-forest-labs/flux-dev"
QWEN = "qwen/qwen-image"
KONTEXT = "black-forest-labs/flux-kontext-max"
NANO = "google/nano-banana"
REF = "https://example.com/ref.png"


def generate(client: FlaskClient, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> Any:
    response = client.post("/generate", json=body, headers=headers)
    return response.status_code, response.get_json()


def models_created(sim: Simulator, token: str = SERVER_TOKEN) -> list[str]:
    return [p["model"] for p in sim.predictions(token)]


def create_posts(sim: Simulator) -> list[str]:
    return [r["path"] for r in sim.requests_log()
            if r["method"] == "POST" and r["path"].endswith("/predictions")]


# --------------------------------------------------------------------------- triggers


def test_a_failed_prediction_falls_back_and_says_so(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat #fail@flux-dev",
                                     "aspect_ratio": "16:9"})
    assert status == 200, body
    assert models_created(sim) == [FLUX_DEV, QWEN]
    result = body["results"][0]
    assert (result["model_requested"], result["model_used"]) == ("flux-dev", "qwen-image")
    assert body["model_used"] == "qwen-image"
    first, second = result["attempts"]
    assert first["model"] == FLUX_DEV and first["status"] == "failed" and first["error"]
    assert second["model"] == QWEN and second["status"] == "succeeded"
    assert first["prediction_id"] == sim.predictions(SERVER_TOKEN)[0]["id"]
    assert result["prediction_id"] == sim.predictions(SERVER_TOKEN)[1]["id"]
    assert any("qwen-image" in note for note in result["notes"])
    # The caller's own choice travels with the request; the cost is the model actually used.
    assert sim.predictions(SERVER_TOKEN)[1]["input"]["aspect_ratio"] == "16:9"
    assert result["cost_usd"] == 0.025


def test_a_chain_ends_without_ping_pong(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat #fail"})
    assert status == 502 and body["error_type"] == "model_failed"
    # flux-dev's chain is [qwen-image]; qwen's own chain back to flux-dev is never followed.
    assert models_created(sim) == [FLUX_DEV, QWEN]
    assert [a["model"] for a in body["results"][0]["attempts"]] == [FLUX_DEV, QWEN]
    assert body["results"][0]["files"] == [] and body["results"][0]["placeholder"] is False


def test_server_errors_after_retries_fall_back(client: FlaskClient, sim: Simulator) -> None:
    sim.inject("POST", r"/models/black-forest-labs/flux-dev/predictions$", 500,
               {"detail": "Internal server error"}, count=3)
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat"})
    assert status == 200, body
    paths = create_posts(sim)
    assert sum("flux-dev" in p for p in paths) == 3 and sum("qwen-image" in p for p in paths) == 1
    assert body["results"][0]["model_used"] == "qwen-image"


def test_a_missing_or_refusing_model_falls_back(client: FlaskClient, sim: Simulator) -> None:
    for status_code in (404, 422):
        sim.reset()
        sim.inject("POST", r"/models/black-forest-labs/flux-dev/predictions$", status_code,
                   {"detail": "nope", "status": status_code})
        status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat"})
        assert status == 200, body
        assert body["results"][0]["model_used"] == "qwen-image"
        assert models_created(sim) == [QWEN]


def test_content_policy_falls_back_only_when_asked(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "x #nsfw@flux-dev"})
    assert status == 502 and body["error_type"] == "content_policy"
    assert models_created(sim) == [FLUX_DEV]
    sim.reset()
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "x #nsfw@flux-dev",
                                     "fallback_on_content_policy": True})
    assert status == 200 and body["model_used"] == "qwen-image"
    assert models_created(sim) == [FLUX_DEV, QWEN]


# --------------------------------------------------------------------------- non-triggers


def test_throttling_retries_the_same_model(client: FlaskClient, sim: Simulator) -> None:
    sim.inject("POST", r"/predictions$", 429, headers={"Retry-After": "1"})
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat"})
    assert status == 200, body
    assert body["model_used"] == "flux-dev"
    # The 429 is retried on flux-dev, never passed down the chain; one prediction is made (a
    # create whose answer a loaded machine loses is looked up, and sent again only if absent).
    assert all("flux-dev" in p for p in create_posts(sim)) and len(create_posts(sim)) >= 2
    assert models_created(sim) == [FLUX_DEV]


def test_auth_and_credit_errors_never_fall_back(client: FlaskClient, sim: Simulator) -> None:
    sim.config.invalid_tokens = {USER_TOKEN}
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat"}, USER)
    assert body["error_type"] == "replicate_unauthorized"
    sim.config.no_credit_tokens = {SERVER_TOKEN}
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat"})
    assert body["error_type"] == "replicate_payment_required"
    assert len(create_posts(sim)) == 2  # one each, both on flux-dev
    assert all("flux-dev" in p for p in create_posts(sim))


def test_the_callers_bad_input_is_a_400_and_reaches_no_model(
        client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "cat", "guidance": 99})
    assert status == 400 and body["field"] == "guidance"
    status, body = generate(client, {"model_name": "flux-kontext-max", "prompt": "cat",
                                     "guidance": 3})
    assert status == 400 and body["field"] == "guidance"  # upstream switched model here
    assert sim.predictions() == []


def test_fallback_can_be_turned_off_per_request(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "x #fail@flux-dev",
                                     "fallback": False})
    assert status == 502 and models_created(sim) == [FLUX_DEV]


# --------------------------------------------------------------------------- placeholder


def test_the_placeholder_exists_only_on_request_and_is_no_success(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "imagen-4-ultra", "prompt": "x #fail",
                                     "fallback": False})
    assert status == 502 and body["files"] == [] and body["results"][0]["placeholder"] is False
    status, body = generate(client, {"model_name": "imagen-4-ultra", "prompt": "x #fail",
                                     "fallback": False, "placeholder": True,
                                     "custom_filename": "cover"})
    assert status == 502 and body["success"] is False
    result = body["results"][0]
    assert result["placeholder"] is True and result["state"] == "failed"
    assert result["error_type"] == "model_failed" and result["model_used"] is None
    path = Path(app.extensions["settings"].output_dir).parent / result["files"][0]
    assert path.name == "cover.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_placeholder_is_refused_for_video_and_audio(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "veo-3-fast", "prompt": "x",
                                     "placeholder": True})
    assert status == 400 and body["field"] == "placeholder"


# --------------------------------------------------------------------------- routing


def test_one_reference_routes_to_kontext_and_says_so(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "flux-dev", "prompt": "same cat",
                                     "input_image": REF})
    assert status == 200, body
    created = sim.predictions(SERVER_TOKEN)
    assert [p["model"] for p in created] == [KONTEXT]
    assert created[0]["input"]["input_image"] == REF
    result = body["results"][0]
    assert result["model_requested"] == "flux-dev" and result["model_used"] == "flux-kontext-max"
    assert result["routed"] and "flux-kontext-max" in result["routed"]


def test_several_references_route_to_nano_banana(client: FlaskClient, sim: Simulator) -> None:
    refs = [REF, "https://example.com/style.jpg"]
    status, body = generate(client, {"model_name": "qwen-image", "prompt": "styled sheets",
                                     "image_input": refs})
    assert status == 200, body
    created = sim.predictions(SERVER_TOKEN)
    assert [p["model"] for p in created] == [NANO]
    assert created[0]["input"]["image_input"] == refs
    assert body["results"][0]["routed"]


def test_a_reference_is_never_dropped_on_fallback(client: FlaskClient, sim: Simulator) -> None:
    # kontext's only fallback would lose the image, so the failure is reported instead.
    status, body = generate(client, {"model_name": "flux-kontext-max", "prompt": "x #fail",
                                     "input_image": REF})
    assert status == 502 and models_created(sim) == [KONTEXT]


def test_too_many_references_name_the_field(client: FlaskClient, sim: Simulator) -> None:
    status, body = generate(client, {"model_name": "qwen-image", "prompt": "x",
                                     "image_input": [REF] * 4})
    assert status == 400 and body["field"].startswith("image_input")
    assert sim.predictions() == []


# --------------------------------------------------------------------------- cost


def test_dry_run_estimates_without_calling_replicate(client: FlaskClient, sim: Simulator) -> None:
    response = client.post("/generate-batch", headers=ADMIN, json={
        "dry_run": True, "tasks": [
            {"model_name": "flux-dev", "prompt": "a", "num_outputs": 2},
            {"model_name": "flux-dev", "prompt": "b", "input_image": REF},
            {"model_name": "kling-v2.1-master", "prompt": "c", "duration": 10},
        ]})
    assert response.status_code == 200
    body = response.get_json()
    assert [i["model"] for i in body["items"]] == ["flux-dev", "flux-kontext-max",
                                                   "kling-v2.1-master"]
    assert [i["estimated_cost_usd"] for i in body["items"]] == [0.05, 0.08, 2.8]
    assert body["estimated_cost_usd"] == 2.93
    assert body["items"][1]["routed"]
    assert sim.requests_log() == []


def test_finished_results_carry_their_cost(client: FlaskClient, sim: Simulator) -> None:
    response = client.post("/generate-batch", headers=ADMIN, json={
        "model_name": "flux-dev", "prompts": ["a", "b"], "num_outputs": 2})
    body = response.get_json()
    assert [r["cost_usd"] for r in body["results"]] == [0.05, 0.05]
    assert body["cost_usd"] == 0.1
