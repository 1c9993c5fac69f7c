"""Every route over HTTP (Flask test client) against the simulator, success and error paths."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, ADMIN_KEY, OTHER, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.models.catalogue import MODELS
from replicate_generation.models.schemas import ModelPolicy

PNG_1PX = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def post(client: FlaskClient, path: str, body: Any, headers: dict[str, str]) -> Any:
    return client.post(path, json=body, headers=headers)


def files_on_disk(app: Flask, files: list[str]) -> list[Path]:
    root = app.extensions["settings"].output_dir
    return [root.parent / f for f in files]


# --------------------------------------------------------------------------- health/models


def test_health_needs_no_key_and_reports_limits(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy"
    assert body["service"] == "replicate-concurrent-generation"
    assert body["supported_models"] == sorted(MODELS)
    assert body["concurrency_status"]["concurrent_limit"] == 5
    assert body["concurrency_status"]["requests_per_minute"] == 6000


def test_read_only_routes_refuse_other_methods(client: FlaskClient) -> None:
    for path in ("/health", "/models", "/status"):
        response = client.post(path, json={}, headers=ADMIN)
        assert response.status_code == 405 and "error" in response.get_json()
    assert client.get("/configure", headers=ADMIN).status_code == 405


def test_models_lists_every_parameter_with_type_choices_and_default(client: FlaskClient) -> None:
    body = client.get("/models").get_json()
    assert body["model_count"] == len(MODELS) == 9
    flux = body["models"]["flux-dev"]
    assert flux["replicate_model"] == "black-forest-labs/flux-dev"
    assert flux["parameters"]["aspect_ratio"]["choices"] == ["1:1", "16:9", "9:16", "3:4", "4:3"]
    assert flux["parameters"]["num_outputs"] == {
        "type": "integer", "description": "Images to generate.", "required": False,
        "default": 1, "minimum": 1, "maximum": 4}
    kontext = body["models"]["flux-kontext-max"]["parameters"]
    assert kontext["input_image"]["type"] == "uri"
    assert kontext["output_format"]["choices"] == ["jpg", "png"]
    qwen = body["models"]["qwen-image"]["parameters"]
    assert qwen["lora_scale"]["maximum"] == 2
    assert qwen["aspect_ratio"]["default"] == "16:9"


def test_a_model_the_server_does_not_serve_is_a_404_in_the_error_shape(
        client: FlaskClient) -> None:
    for path in ("/models/acme/no-such-model", "/models/0/swagger-ui.css"):
        response = client.get(path, headers=ADMIN)
        assert response.status_code == 404, response.get_json()
        assert "not supported" in response.get_json()["error"]
        assert response.get_json()["supported_models"] == sorted(MODELS)
    assert client.get("/models/acme/no-such-model").status_code == 401  # others need a key
    assert client.get("/models/black-forest-labs/flux-dev").status_code == 200


def test_whole_floats_are_integers_for_any_model_and_reach_replicate_as_ints(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(model_policy=ModelPolicy("any")).test_client()
    body = {"model_name": "black-forest-labs/flux-schnell", "prompt": "a fox",
            "num_outputs": 2.0, "seed": 7.0}
    response = post(client, "/generate", body, ADMIN)
    assert response.status_code == 200, response.get_json()
    (prediction,) = sim.predictions(SERVER_TOKEN)
    sent = prediction["input"]
    assert (sent["num_outputs"], sent["seed"]) == (2, 7)
    assert type(sent["num_outputs"]) is int and type(sent["seed"]) is int
    assert post(client, "/generate", {**body, "seed": 7.5}, ADMIN).status_code == 400


# --------------------------------------------------------------------------- /generate


def test_seed_single_example_writes_a_jpg_with_the_server_token(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    body = {"model_name": "flux-dev", "prompt": "A serene mountain landscape at sunset",
            "aspect_ratio": "16:9", "output_format": "jpg"}
    response = post(client, "/generate", body, ADMIN)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    assert data["success"] is True and data["count"] == 1 and data["model_name"] == "flux-dev"
    (path,) = files_on_disk(app, data["files"])
    assert path.name == "flux_dev.jpg" and path.read_bytes()[:3] == b"\xff\xd8\xff"
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert prediction["model"] == "black-forest-labs/flux-dev"
    assert prediction["id"] == data["prediction_id"]
    # Every default is sent explicitly, and the caller's values win.
    assert prediction["input"] == {
        "prompt": "A serene mountain landscape at sunset", "aspect_ratio": "16:9",
        "output_format": "jpg", "megapixels": "1", "output_quality": 80, "guidance": 3,
        "num_inference_steps": 28, "prompt_strength": 0.8, "go_fast": True, "num_outputs": 1,
        "disable_safety_checker": False, "seed": data["results"][0]["seed"]}
    assert isinstance(data["results"][0]["seed"], int)  # chosen per item, returned
    assert data["results"][0]["model_used"] == "flux-dev"


def test_full_model_name_and_custom_filename_take_the_real_extension(
        app: Flask, client: FlaskClient) -> None:
    body = {"model_name": "qwen/qwen-image", "prompt": "山水画", "custom_filename": "cover.png"}
    data = post(client, "/generate", body, USER).get_json()
    assert data["success"] is True
    (path,) = files_on_disk(app, data["files"])
    assert path.name == "cover.webp"  # qwen's default format is webp, whatever the name said
    assert path.read_bytes()[8:12] == b"WEBP"


def test_user_key_spends_only_the_users_token(client: FlaskClient, sim: Simulator) -> None:
    assert post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, USER).status_code \
        == 200
    assert len(sim.predictions(USER_TOKEN)) == 1
    assert sim.predictions(SERVER_TOKEN) == []


def test_several_outputs_are_numbered(app: Flask, client: FlaskClient) -> None:
    body = {"model_name": "flux-dev", "prompt": "x", "num_outputs": 3, "custom_filename": "shoe"}
    data = post(client, "/generate", body, ADMIN).get_json()
    assert [Path(f).name for f in data["files"]] == ["shoe_1.webp", "shoe_2.webp", "shoe_3.webp"]
    assert all(p.exists() for p in files_on_disk(app, data["files"]))


def test_kontext_takes_a_url_or_data_uri_reference(client: FlaskClient, sim: Simulator) -> None:
    for image in ("https://example.com/ref.jpg", f"data:image/png;base64,{PNG_1PX}"):
        body = {"model_name": "flux-kontext-max", "prompt": "red hair", "input_image": image}
        assert post(client, "/generate", body, ADMIN).status_code == 200
    inputs = [p["input"] for p in sim.predictions(SERVER_TOKEN)]
    assert [i["input_image"][:5] for i in inputs] == ["https", "data:"]
    assert inputs[0]["aspect_ratio"] == "match_input_image" and inputs[0]["safety_tolerance"] == 2


def test_bad_parameters_get_400_naming_the_field(client: FlaskClient, sim: Simulator) -> None:
    cases = [
        ({"prompt": "x"}, "model_name"),
        ({"model_name": "flux-dev"}, "prompt"),
        ({"model_name": "flux-dev", "prompt": "   "}, "prompt"),
        ({"model_name": "flux-dev", "prompt": 7}, "prompt"),
        ({"model_name": "flux-dev", "prompt": "x", "aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"model_name": "flux-dev", "prompt": "x", "guidance": 11}, "guidance"),
        ({"model_name": "flux-dev", "prompt": "x", "guidance": "3"}, "guidance"),
        ({"model_name": "flux-dev", "prompt": "x", "num_outputs": 5}, "num_outputs"),
        ({"model_name": "flux-dev", "prompt": "x", "num_outputs": True}, "num_outputs"),
        ({"model_name": "flux-dev", "prompt": "x", "num_inference_steps": 2.5},
         "num_inference_steps"),
        ({"model_name": "flux-dev", "prompt": "x", "go_fast": 1}, "go_fast"),
        ({"model_name": "flux-dev", "prompt": "x", "megapixels": 1}, "megapixels"),
        ({"model_name": "flux-dev", "prompt": "x", "bogus": 1}, "bogus"),
        ({"model_name": "flux-dev", "prompt": "x", "input_image": "/app/.env"}, "input_image"),
        ({"model_name": "flux-kontext-max", "prompt": "x", "output_format": "webp"},
         "output_format"),
        ({"model_name": "flux-kontext-max", "prompt": "x", "safety_tolerance": 7},
         "safety_tolerance"),
        ({"model_name": "qwen-image", "prompt": "x", "lora_scale": -0.1}, "lora_scale"),
        ({"model_name": "qwen-image", "prompt": "x", "image_size": "big"}, "image_size"),
        ({"model_name": "flux-dev", "prompt": "x", "seed": -1}, "seed"),
        ({"model_name": "flux-dev", "prompt": "x", "custom_filename": 5}, "custom_filename"),
    ]
    for body, field in cases:
        response = post(client, "/generate", body, ADMIN)
        assert response.status_code == 400, (body, response.get_json())
        error = response.get_json()
        assert error["field"] == field, (body, error)
        assert field in error["error"] or "Model" in error["error"], error
    assert sim.predictions() == []


def test_unknown_model_lists_the_supported_ones(client: FlaskClient) -> None:
    response = post(client, "/generate", {"model_name": "invalid-model", "prompt": "x"}, ADMIN)
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "Model 'invalid-model' not supported", "field": "model_name",
        "supported_models": sorted(MODELS), "request_id": response.headers["X-Request-ID"]}


def test_malformed_requests_get_the_right_4xx(client: FlaskClient, sim: Simulator) -> None:
    text = client.post("/generate", data="prompt=x", headers=ADMIN,
                       content_type="application/x-www-form-urlencoded")
    assert text.status_code == 415 and "application/json" in text.get_json()["error"]
    broken = client.post("/generate", data="{not json", headers=ADMIN,
                         content_type="application/json")
    assert broken.status_code == 400 and broken.get_json()["error"]
    listed = post(client, "/generate", ["x"], ADMIN)
    assert listed.status_code == 400 and "object" in listed.get_json()["error"]
    assert client.get("/generate", headers=ADMIN).status_code == 405
    assert "POST" in client.get("/generate", headers=ADMIN).headers["Allow"]
    missing = client.get("/nope")
    assert missing.status_code == 404 and "error" in missing.get_json()
    assert sim.predictions() == []


def test_body_over_the_limit_gets_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_request_bytes=2048).test_client()
    response = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x" * 4096}, ADMIN)
    assert response.status_code == 413 and "error" in response.get_json()


def test_model_failures_are_502_with_distinct_kinds(client: FlaskClient) -> None:
    expected = {"#fail": "model_failed", "#nsfw": "content_policy", "#empty": "empty_output"}
    for marker, kind in expected.items():
        response = post(client, "/generate", {"model_name": "flux-dev", "prompt": marker}, ADMIN)
        data = response.get_json()
        assert response.status_code == 502, data
        assert data["success"] is False and data["error_type"] == kind
        assert data["error"].startswith("Generation failed: ") and data["prediction_id"]


def test_a_hung_prediction_is_canceled_at_the_deadline(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(task_timeout_seconds=1.0).test_client()
    response = post(client, "/generate", {"model_name": "flux-dev", "prompt": "#hang"}, ADMIN)
    data = response.get_json()
    assert response.status_code == 504 and data["error_type"] == "deadline_exceeded"
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert prediction["status"] == "canceled" and prediction["id"] == data["prediction_id"]
    assert sim.stats(SERVER_TOKEN)["inflight_now"] == 0


def test_replicate_auth_credit_and_input_errors_are_not_retried(
        client: FlaskClient, sim: Simulator) -> None:
    sim.config.invalid_tokens = {USER_TOKEN}
    bad = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, USER)
    assert bad.status_code == 502 and bad.get_json()["error_type"] == "replicate_unauthorized"
    sim.config.no_credit_tokens = {SERVER_TOKEN}
    broke = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, ADMIN)
    assert broke.get_json()["error_type"] == "replicate_payment_required"
    assert "insufficient credit" in broke.get_json()["error"]
    sim.config.no_credit_tokens = set()
    for status, kind in ((404, "replicate_not_found"), (422, "replicate_invalid_input")):
        sim.inject("POST", r"/predictions$", status, {"detail": "nope", "status": status})
        # kontext has no fallback chain: a 404/422 would otherwise move on to the next model.
        response = post(client, "/generate", {"model_name": "flux-kontext-max", "prompt": "x"},
                        ADMIN)
        assert response.get_json()["error_type"] == kind
    # One create per request: none of those were retried.
    posts = [r for r in sim.requests_log() if r["method"] == "POST"]
    assert len(posts) == 4


# --------------------------------------------------------------------------- /generate-batch


def test_seed_batch_example_keeps_order_and_names(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    body = {"model_name": "flux-dev",
            "prompts": ["A red sports car", "A blue ocean wave", "A green forest path"],
            "custom_filenames": ["car_image_001", "ocean_wave_002", "forest_path_003"],
            "aspect_ratio": "16:9"}
    response = post(client, "/generate-batch", body, ADMIN)
    data = response.get_json()
    assert response.status_code == 200 and data["success"] is True
    assert data["total_prompts"] == 3 and data["successful_count"] == 3
    assert data["failed_count"] == 0 and data["failed_results"] == []
    names = [Path(r["files"][0]).name for r in data["successful_results"]]
    assert names == ["car_image_001.webp", "ocean_wave_002.webp", "forest_path_003.webp"]
    assert [r["prompt_index"] for r in data["successful_results"]] == [0, 1, 2]
    assert [r["prompt"] for r in data["results"]] == body["prompts"]
    by_prompt = {p["input"]["prompt"]: p for p in sim.predictions(SERVER_TOKEN)}
    for result in data["results"]:
        assert by_prompt[result["prompt"]]["id"] == result["prediction_id"]
        assert by_prompt[result["prompt"]]["input"]["aspect_ratio"] == "16:9"
    assert all(p.exists() for r in data["results"] for p in files_on_disk(app, r["files"]))


def test_seed_basic_batch_gets_unique_default_names(client: FlaskClient) -> None:
    body = {"model_name": "flux-dev", "prompts": ["a", "b", "c"], "aspect_ratio": "1:1"}
    first = post(client, "/generate-batch", body, ADMIN).get_json()
    second = post(client, "/generate-batch", body, ADMIN).get_json()
    names = [f for d in (first, second) for r in d["results"] for f in r["files"]]
    assert len(set(names)) == 6
    assert [Path(f).name for f in names[:3]] == [
        "flux_dev_001.webp", "flux_dev_002.webp", "flux_dev_003.webp"]


def test_mixed_model_tasks_each_run_their_own_model(client: FlaskClient, sim: Simulator) -> None:
    body = {"tasks": [
        {"model_name": "qwen-image", "prompt": "city", "aspect_ratio": "16:9",
         "custom_filename": "city"},
        {"model_name": "flux-dev", "prompt": "forest", "output_quality": 90},
        {"model_name": "flux-kontext-max", "prompt": "red hair",
         "input_image": "https://example.com/ref.jpg", "custom_filename": "character"},
    ]}
    data = post(client, "/generate-batch", body, USER).get_json()
    assert data["success"] is True, data
    assert [Path(r["files"][0]).name for r in data["results"]] == [
        "city.webp", "flux_dev_002.webp", "character.png"]
    models = {p["input"]["prompt"]: p["model"] for p in sim.predictions(USER_TOKEN)}
    assert models == {"city": "qwen/qwen-image", "forest": "black-forest-labs/flux-dev",
                      "red hair": "black-forest-labs/flux-kontext-max"}


def test_a_failed_item_does_not_sink_the_batch(client: FlaskClient) -> None:
    body = {"model_name": "flux-dev", "prompts": ["ok one", "#fail", "ok two"]}
    data = post(client, "/generate-batch", body, ADMIN).get_json()
    assert data["success"] is False
    assert (data["successful_count"], data["failed_count"]) == (2, 1)
    assert data["failed_results"][0]["prompt_index"] == 1
    assert data["failed_results"][0]["error_type"] == "model_failed"
    assert [r["success"] for r in data["results"]] == [True, False, True]


def test_batch_items_run_in_parallel_up_to_the_limit(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    sim.config.run_seconds = 0.3
    client = make_app(concurrent_limit=4).test_client()
    body = {"model_name": "flux-dev", "prompts": [f"p{i}" for i in range(12)]}
    data = post(client, "/generate-batch", body, ADMIN).get_json()
    assert data["successful_count"] == 12
    assert sim.stats(SERVER_TOKEN)["inflight_peak"] == 4


def test_batch_validation_errors(client: FlaskClient, sim: Simulator) -> None:
    cases = [
        ({"model_name": "flux-dev"}, "prompts"),
        ({"model_name": "flux-dev", "prompts": []}, "prompts"),
        ({"model_name": "flux-dev", "prompts": "one"}, "prompts"),
        ({"model_name": "flux-dev", "prompts": ["a", 3]}, "prompts[1]"),
        ({"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["x"]},
         "custom_filenames"),
        ({"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["x", "X"]},
         "custom_filenames[1]"),
        ({"model_name": "flux-dev", "prompts": ["a"], "tasks": [{"prompt": "b"}]}, "tasks"),
        ({"model_name": "flux-dev", "tasks": ["a"]}, "tasks[0]"),
        ({"model_name": "flux-dev", "tasks": [{"custom_filename": "a"}]}, "tasks[0].prompt"),
        ({"tasks": [{"prompt": "a"}]}, "tasks[0].model_name"),
        ({"model_name": "flux-dev", "prompt": "shared", "tasks": [{"prompt": "a"}]}, "prompt"),
        ({"tasks": [{"prompt": "a", "model_name": "flux-dev", "guidance": 99}]},
         "tasks[0].guidance"),
        ({"model_name": "flux-dev", "tasks": [
            {"prompt": "a", "num_outputs": 2, "custom_filename": "x"},
            {"prompt": "b", "custom_filename": "x_2"}]}, "tasks[1].custom_filename"),
    ]
    for body, field in cases:
        response = post(client, "/generate-batch", body, ADMIN)
        assert response.status_code == 400, (body, response.get_json())
        assert response.get_json()["field"] == field, (body, response.get_json())
    assert sim.predictions() == []


def test_batch_size_limit_is_configurable(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_batch_size=3).test_client()
    response = post(client, "/generate-batch",
                    {"model_name": "flux-dev", "prompts": ["a"] * 4}, ADMIN)
    assert response.status_code == 400 and "at most 3" in response.get_json()["error"]


# --------------------------------------------------------------------------- /configure, /status


def test_configure_applies_validates_and_survives_a_restart(
        make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    response = post(client, "/configure", {"concurrent_limit": 3, "requests_per_minute": 300},
                    ADMIN)
    assert response.status_code == 200
    assert response.get_json()["new_settings"]["concurrent_limit"] == 3
    restarted = make_app().test_client()
    limits = restarted.get("/health").get_json()["concurrency_status"]
    assert (limits["concurrent_limit"], limits["requests_per_minute"]) == (3, 300)
    for body, field in (({"concurrent_limit": 0}, "concurrent_limit"),
                        ({"concurrent_limit": "10"}, "concurrent_limit"),
                        ({"requests_per_minute": -5}, "requests_per_minute"),
                        ({"requests_per_minute": True}, "requests_per_minute"),
                        ({"speed": 1}, "speed"), ({}, "concurrent_limit")):
        bad = post(client, "/configure", body, ADMIN)
        assert bad.status_code == 400 and bad.get_json()["field"] == field, body
    assert client.get("/health").get_json()["concurrency_status"]["concurrent_limit"] == 3


def test_configure_takes_a_whole_float_as_the_integer_json_schema_says_it_is(
        client: FlaskClient) -> None:
    response = post(client, "/configure", {"burst": 30.0, "concurrent_limit": 4}, ADMIN)
    assert response.status_code == 200, response.get_json()
    limits = response.get_json()["new_settings"]
    assert (limits["burst"], limits["concurrent_limit"]) == (30, 4)
    assert type(limits["burst"]) is int
    bad = post(client, "/configure", {"burst": 30.5}, ADMIN)
    assert bad.status_code == 400 and bad.get_json()["field"] == "burst"


def env_source(value: int, processes: int = 1, low: int | None = None,
               high: int | None = None) -> dict[str, Any]:
    return {"value": value, "source": "environment", "set_at": None,
            "declared": {"min": value if low is None else low,
                         "max": value if high is None else high, "processes": processes}}


def test_status_says_where_each_limit_comes_from_and_delete_configure_restores_it(
        make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    env = {"concurrent_limit": 5, "requests_per_minute": 6000, "burst": 50,
           "polls_per_minute": 60000}
    assert client.get("/status").get_json()["limit_sources"] == {
        name: env_source(value) for name, value in env.items()}

    before = datetime.now(UTC)
    changed = post(client, "/configure", {"requests_per_minute": 300}, ADMIN).get_json()
    assert changed["new_settings"] == {**env, "requests_per_minute": 300}
    sources = client.get("/status").get_json()["limit_sources"]
    rpm = sources["requests_per_minute"]
    assert (rpm["value"], rpm["source"]) == (300, "configure")
    set_at = datetime.fromisoformat(rpm["set_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= set_at <= datetime.now(UTC)
    assert rpm["declared"] == {"min": 6000, "max": 6000, "processes": 1}
    # Only the field given was stored: the others still follow the environment.
    assert {name: s["source"] for name, s in sources.items() if name != "requests_per_minute"} \
        == dict.fromkeys(("concurrent_limit", "burst", "polls_per_minute"), "environment")

    cleared_one = post(client, "/configure", {"requests_per_minute": None, "burst": 7}, ADMIN)
    one = cleared_one.get_json()["limit_sources"]
    assert one["requests_per_minute"] == env_source(6000)
    assert (one["burst"]["value"], one["burst"]["source"]) == (7, "configure")

    assert client.delete("/configure").status_code == 401
    assert client.delete("/configure", headers=USER).status_code == 403
    assert client.delete("/configure", headers={"X-Admin-API-Key": "wrong"}).status_code == 401
    assert client.get("/status").get_json()["limits"]["burst"] == 7  # refused calls changed nothing
    cleared = client.delete("/configure", headers=ADMIN)
    assert cleared.status_code == 200 and cleared.get_json()["success"] is True
    assert cleared.get_json()["new_settings"] == env
    restarted = make_app().test_client()
    assert restarted.get("/health").get_json()["concurrency_status"] == env
    assert {s["source"] for s in restarted.get("/status").get_json()["limit_sources"].values()} \
        == {"environment"}


def test_services_with_different_limits_apply_the_smallest_while_it_lives(
        make_app: Callable[..., Flask]) -> None:
    roomy = make_app(concurrent_limit=5).test_client()
    tight_app = make_app(concurrent_limit=2)
    for client in (roomy, tight_app.test_client()):
        status = client.get("/status").get_json()
        assert status["limits"]["concurrent_limit"] == 2
        assert status["limit_sources"]["concurrent_limit"] == env_source(2, 2, low=2, high=5)
        assert client.get("/health").get_json()["concurrency_status"]["concurrent_limit"] == 2
    tight_app.extensions["jobs"].close()  # a clean shutdown withdraws its declaration
    assert roomy.get("/status").get_json()["limit_sources"]["concurrent_limit"] == env_source(5)


def test_status_shows_figures_by_role(client: FlaskClient) -> None:
    post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, USER)
    post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, OTHER)
    anonymous = client.get("/status").get_json()
    assert anonymous["accounts"] == [] and anonymous["totals"]["creates_last_minute"] == 2
    assert anonymous["limits"]["concurrent_limit"] == 5
    own = client.get("/status", headers=USER).get_json()["accounts"]
    assert len(own) == 1 and own[0]["creates_last_minute"] == 1
    assert USER_TOKEN not in str(own)
    everyone = client.get("/status", headers=ADMIN).get_json()["accounts"]
    assert len(everyone) == 2
    keys = {a["account"] for a in everyone}
    assert own[0]["account"] in keys and all(k.startswith("acct_") for k in keys)
    assert client.get("/status", headers={"X-Admin-API-Key": "wrong"}).status_code == 401


def test_admin_key_without_server_token_is_refused_clearly(
        make_app: Callable[..., Flask]) -> None:
    client = make_app(replicate_api_token=None).test_client()
    response = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, ADMIN)
    assert response.status_code == 503 and "REPLICATE_API_TOKEN" in response.get_json()["error"]
    assert post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, USER)\
        .status_code == 200
    assert ADMIN_KEY not in response.get_data(as_text=True)


# --------------------------------------------------------------------------- edges


def test_data_uri_outputs_are_saved_with_their_real_format(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    sim.config.output_as_data_uri = True
    data = post(client, "/generate", {"model_name": "flux-kontext-max", "prompt": "x"},
                ADMIN).get_json()
    (path,) = files_on_disk(app, data["files"])
    assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_full_queue_is_refused_with_429_and_retry_after(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(max_queued_tasks=2).test_client()
    response = post(client, "/generate-batch",
                    {"model_name": "flux-dev", "prompts": ["a", "b", "c"]}, ADMIN)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    assert "error" in response.get_json() and sim.predictions() == []


def test_a_create_500_is_retried_on_the_same_model(client: FlaskClient, sim: Simulator) -> None:
    sim.inject("POST", r"/predictions$", 500, {"detail": "Internal server error"})
    data = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, ADMIN).get_json()
    assert data["success"] is True
    attempts = data["results"][0]["attempts"]
    assert [a["model"] for a in attempts] == ["black-forest-labs/flux-dev"] * 2
    assert "500" in attempts[0]["error"] and attempts[1]["prediction_id"] == data["prediction_id"]


def test_unreachable_replicate_is_a_502_after_a_few_tries(
        make_app: Callable[..., Flask]) -> None:
    client = make_app(replicate_base_url="http://127.0.0.1:9").test_client()
    response = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x"}, ADMIN)
    data = response.get_json()
    assert response.status_code == 502 and data["error_type"] == "upstream_unavailable"
    # Three tries on flux-dev, then (a model-level failure) three on its fallback qwen-image.
    assert [a["model"] for a in data["results"][0]["attempts"]] == \
        ["black-forest-labs/flux-dev"] * 3 + ["qwen/qwen-image"] * 3


def test_no_odd_body_makes_it_answer_500(client: FlaskClient, sim: Simulator) -> None:
    odd: list[Any] = [None, 0, "x", [], {}, {"model_name": None}, {"model_name": ["flux-dev"]},
                      {"model_name": "flux-dev", "prompt": {"a": 1}},
                      {"model_name": "flux-dev", "prompt": "x", "seed": 10**40},
                      {"model_name": "flux-dev", "prompt": "x", "guidance": float("nan")},
                      {"model_name": "flux-dev", "prompt": "x", "custom_filename": ["a"]},
                      {"model_name": "flux-dev", "prompts": [None]},
                      {"model_name": "flux-dev", "prompts": ["a"], "custom_filenames": [1]},
                      {"model_name": "flux-dev", "prompts": ["a"], "custom_filenames": "a"},
                      {"tasks": [{"prompt": "a", "model_name": 5}]}, {"tasks": {}},
                      {"tasks": [{"prompt": "a", "model_name": "flux-dev", "tasks": []}]},
                      {"concurrent_limit": 10**30}, {"concurrent_limit": 2.5}]
    for path in ("/generate", "/generate-batch", "/configure"):
        for body in odd:
            response = client.post(path, json=body, headers=ADMIN)
            assert 400 <= response.status_code < 500, (path, body, response.get_json())
            assert isinstance(response.get_json()["error"], str)
    assert sim.predictions() == []
