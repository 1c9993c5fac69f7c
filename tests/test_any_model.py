"""Non-curated Replicate models (issue #13): MODEL_POLICY, validation from the model's own cog
schema before any create, pinned versions, a schema change picked up after a 422, outputs of any
shape, GET /models/<owner>/<name>, dry_run and resuming after a restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator, schema_models
from replicate_generation.errors import SettingsError
from replicate_generation.models import schema_fetch, schemas
from replicate_generation.models.schemas import ModelPolicy
from replicate_generation.settings import Settings
from test_jobs import submit_async, wait_terminal

SCHNELL = schema_models.FLUX_SCHNELL
CUTOUT = schema_models.CUTOUT
LLAMA = schema_models.LLAMA
OLD_SCHNELL = schema_models.version_id(SCHNELL, "v1")
IMAGE_URL = "https://example.com/photo.png"


@pytest.fixture(autouse=True)
def fresh_schema_cache() -> Iterator[None]:
    schema_fetch.CACHE.clear()
    yield
    schema_fetch.CACHE.clear()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(model_policy=ModelPolicy("any")).test_client()


def creates(sim: Simulator) -> list[dict[str, Any]]:
    return [e for e in sim.requests_log()
            if e["method"] == "POST" and e["path"].endswith("/predictions")]


def generate(client: FlaskClient, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post("/generate", json=body, headers=ADMIN)
    return response.status_code, response.get_json()


@pytest.mark.parametrize(("body", "field"), [
    ({"model_name": SCHNELL, "prompt": "a fox", "aspect_ratio": "2:1"}, "aspect_ratio"),
    ({"model_name": SCHNELL, "prompt": "a fox", "num_outputs": 5}, "num_outputs"),
    ({"model_name": SCHNELL, "prompt": "a fox", "num_outputs": "2"}, "num_outputs"),
    ({"model_name": SCHNELL, "prompt": "a fox", "go_fast": 1}, "go_fast"),
    ({"model_name": SCHNELL, "prompt": "a fox", "sharpness": 3}, "sharpness"),
    ({"model_name": SCHNELL, "aspect_ratio": "1:1"}, "prompt"),
    ({"model_name": CUTOUT, "image": "/etc/passwd"}, "image"),
    ({"model_name": CUTOUT, "image": IMAGE_URL, "threshold": 1.5}, "threshold"),
    ({"model_name": CUTOUT}, "image"),
    ({"model_name": LLAMA, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model_name": LLAMA, "prompt": "hi", "temperature": None}, "temperature"),
    ({"model_name": f"{SCHNELL}:{OLD_SCHNELL}", "prompt": "a fox", "megapixels": "1"},
     "megapixels"),
])
def test_invalid_input_is_a_400_naming_the_field_and_nothing_is_created(
        client: FlaskClient, sim: Simulator, body: dict[str, Any], field: str) -> None:
    status, answer = generate(client, body)
    assert status == 400, answer
    assert answer["field"] == field, answer
    assert creates(sim) == []


def test_valid_image_model_saves_every_file_in_order_with_nulls_allowed(
        client: FlaskClient, sim: Simulator, tmp_path: Path) -> None:
    status, answer = generate(client, {"model_name": SCHNELL, "prompt": "a fox", "seed": None,
                                       "num_outputs": 2, "output_format": "png",
                                       "custom_filename": "fox"})
    assert status == 200, answer
    assert [Path(f).name for f in answer["files"]] == ["fox_1.png", "fox_2.png"]
    assert answer["model_used"] == SCHNELL and answer["cost_usd"] is None
    (create,) = creates(sim)
    assert create["path"] == f"/v1/models/{SCHNELL}/predictions"
    assert create["json"]["input"] == {"prompt": "a fox", "seed": None, "num_outputs": 2,
                                       "output_format": "png"}


def test_dict_output_is_saved_per_key_and_text_output_as_txt(
        client: FlaskClient, tmp_path: Path) -> None:
    status, answer = generate(client, {"model_name": CUTOUT, "image": IMAGE_URL,
                                       "custom_filename": "cut"})
    assert status == 200, answer
    assert [Path(f).name for f in answer["files"]] == ["cut_image.png", "cut_mask.png"]
    status, answer = generate(client, {"model_name": LLAMA, "prompt": "say hello",
                                       "max_tokens": 16})
    assert status == 200, answer
    (text_file,) = answer["files"]
    assert Path(text_file).name == "meta_llama_3_8b_instruct.txt"
    assert Path(text_file).read_text() == "".join(schema_models.TEXT_TOKENS)


def test_pinned_version_is_checked_against_that_version_and_created_by_version(
        client: FlaskClient, sim: Simulator) -> None:
    name = f"{SCHNELL}:{OLD_SCHNELL}"
    status, answer = generate(client, {"model_name": name, "prompt": "an owl"})
    assert status == 200, answer
    (create,) = creates(sim)
    assert create["path"] == "/v1/predictions"
    assert create["json"]["version"] == OLD_SCHNELL
    fetched = [e["path"] for e in sim.requests_log() if e["method"] == "GET"
               and e["path"].startswith("/v1/models/")]
    assert fetched == [f"/v1/models/{SCHNELL}/versions/{OLD_SCHNELL}"]


def test_schema_is_cached_then_refreshed_after_a_422_and_the_change_is_picked_up(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"model_name": SCHNELL, "prompt": "a fox", "go_fast": False}
    assert generate(client, body)[0] == 200
    assert generate(client, body)[0] == 200
    schema_fetches = [e for e in sim.requests_log() if e["path"] == f"/v1/models/{SCHNELL}"]
    assert len(schema_fetches) == 1  # cached
    changed = schema_models.components(SCHNELL, None)["Input"]
    changed["properties"]["go_fast"] = {"type": "integer", "title": "Go Fast", "x-order": 5}
    schema_models.set_input_schema(SCHNELL, changed)
    status, answer = generate(client, body)  # validated against the cached schema: a 422
    assert answer["error_type"] == "replicate_invalid_input", answer
    assert "go_fast" in answer["error"] and "schema changed" in answer["error"]
    status, answer = generate(client, body)  # the refreshed schema refuses it up front
    assert status == 400 and answer["field"] == "go_fast", answer
    assert len(creates(sim)) == 3


def test_unknown_model_is_a_400_naming_model_name(client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": "nobody/nothing", "prompt": "x"})
    assert status == 400 and answer["field"] == "model_name", answer
    assert "not found" in answer["error"]
    assert creates(sim) == []


def test_policy_curated_and_allow_list_refuse_what_they_should(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    curated = make_app().test_client()
    status, answer = generate(curated, {"model_name": SCHNELL, "prompt": "a fox"})
    assert status == 400 and answer["field"] == "model_name"
    assert "not supported" in answer["error"]
    allow = make_app(model_policy=ModelPolicy.parse(f"allow:meta,{SCHNELL}")).test_client()
    assert generate(allow, {"model_name": SCHNELL, "prompt": "a fox"})[0] == 200
    assert generate(allow, {"model_name": LLAMA, "prompt": "hi"})[0] == 200
    status, answer = generate(allow, {"model_name": CUTOUT, "image": IMAGE_URL})
    assert status == 400 and "MODEL_POLICY" in answer["error"], answer
    assert generate(allow, {"model_name": "flux-dev", "prompt": "a fox"})[0] == 200
    # Nothing was fetched for what the policy refused.
    assert not [e for e in sim.requests_log() if e["path"].startswith(f"/v1/models/{CUTOUT}")]


def test_models_route_shows_curated_and_schema_parameters(client: FlaskClient) -> None:
    curated = client.get("/models/black-forest-labs/flux-dev").get_json()
    assert curated["id"] == "flux-dev" and "guidance" in curated["parameters"]
    assert client.get(f"/models/{SCHNELL}").status_code == 401
    shown = client.get(f"/models/{SCHNELL}", headers=USER).get_json()
    assert shown["curated"] is False and shown["price"] is None
    params = shown["parameters"]
    assert list(params)[:3] == ["prompt", "aspect_ratio", "num_outputs"]  # x-order
    assert params["aspect_ratio"]["choices"] == ["1:1", "16:9", "9:16"]
    assert params["num_outputs"]["maximum"] == 4 and params["seed"]["nullable"] is True
    assert params["prompt"]["required"] is True


def test_dry_run_says_the_cost_is_unknown(client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": SCHNELL, "prompt": "a fox",
                                       "dry_run": True})
    assert status == 200, answer
    assert answer["cost_usd"] is None and answer["estimated_cost_usd"] is None
    assert "unknown" in answer["cost_note"]
    assert answer["items"][0]["estimated_cost_usd"] is None
    assert creates(sim) == []


def test_batch_of_a_non_curated_model_validates_every_item(
        client: FlaskClient, sim: Simulator) -> None:
    response = client.post("/generate-batch", headers=ADMIN, json={
        "tasks": [{"model_name": LLAMA, "prompt": "one"},
                  {"model_name": SCHNELL, "prompt": "two", "aspect_ratio": "5:4"}]})
    assert response.status_code == 400
    assert response.get_json()["field"] == "tasks[1].aspect_ratio"
    assert creates(sim) == []


def test_a_non_curated_job_resumes_after_a_restart_without_a_second_create(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    first = make_app(model_policy=ModelPolicy("any"), shutdown_grace_seconds=0.1)
    job = submit_async(first.test_client(), {"model_name": f"{SCHNELL}:{OLD_SCHNELL}",
                                             "prompt": "#slow=2 a slow fox"}, ADMIN,
                       path="/generate")
    deadline = time.monotonic() + 10
    while not sim.predictions(SERVER_TOKEN) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.extensions["jobs"].close()
    second = make_app(model_policy=ModelPolicy("any")).test_client()
    done = wait_terminal(second, job["id"], ADMIN, timeout=20)
    assert done["state"] == "succeeded", done
    assert len(creates(sim)) == 1


def test_schema_fetch_failures_are_clear_and_create_nothing(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    client = make_app(model_policy=ModelPolicy("any")).test_client()
    sim.config.invalid_tokens = {USER_TOKEN}
    response = client.post("/generate", headers=USER, json={"model_name": SCHNELL,
                                                            "prompt": "a fox"})
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error_type"] == "replicate_unauthorized"
    unreachable = make_app(model_policy=ModelPolicy("any"),
                           replicate_base_url="http://127.0.0.1:9").test_client()
    status, answer = generate(unreachable, {"model_name": SCHNELL, "prompt": "a fox"})
    assert status == 502 and answer["error_type"] == "schema_unavailable", answer
    assert creates(sim) == []


def test_model_policy_setting_is_checked_at_start() -> None:
    assert Settings.from_env({}).model_policy == ModelPolicy("curated")
    assert Settings.from_env({"MODEL_POLICY": "allow:meta, acme/cutout"}).model_policy.allowed
    for bad in ("some", "allow:", "allow:a b"):
        with pytest.raises(SettingsError, match="MODEL_POLICY"):
            Settings.from_env({"MODEL_POLICY": bad})
    policy = schemas.ModelPolicy.parse("allow:meta,acme/cutout")
    assert policy.allows(LLAMA) and policy.allows(CUTOUT) and not policy.allows("acme/other")


def test_openapi_describes_other_models_generically_only_when_allowed(
        make_app: Callable[..., Flask]) -> None:
    curated = make_app().test_client().get("/openapi.json").get_json()["components"]["schemas"]
    assert "Generate_other" not in curated and "discriminator" in curated["GenerateRequest"]
    spec = make_app(model_policy=ModelPolicy("any")).test_client().get("/openapi.json").get_json()
    found = spec["components"]["schemas"]
    other = found["Generate_other"]["properties"]["model_name"]
    assert other["pattern"] == schemas.MODEL_NAME_PATTERN
    assert found["Generate_other"]["additionalProperties"] is True
    assert {"$ref": "#/components/schemas/Generate_other"} in found["GenerateRequest"]["oneOf"]
    assert found["Model_flux_dev"] == curated["Model_flux_dev"]  # curated ones as before
