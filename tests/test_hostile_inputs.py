"""Issue #20, findings 5, 6, 7, 9, 10 and 11 over HTTP: hostile schemas and outputs served by the
simulator (`/_sim/schema`, the `hostile/*` models) end as clear 4xx/502s or item errors with the
prediction kept; the schema cache is bounded; archives stream; retries meet today's policy;
names are reserved, normalised and never Windows devices."""

from __future__ import annotations

import gc
import io
import os
import tracemalloc
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, OTHER, USER
from replicate_generation.devtools.simulator import Simulator, hostile, schema_models
from replicate_generation.models import schema_fetch
from replicate_generation.models.schemas import ModelPolicy
from test_jobs import submit_async, wait_terminal

SCHNELL = schema_models.FLUX_SCHNELL
ERROR_KEYS = {"error", "field", "error_type", "request_id"}


@pytest.fixture(autouse=True)
def fresh_schema_cache() -> Iterator[None]:
    schema_fetch.CACHE.clear()
    yield
    schema_fetch.CACHE.clear()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(model_policy=ModelPolicy("any")).test_client()


def serve_input(sim: Simulator, ref: str, extra: dict[str, Any], **changes: Any) -> None:
    """Have the simulator serve `ref`'s Input schema with `extra` parameters, over HTTP."""
    spec = schema_models.components(ref, None)["Input"]
    spec["properties"].update(extra)
    spec.update(changes)
    requests.post(f"{sim.base_url}/_sim/schema", json={"ref": ref, "input": spec},
                  timeout=30).raise_for_status()


def creates(sim: Simulator) -> list[dict[str, Any]]:
    return [e for e in sim.requests_log()
            if e["method"] == "POST" and e["path"].endswith("/predictions")]


def schema_fetches(sim: Simulator, ref: str) -> list[dict[str, Any]]:
    return [e for e in sim.requests_log() if e["path"] == f"/v1/models/{ref}"]


def post(client: FlaskClient, path: str, body: dict[str, Any],
         headers: dict[str, str] = ADMIN) -> tuple[int, dict[str, Any], int]:
    response = client.post(path, json=body, headers=headers)
    return response.status_code, response.get_json(), len(response.get_data())


def big_properties(tag: str, count: int = 400, chars: int = 5000) -> dict[str, Any]:
    """Parameters with long descriptions: a schema of about count x chars bytes."""
    return {f"p{i}": {"type": "string", "description": f"{tag} {i} " + "x" * chars,
                      "x-order": 10 + i} for i in range(count)}


# --------------------------------------------------------------------------- finding 5


