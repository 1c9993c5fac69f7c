"""The OpenAPI description: valid, the same constraints as /models, every route, and fuzzed by
schemathesis against the real service (gunicorn + the simulator) with and without a key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema_rs import Draft202012Validator
from openapi_spec_validator import validate

from conftest import ADMIN, ADMIN_KEY
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.openapi import build_spec
from replicate_generation.openapi.common import identifier
from replicate_generation.openapi.operations import INTERNAL_BLUEPRINTS
from replicate_generation.settings import Settings
from servers import Gunicorn

CHECKS = "all"
EXAMPLES_PER_OPERATION = 5
SEED = 20261121
# The wrong key schemathesis tries (ignored_auth): Replicate never issued it, so it refuses it.
INVALID_KEY = "SCHEMATHESIS-INVALID-VALUE"


def _spec(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.get_json())


def test_spec_is_valid_openapi_3_1(client: FlaskClient) -> None:
    spec = _spec(client)
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_every_model_and_parameter_matches_models(client: FlaskClient) -> None:
    schemas = _spec(client)["components"]["schemas"]
    models = client.get("/models").get_json()["models"]
    for model_id, model in models.items():
        props = schemas[identifier(f"Model_{model_id}")]["properties"]
        for name, param in model["parameters"].items():
            _assert_same_constraints(props[name], param, f"{model_id}.{name}")


def _assert_same_constraints(schema: dict[str, Any], param: dict[str, Any], where: str) -> None:
    json_type = {"uri": "string", "uri_list": "array"}.get(param["type"], param["type"])
    assert schema["type"] == json_type, where
    assert schema.get("enum") == param.get("choices"), where
    assert schema.get("minimum") == param.get("minimum"), where
    assert schema.get("maximum") == param.get("maximum"), where
    assert schema.get("default") == param["default"], where
    assert schema.get("maxLength") == param.get("max_length"), where
    assert schema.get("maxItems") == param.get("max_items"), where


def test_request_bodies_are_discriminated_by_model(client: FlaskClient) -> None:
    schemas = _spec(client)["components"]["schemas"]
    models = client.get("/models").get_json()["models"]
    for union in ("GenerateRequest", "BatchPromptsRequest", "Task"):
        mapping = schemas[union]["discriminator"]["mapping"]
        for model_id, model in models.items():
            assert mapping[model_id] == mapping[model["replicate_model"]]
    batch = schemas["GenerateBatchRequest"]["oneOf"]
    assert {b["$ref"].rsplit("/", 1)[1] for b in batch} == {"BatchPromptsRequest",
                                                             "BatchTasksRequest"}


def test_every_route_is_described_with_auth_and_errors(app: Flask, client: FlaskClient) -> None:
    spec = _spec(client)
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    internal = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            # The console's own routes are known (else the build fails) but not published.
            public = rule.endpoint.split(".", 1)[0] not in INTERNAL_BLUEPRINTS
            internal += not public
            assert ((path, method.lower()) in described) == public, (path, method)
    assert internal >= 5  # the console's pages, sign-in and proxy
    schemes = spec["components"]["securitySchemes"]
    assert schemes["AdminKey"] == {**schemes["AdminKey"], "type": "apiKey", "in": "header",
                                   "name": "X-Admin-API-Key"}
    assert schemes["ReplicateKey"]["name"] == "X-Replicate-API-Key"
    assert schemes["IssuedKey"]["name"] == "X-API-Key"
    assert schemes["IssuedBearer"] == {**schemes["IssuedBearer"], "type": "http",
                                       "scheme": "bearer"}
    generate = spec["paths"]["/generate"]["post"]
    for status in ("400", "401", "413", "415", "429", "502", "503", "504"):
        schema = generate["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}


def test_a_route_without_a_description_fails_the_build(app: Flask) -> None:
    app.add_url_rule("/undocumented", "undocumented", lambda: "x")
    with pytest.raises(KeyError, match="undocumented"):
        build_spec(app, app.extensions["settings"], "0")


def test_docs_are_served_from_the_package_under_a_strict_csp(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    html = page.get_data(as_text=True)
    assert "<script>" not in html  # no inline script: the CSP forbids it
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/docs/") for a in assets)  # no CDN
    for asset in assets:
        with client.get(asset) as response:
            assert response.status_code == 200, asset
            assert len(response.data) > 10, asset


# --------------------------------------------------------------------------- the document is true

URL = "https://example.com/ref.png"
FLUX = {"model_name": "flux-dev", "prompt": "a fox"}
# Bodies of POST /generate at the edges of what the service takes: each is valid by the
# document exactly when the service accepts it. (Rules only prose can state are left out.)
GENERATE_BODIES: list[dict[str, Any]] = [
    FLUX, {**FLUX, "num_inference_steps": 30.0, "seed": 7.0}, {**FLUX, "seed": 7.5},
    {**FLUX, "prompt": " \x1c\x85"}, {**FLUX, "async": None, "custom_filename": None},
    {**FLUX, "fallback": "yes"}, {**FLUX, "webhook": "https://example.com/hook"},
    {**FLUX, "image": URL}, {**FLUX, "image": URL, "input_image": URL},
    {**FLUX, "image_input": [URL] * 3}, {**FLUX, "image_input": [URL] * 4},
    {**FLUX, "reference_images": []}, {**FLUX, "audio_prompt": URL},
    {**FLUX, "model_name": "flux-kontext-max", "image_input": [URL, URL]},
    {**FLUX, "model_name": "flux-kontext-max", "reference_images": [URL]},
    {**FLUX, "model_name": "veo-3-fast", "start_image": URL},
    {**FLUX, "model_name": "veo-3-fast", "audio_prompt": URL},
    {**FLUX, "model_name": "chatterbox", "image": URL},
    {**FLUX, "model_name": "chatterbox", "audio_prompt": URL},
    {**FLUX, "model_name": "chatterbox", "placeholder": True},
    {**FLUX, "model_name": "chatterbox", "placeholder": False}, {**FLUX, "placeholder": True},
    *({**FLUX, "image": uri} for uri in (
        "http://", "http://[::1", "https://example.com/a b", "HTTPS://example.com",
        "https://example.com/\u00e9", "data:image/png;base64,AAAA", "data:no-comma",
        "http://x/" + "a" * 2040, "http://x/" + "a" * 2041, "https://example.com/\n")),
    *({**FLUX, "custom_filename": name} for name in (
        "fox", "fox.png", "Fox 1 (final)", "\u00e9 \u00fc", "x" * 120, "x" * 121, ".fox",
        "a..b", "a/b", "a:b", "fox ", " fox", "fox .png", "fox.", "a\u200bb", "a\x7fb",
        "fox\n", "")),
]
BATCH_BODIES: list[dict[str, Any]] = [
    {"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["a", "b"]},
    {"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["a", "a"]},
    {"model_name": "flux-dev", "prompts": ["a"], "custom_filenames": None, "image": URL},
    {"model_name": "flux-dev", "prompts": ["a"], "image": URL, "image_prompt": URL},
    {"tasks": [FLUX, {**FLUX, "model_name": "chatterbox"}]},
    {"tasks": [FLUX], "placeholder": True},
    {"tasks": [FLUX, {**FLUX, "model_name": "chatterbox"}], "placeholder": True},
    {"tasks": [FLUX], "prompts": ["a"]},
    {"tasks": [{**FLUX, "image": URL, "start_image": URL}]},
]
KEY_BODIES: list[dict[str, Any]] = [
    {"name": "svc-a"}, {"name": "svc-b\n"}, {"name": " svc"}, {"name": "b", "weight": 0},
    {"name": "c", "max_concurrent": 2.0, "budget_usd": 5, "budget_period": "day"},
    {"name": "d", "budget_period": "week"}, {"name": "e", "models": []},
    {"name": "f", "models": ["flux-dev", "acme/model"], "expires_at": "2999-01-01T00:00:00Z"},
    {"name": "g", "expires_at": "2999-01-01T00:00:00z"}, {"name": "h", "expires_at": "2999-01-01"},
    {"name": "i", "expires_at": "9999-12-31T23:00:00-23:00"}, {"name": "j", "secret": "x"},
]
CONFIGURE_BODIES: list[dict[str, Any]] = [
    {"burst": 1000}, {"burst": 1001}, {"burst": 30.0}, {"burst": 0}, {"burst": None},
    {"concurrent_limit": 10_000, "requests_per_minute": 100_000}, {"concurrent_limit": 10_001},
    {"polls_per_minute": 100_001}, {}, {"burst": 2.5},
]


def _admits(spec: dict[str, Any], component: str, body: dict[str, Any]) -> bool:
    """Whether the document's schema for `component` admits the body (ECMA regexes, as JSON
    Schema says: `$` is the very end)."""
    root = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    return Draft202012Validator(root, validate_formats=True).is_valid(body)


@pytest.mark.parametrize(("path", "component", "bodies"), [
    ("/generate", "GenerateRequest", GENERATE_BODIES),
    ("/generate-batch", "GenerateBatchRequest", BATCH_BODIES),
    ("/configure", "ConfigureRequest", CONFIGURE_BODIES),
    ("/keys", "KeyMint", KEY_BODIES),
])
def test_the_document_admits_exactly_what_the_service_accepts(
        client: FlaskClient, path: str, component: str, bodies: list[dict[str, Any]]) -> None:
    spec = _spec(client)
    dry = {"dry_run": True} if path.startswith("/generate") else {}
    for body in bodies:
        response = client.post(path, json={**body, **dry}, headers=ADMIN)
        accepted = response.status_code in (200, 201)
        assert accepted or response.status_code == 400, (body, response.get_json())
        assert _admits(spec, component, {**body, **dry}) == accepted, (
            body, response.get_json())


# --------------------------------------------------------------------------- fuzzing


def _schemathesis(server: Gunicorn, report: Path, phases: str, selection: tuple[str, ...],
                  *headers: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(EXAMPLES_PER_OPERATION),
            "--seed", str(SEED), "--generation-deterministic", "--workers", "1",
            "--phases", phases, "--request-timeout", "30", *selection,
            "--report", "junit", "--report-junit-path", str(report)]
    for header in headers:
        argv += ["--header", header]
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    # Run in the test's directory: schemathesis keeps a .schemathesis/ cache in its cwd.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          cwd=report.parent, env=env)
    return done.returncode, done.stdout + done.stderr


# Each group runs against a service of its own, so the groups run side by side; /configure is
# one alone: the limits it fuzzes (one create a minute) would leave other routes' generations no
# budget within their deadline, a 504 that is the service doing its job.
_GROUPS = "generate|generate-batch|keys|audit|usage|configure"
SELECTIONS = {
    "generate": ("--include-path", "/generate"),
    "batch": ("--include-path", "/generate-batch"),
    "keys": ("--include-path-regex", "^/(keys|audit|usage)"),
    "rest": ("--exclude-path-regex", f"^/({_GROUPS})(/|$)"),
    "configure": ("--include-path", "/configure"),
}
# Coverage (boundary and negative cases of every schema) is what takes time: it runs with the
# key, where bodies reach validation; without one every protected route answers 401 early.
CASES = [("admin", "examples,coverage,fuzzing", group) for group in SELECTIONS] + [
    ("none", "examples,fuzzing", "all")]


@pytest.mark.parametrize(("auth", "phases", "group"), CASES)
def test_schemathesis_finds_nothing(auth: str, phases: str, group: str,
                                    make_settings: Callable[..., Settings], sim: Simulator,
                                    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    sim.configure(unknown_tokens={INVALID_KEY})
    # Batches of at most 3 keep the fuzzed generations few (service_env leaves the size out).
    # Event streams end after a moment, so each fuzzed one answers in time.
    server = start_gunicorn(make_settings(), workers=1, MAX_BATCH_SIZE="3",
                            EVENT_STREAM_MAX_SECONDS="0.3")
    headers = [f"X-Admin-API-Key: {ADMIN_KEY}"] if auth == "admin" else []
    selection = SELECTIONS.get(group, ())
    code, output = _schemathesis(server, tmp_path / "junit.xml", phases, selection, *headers)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (generated|passed)", line)]
    with capsys.disabled():  # the case count shows in CI's output, passing or not
        print(f"\nschemathesis ({auth}, {phases}, {group}):", *summary)
    assert code == 0, output[-6000:]
    assert re.search(r"\d+ generated", output), output[-2000:]
    assert ADMIN_KEY not in server.log()
