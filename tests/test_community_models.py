"""Community models (issue #25): a model that is not official, named without a version, runs the
latest version its record names, created by version id (Replicate answers 404 by name); the
answer says which version ran; pinned versions, exactly-once creates, resuming, `tasks` mode
without a prompt and the names dict outputs take, all over HTTP against the simulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN
from replicate_generation.devtools.simulator import Simulator, schema_models
from replicate_generation.models import schema_fetch
from replicate_generation.models.schemas import ModelPolicy

# The other-models suite's fresh schema cache (autouse) and its request helpers.
from test_any_model import creates, fresh_schema_cache, generate  # noqa: F401
from test_jobs import submit_async, wait_terminal

STYLE = schema_models.STYLE
UPSCALE = schema_models.UPSCALE
CUTOUT = schema_models.CUTOUT
SCHNELL = schema_models.FLUX_SCHNELL
LATEST = schema_models.version_id(STYLE)
OLD = schema_models.version_id(STYLE, "v1")
IMAGE_URL = "https://example.com/photo.png"


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(model_policy=ModelPolicy("any")).test_client()


def pinned(ref: str, version: str | None = None) -> str:
    return f"{ref}:{version or schema_models.version_id(ref)}"


def test_a_community_model_runs_its_latest_version_created_by_version_id(
        client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": STYLE, "prompt": "a cat", "style": "oil"})
    assert status == 200, answer
    assert answer["model_name"] == STYLE and answer["model_used"] == pinned(STYLE, LATEST)
    (item,) = answer["results"]
    assert item["model_requested"] == STYLE and item["model_used"] == pinned(STYLE, LATEST)
    (create,) = creates(sim)  # never tried by name first
    assert create["path"] == "/v1/predictions" and create["json"]["version"] == LATEST
    (made,) = sim.predictions(SERVER_TOKEN)
    assert (made["source"], made["version"], made["model"]) == ("version", LATEST, STYLE)
    assert made["input"] == {"prompt": "a cat", "style": "oil"}
    assert [Path(f).suffix for f in answer["files"]] == [".png"]
    fetched = [e["path"] for e in sim.requests_log() if e["path"].startswith("/v1/models/")]
    assert fetched == [f"/v1/models/{STYLE}"]  # the schema and the version in one fetch


def test_an_official_model_is_still_created_by_name(client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": SCHNELL, "prompt": "a fox"})
    assert status == 200, answer
    assert answer["model_used"] == SCHNELL
    (create,) = creates(sim)
    assert create["path"] == f"/v1/models/{SCHNELL}/predictions"


def test_a_pinned_version_runs_that_version_and_is_checked_against_it(
        client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": pinned(STYLE, OLD), "prompt": "a dog",
                                       "style": "ink"})
    assert status == 400 and answer["field"] == "style", answer  # v1 has no style
    assert creates(sim) == []
    status, answer = generate(client, {"model_name": pinned(STYLE, OLD), "prompt": "a dog"})
    assert status == 200, answer
    assert answer["results"][0]["model_used"] == pinned(STYLE, OLD)
    (create,) = creates(sim)
    assert create["path"] == "/v1/predictions" and create["json"]["version"] == OLD


def test_the_latest_schema_refuses_what_it_does_not_know_before_anything_is_created(
        client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": STYLE, "prompt": "a cat", "style": "pop"})
    assert status == 400 and answer["field"] == "style", answer
    status, answer = generate(client, {"model_name": UPSCALE, "scale": 3})
    assert status == 400 and answer["field"] == "image", answer
    assert creates(sim) == []


def test_a_dry_run_names_the_version_that_would_run(client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": STYLE, "prompt": "a cat", "dry_run": True})
    assert status == 200, answer
    (item,) = answer["items"]
    assert item["model_requested"] == STYLE and item["model"] == pinned(STYLE, LATEST)
    assert creates(sim) == []


def test_tasks_mode_takes_models_without_a_prompt_one_create_per_item(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"tasks": [
        {"model_name": STYLE, "prompt": "a boat", "num_outputs": 2, "custom_filename": "boat"},
        {"model_name": UPSCALE, "image": IMAGE_URL, "scale": 4.0, "custom_filename": "big"},
        {"model_name": CUTOUT, "image": IMAGE_URL, "custom_filename": "cut"}]}
    job = submit_async(client, body, ADMIN)
    done = wait_terminal(client, job["id"], ADMIN)
    assert done["state"] == "succeeded", done
    items = done["items"]
    assert [i["model_used"] for i in items] == [pinned(STYLE), pinned(UPSCALE), pinned(CUTOUT)]
    assert [i["prompt"] for i in items] == ["a boat", None, None]
    names = [[Path(f).name for f in i["files"]] for i in items]
    assert names == [["boat_1.png", "boat_2.png"], ["big.png"], ["cut_image.png", "cut_mask.png"]]
    made = sim.predictions(SERVER_TOKEN)
    assert sorted((p["model"], p["version"], p["source"]) for p in made) == sorted(
        (ref, schema_models.version_id(ref), "version") for ref in (STYLE, UPSCALE, CUTOUT))
    assert len(creates(sim)) == 3
    upscaled = next(p for p in made if p["model"] == UPSCALE)
    assert upscaled["input"] == {"image": IMAGE_URL, "scale": 4}  # a whole float sent as int


def test_tasks_mode_still_needs_a_prompt_for_a_curated_model(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"tasks": [{"model_name": UPSCALE, "image": IMAGE_URL},
                      {"model_name": "flux-dev", "aspect_ratio": "1:1"}]}
    response = client.post("/generate-batch", json=body, headers=ADMIN)
    assert response.status_code == 400
    assert response.get_json()["field"] == "tasks[1].prompt", response.get_json()
    assert creates(sim) == []


@pytest.mark.parametrize("order", [1, -1])
def test_a_dict_outputs_names_are_reserved_across_the_items_of_a_batch(
        client: FlaskClient, sim: Simulator, order: int) -> None:
    tasks = [{"model_name": CUTOUT, "image": IMAGE_URL, "custom_filename": "a"},
             {"model_name": "flux-dev", "prompt": "x", "custom_filename": "A_Mask"}][::order]
    response = client.post("/generate-batch", json={"tasks": tasks}, headers=ADMIN)
    answer = response.get_json()
    assert response.status_code == 400 and answer["field"].endswith(".custom_filename"), answer
    assert "a_mask" in answer["error"].lower()
    assert creates(sim) == []


def test_a_lost_create_answer_is_adopted_by_version_not_created_again(
        client: FlaskClient, sim: Simulator) -> None:
    sim.inject_create_fault("502", 1, token=SERVER_TOKEN)
    status, answer = generate(client, {"model_name": STYLE, "prompt": "a lost answer"})
    assert status == 200, answer
    (made,) = sim.predictions(SERVER_TOKEN)
    assert made["version"] == LATEST and answer["prediction_id"] == made["id"]
    assert len(creates(sim)) == 1  # the listing proved it was made


def test_a_community_job_resumes_after_a_restart_on_the_same_version(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    first = make_app(model_policy=ModelPolicy("any"), shutdown_grace_seconds=0.1,
                     concurrent_limit=1)
    body = {"tasks": [{"model_name": STYLE, "prompt": f"#slow=1 a slow boat {i}"}
                      for i in range(2)]}
    job = submit_async(first.test_client(), body, ADMIN)
    deadline = time.monotonic() + 10
    while not sim.predictions(SERVER_TOKEN) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.extensions["jobs"].close()
    assert len(sim.predictions(SERVER_TOKEN)) == 1  # one item created, the other never sent
    schema_fetch.CACHE.clear()
    second = make_app(model_policy=ModelPolicy("any")).test_client()
    done = wait_terminal(second, job["id"], ADMIN, timeout=20)
    assert done["state"] == "succeeded", done
    made = sim.predictions(SERVER_TOKEN)
    assert len(made) == 2 and len(creates(sim)) == 2
    assert {p["version"] for p in made} == {LATEST}
    assert {i["model_used"] for i in done["items"]} == {pinned(STYLE, LATEST)}
    # The job kept the version it was checked against: nothing was fetched again to resume it.
    assert [e["path"] for e in sim.requests_log() if e["path"].startswith("/v1/models/")] == [
        f"/v1/models/{STYLE}"]


def test_the_simulator_serves_community_models_only_by_version(sim: Simulator) -> None:
    headers = {"Authorization": f"Bearer {SERVER_TOKEN}"}
    with httpx.Client(base_url=sim.base_url, headers=headers, timeout=10) as http:
        record = http.get(f"/v1/models/{STYLE}").json()
        assert record["is_official"] is False and record["latest_version"]["id"] == LATEST
        assert http.get(f"/v1/models/{SCHNELL}").json()["is_official"] is True
        by_name = http.post(f"/v1/models/{STYLE}/predictions", json={"input": {"prompt": "x"}})
        assert by_name.status_code == 404
        unversioned = http.post("/v1/predictions", json={"version": STYLE,
                                                         "input": {"prompt": "x"}})
        assert unversioned.status_code == 422
        made = http.post("/v1/predictions", json={"version": OLD, "input": {"prompt": "x"}})
        assert made.status_code == 201 and made.json()["version"] == OLD
        upscaled = http.post("/v1/predictions", json={
            "version": schema_models.version_id(UPSCALE), "input": {"image": IMAGE_URL}})
        assert upscaled.status_code == 201
        output_schema = http.get(f"/v1/models/{UPSCALE}").json()["latest_version"][
            "openapi_schema"]["components"]["schemas"]["Output"]
        assert output_schema == {"type": "string", "format": "uri", "title": "Output"}


# --------------------------------------------------------------------------- deployments

DEPLOYMENT = "deployments/acme/style-prod"  # the simulator's: its release runs acme/style's v1


def test_a_deployment_is_checked_against_its_current_release_and_created_through_it(
        client: FlaskClient, sim: Simulator) -> None:
    status, answer = generate(client, {"model_name": DEPLOYMENT, "prompt": "a ship",
                                       "style": "oil"})
    assert status == 400 and answer["field"] == "style", answer  # the release (v1) has none
    assert creates(sim) == []
    status, answer = generate(client, {"model_name": DEPLOYMENT, "prompt": "a ship",
                                       "num_outputs": 2, "custom_filename": "ship"})
    assert status == 200, answer
    assert answer["model_used"] == DEPLOYMENT and answer["cost_usd"] is None
    assert [Path(f).name for f in answer["files"]] == ["ship_1.png", "ship_2.png"]
    (create,) = creates(sim)
    assert create["path"] == "/v1/deployments/acme/style-prod/predictions"
    (made,) = sim.predictions(SERVER_TOKEN)
    assert (made["source"], made["deployment"], made["model"], made["version"]) == (
        "deployment", "acme/style-prod", STYLE, OLD)
    fetched = [e["path"] for e in sim.requests_log() if e["method"] == "GET"
               and e["path"].startswith(("/v1/models/", "/v1/deployments/"))]
    assert fetched == ["/v1/deployments/acme/style-prod", f"/v1/models/{STYLE}/versions/{OLD}"]


def test_a_deployment_job_whose_create_answer_is_lost_pays_once_per_item(
        client: FlaskClient, sim: Simulator) -> None:
    sim.inject_create_fault("502", 1, token=SERVER_TOKEN)
    body = {"tasks": [{"model_name": DEPLOYMENT, "prompt": "the lost one"},
                      {"model_name": DEPLOYMENT, "prompt": "the other one"}]}
    job = submit_async(client, body, ADMIN)
    done = wait_terminal(client, job["id"], ADMIN)
    assert done["state"] == "succeeded", done
    made = sim.predictions(SERVER_TOKEN)
    assert sorted(p["input"]["prompt"] for p in made) == ["the lost one", "the other one"]
    assert sorted(i["prediction_id"] for i in done["items"]) == sorted(p["id"] for p in made)
    assert {i["model_used"] for i in done["items"]} == {DEPLOYMENT}


def test_deployments_follow_the_model_policy(make_app: Callable[..., Flask],
                                             sim: Simulator) -> None:
    body = {"model_name": DEPLOYMENT, "prompt": "a ship", "dry_run": True}
    owners = make_app(model_policy=ModelPolicy.parse("allow:acme")).test_client()
    status, answer = generate(owners, body)
    assert status == 400 and "MODEL_POLICY" in answer["error"], answer
    allowed = make_app(model_policy=ModelPolicy.parse("allow:deployments/acme")).test_client()
    status, answer = generate(allowed, body)
    assert status == 200 and answer["items"][0]["model"] == DEPLOYMENT, answer
    status, answer = generate(allowed, {**body, "model_name": "deployments/acme/nothing"})
    assert status == 400 and answer["field"] == "model_name", answer
    assert "Deployment 'deployments/acme/nothing' was not found" in answer["error"]
    assert creates(sim) == []