def test_one_schema_seen_by_many_accounts_is_kept_once(client: FlaskClient,
                                                       sim: Simulator) -> None:
    serve_input(sim, SCHNELL, big_properties("shared"))
    tokens = [f"r8_schema_cache_tok_{i:02d}" for i in range(8)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        grown = []
        for token in tokens:
            response = client.get(f"/models/{SCHNELL}", headers={"X-Replicate-API-Key": token})
            assert response.status_code == 200, response.get_json()
            gc.collect()  # spent HTTP responses sit in reference cycles until a collection
            grown.append(tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    # Each account asked Replicate itself (a model may be private to some), yet one copy is kept.
    assert len(schema_fetches(sim, SCHNELL)) == len(tokens)
    usage = client.get("/status", headers=ADMIN).get_json()["schema_cache"]
    assert usage["schemas"] == 1 and usage["account_entries"] == len(tokens), usage
    assert 0 < usage["bytes"] <= usage["max_bytes"]
    assert grown[-1] < 2 * grown[0], (grown, usage)


def test_schemas_past_the_budget_leave_least_recently_used_first(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    refs = [SCHNELL, schema_models.LLAMA, schema_models.CUTOUT]
    for ref in refs:
        serve_input(sim, ref, big_properties(ref, count=200))
    probe = make_app(model_policy=ModelPolicy("any")).test_client()
    assert probe.get(f"/models/{refs[0]}", headers=USER).status_code == 200
    one = probe.get("/status", headers=ADMIN).get_json()["schema_cache"]["bytes"]
    schema_fetch.CACHE.clear()
    client = make_app(model_policy=ModelPolicy("any"),
                      schema_cache_max_bytes=int(2.5 * one)).test_client()
    for ref in (refs[0], refs[1], refs[0], refs[2]):  # refs[0] used again: refs[1] goes first
        assert client.get(f"/models/{ref}", headers=USER).status_code == 200
    usage = client.get("/status", headers=ADMIN).get_json()["schema_cache"]
    assert usage["schemas"] == 2 and usage["bytes"] <= usage["max_bytes"], usage
    before = {ref: len(schema_fetches(sim, ref)) for ref in refs}
    for ref in (refs[2], refs[0], refs[1]):  # the two kept first: asking for them fetches none
        assert client.get(f"/models/{ref}", headers=USER).status_code == 200
    fetched_again = [ref for ref in refs if len(schema_fetches(sim, ref)) > before[ref]]
    assert fetched_again == [refs[1]]


# --------------------------------------------------------------------------- finding 6


def _tempfiles_at_least(size: int) -> list[str]:
    """Files this process holds open outside the output root that are at least `size` bytes."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if os.fstat(int(fd)).st_size >= size and "output" not in target:
                found.append(target)
        except OSError:
            continue
    return found


def test_archive_streams_before_it_is_built_and_is_whole(
        client: FlaskClient, sim: Simulator, tmp_path: Path) -> None:
    sim.configure(output_bytes=12 * 1024 * 1024)
    names = ["one", "two", "three"]
    body = {"model_name": "flux-dev", "prompts": names, "custom_filenames": names}
    status, answer, _ = post(client, "/generate-batch", body, USER)
    assert status == 200 and answer["successful_count"] == 3, answer
    files = [Path(f) for r in answer["successful_results"] for f in r["files"]]
    total = sum(f.stat().st_size for f in files)
    assert total > 30 * 1024 * 1024
    url = f"/jobs/{answer['job_id']}/archive"
    assert client.get(url, headers=OTHER).status_code == 404
    tracemalloc.start()
    try:
        response = client.get(url, headers=USER, buffered=False)
        chunks = iter(response.response)
        first = next(chunks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 200 and response.content_type == "application/zip"
    assert first.startswith(b"PK\x03\x04")
    assert _tempfiles_at_least(total // 2) == []  # no whole archive spooled anywhere
    assert peak < total // 3, peak  # pieces in memory, never the archive
    data = first + b"".join(chunks)
    response.close()
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    assert [i.filename for i in archive.infolist()] == [f.name for f in files]
    assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    for info, path in zip(archive.infolist(), files, strict=True):
        assert archive.read(info) == path.read_bytes()


# --------------------------------------------------------------------------- finding 7


def test_retry_is_checked_against_the_policy_in_force(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    first = make_app(model_policy=ModelPolicy("any"), shutdown_grace_seconds=0.1)
    body = {"tasks": [{"model_name": "flux-dev", "prompt": "curated #fail"},
                      {"model_name": SCHNELL, "prompt": "schnell #fail"}]}
    job = submit_async(first.test_client(), body, USER)
    done = wait_terminal(first.test_client(), job["id"], USER)
    assert [i["state"] for i in done["items"]] == ["failed", "failed"]
    first.extensions["jobs"].close()
    made = len(creates(sim))
    for policy in ("curated", "allow:meta,acme"):
        client = make_app(model_policy=ModelPolicy.parse(policy)).test_client()
        jobs_before = client.get("/jobs", headers=USER).get_json()["data"]
        status, answer, _ = post(client, f"/jobs/{job['id']}/retry", {}, USER)
        assert status == 400 and answer["field"] == "items[1].model_name", answer
        assert set(answer) <= ERROR_KEYS | {"supported_models"}
        assert client.get("/jobs", headers=USER).get_json()["data"] == jobs_before
    assert len(creates(sim)) == made


def test_retry_is_checked_against_the_models_schema_as_it_is_now(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"model_name": SCHNELL, "prompt": "#fail once", "go_fast": False}
    job = submit_async(client, body, USER, path="/generate")
    assert wait_terminal(client, job["id"], USER)["state"] == "failed"
    serve_input(sim, SCHNELL, {"go_fast": {"type": "integer", "title": "Go Fast"}})
    schema_fetch.CACHE.clear()  # as after SCHEMA_TTL_SECONDS
    made = len(creates(sim))
    status, answer, _ = post(client, f"/jobs/{job['id']}/retry", {}, USER)
    assert status == 400 and answer["field"] == "items[0].go_fast", answer
    assert len(creates(sim)) == made


# --------------------------------------------------------------------------- findings 9, 10


@pytest.mark.parametrize(("extra", "words"), [
    ({"style": hostile.deep("items", 5000)}, "nests deeper"),
    ({"style": hostile.deep("items", 600)}, "nests deeper"),
    ({"style": {"type": "string", "enum": 5}}, "`enum` that is not a list"),
    ({"style": {"type": "string", "enum": "a,b"}}, "`enum` that is not a list"),
    ({"style": {"allOf": {"$ref": "#/components/schemas/x"}}}, "`allOf` that is not a list"),
])
def test_a_hostile_schema_is_a_clear_502_and_nothing_is_created(
        client: FlaskClient, sim: Simulator, extra: dict[str, Any], words: str) -> None:
    serve_input(sim, SCHNELL, extra)
    status, answer, _ = post(client, "/generate", {"model_name": SCHNELL, "prompt": "a fox"})
    assert status == 502, answer
    assert answer["error_type"] == "schema_unavailable" and words in answer["error"], answer
    assert set(answer) <= ERROR_KEYS
    shown = client.get(f"/models/{SCHNELL}", headers=USER)
    assert shown.status_code == 502 and words in shown.get_json()["error"]
    assert creates(sim) == []


def test_a_huge_enum_is_quoted_as_a_short_excerpt(client: FlaskClient, sim: Simulator) -> None:
    serve_input(sim, SCHNELL, {"style": {"type": "string",
                                         "enum": [f"style-{i:06d}" for i in range(200_000)]}})
    body = {"model_name": SCHNELL, "prompt": "a fox", "style": "none"}
    status, answer, size = post(client, "/generate", body)
    assert status == 400 and answer["field"] == "style", answer
    assert size < 2048, size
    assert "'style-000000'" in answer["error"] and "(200,000 in all)" in answer["error"]
    status, answer, size = post(client, "/generate", {"model_name": SCHNELL, "prompt": "a fox",
                                                      "x" * 5000: 1})
    assert status == 400 and size < 2048, size
    assert creates(sim) == []


@pytest.mark.parametrize("name", [None, "\u00e9" * 100])
def test_a_dict_output_with_very_long_keys_keeps_every_file(
        client: FlaskClient, sim: Simulator, name: str | None) -> None:
    body = {"model_name": hostile.LONG_KEYS, "prompt": "two long keys",
            **({"custom_filename": name} if name else {})}
    status, answer, _ = post(client, "/generate", body)
    assert status == 200, answer
    files = [Path(f) for f in answer["files"]]
    assert len(files) == 2 and files[0] != files[1], files
    assert all(len(f.name.encode()) <= 255 and f.is_file() for f in files)
    assert len({f.stat().st_ino for f in files}) == 2  # neither replaced the other


def test_a_deeply_nested_output_fails_its_item_with_the_prediction_kept(
        client: FlaskClient, sim: Simulator) -> None:
    status, answer, _ = post(client, "/generate", {"model_name": hostile.DEEP_OUTPUT,
                                                   "prompt": "deep"})
    (made,) = sim.predictions()
    assert status == 502 and answer["error_type"] == "download_failed", answer
    assert answer["prediction_id"] == made["id"] and "nests deeper" in answer["error"]
    (attempt,) = answer["results"][0]["attempts"]
    assert attempt["prediction_id"] == made["id"] and attempt["status"] != "creating", attempt


# --------------------------------------------------------------------------- finding 11


def test_numbered_names_are_reserved_across_the_items_of_a_batch(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"tasks": [{"model_name": hostile.PAIR, "prompt": "two files", "custom_filename": "a"},
                      {"model_name": "flux-dev", "prompt": "one file", "custom_filename": "a_1",
                       "output_format": "png"}]}
    status, answer, _ = post(client, "/generate-batch", body)
    assert status == 400 and answer["field"] == "tasks[1].custom_filename", answer
    assert "'a_1'" in answer["error"]
    body = {"tasks": [{"model_name": "flux-dev", "prompt": "x", "num_outputs": 2,
                       "custom_filename": "b"},
                      {"model_name": "flux-dev", "prompt": "y", "custom_filename": "B_2"}]}
    status, answer, _ = post(client, "/generate-batch", body)
    assert status == 400 and answer["field"] == "tasks[1].custom_filename", answer
    assert creates(sim) == []


def test_names_are_one_name_in_nfc_and_saved_as_nfc(client: FlaskClient, sim: Simulator) -> None:
    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    body = {"model_name": "flux-dev", "prompts": ["x", "y"], "custom_filenames": [nfc, nfd]}
    status, answer, _ = post(client, "/generate-batch", body)
    assert status == 400 and answer["field"] == "custom_filenames[1]", answer
    assert creates(sim) == []
    status, answer, _ = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x",
                                                   "custom_filename": nfd})
    assert status == 200 and Path(answer["files"][0]).stem == nfc, answer


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "aux.png", "Lpt9.webp", "con.tar",
                                  "COM\u00b2"])
def test_windows_device_names_are_refused(client: FlaskClient, sim: Simulator,
                                          name: str) -> None:
    status, answer, _ = post(client, "/generate", {"model_name": "flux-dev", "prompt": "x",
                                                   "custom_filename": name})
    assert status == 400 and answer["field"] == "custom_filename", answer
    assert creates(sim) == []

