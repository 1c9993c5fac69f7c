"""The OpenAPI description: valid, the same constraints as /models, every route, and fuzzed by
schemathesis against the real service (gunicorn + the simulator) with and without a key."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from conftest import ADMIN_KEY
from replicate_generation.openapi import build_spec
from replicate_generation.settings import Settings
from servers import Gunicorn

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
EXAMPLES_PER_OPERATION = 5
SEED = 20261121


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
        props = schemas[f"Model_{model_id}"]["properties"]
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
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in described
    schemes = spec["components"]["securitySchemes"]
    assert schemes["AdminKey"] == {**schemes["AdminKey"], "type": "apiKey", "in": "header",
                                   "name": "X-Admin-API-Key"}
    assert schemes["ReplicateKey"]["name"] == "X-Replicate-API-Key"
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


# --------------------------------------------------------------------------- fuzzing


def _schemathesis(server: Gunicorn, report: Path, phases: str,
                  *headers: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(EXAMPLES_PER_OPERATION),
            "--seed", str(SEED), "--generation-deterministic", "--workers", "1",
            "--phases", phases, "--request-timeout", "30",
            "--report", "junit", "--report-junit-path", str(report)]
    for header in headers:
        argv += ["--header", header]
    # Run in the test's directory: schemathesis keeps a .schemathesis/ cache in its cwd.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          cwd=report.parent)
    return done.returncode, done.stdout + done.stderr


# Coverage (boundary and negative cases of every schema) is what takes time: it runs with the
# key, where bodies reach validation; without one every protected route answers 401 early.
@pytest.mark.parametrize(("auth", "phases"), [("admin", "examples,coverage,fuzzing"),
                                               ("none", "examples,fuzzing")])
def test_schemathesis_finds_nothing(auth: str, phases: str,
                                    make_settings: Callable[..., Settings],
                                    start_gunicorn: Callable[..., Gunicorn], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    server = start_gunicorn(make_settings(max_batch_size=3), workers=1)
    headers = [f"X-Admin-API-Key: {ADMIN_KEY}"] if auth == "admin" else []
    report = tmp_path / "junit.xml"
    code, output = _schemathesis(server, report, phases, *headers)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (generated|passed)",
                                                                   line)]
    with capsys.disabled():  # the case count shows in CI's output, passing or not
        print(f"\nschemathesis ({auth}, {phases}):", *summary)
    assert code == 0, output[-6000:]
    assert re.search(r"\d+ generated", output), output[-2000:]
    assert ADMIN_KEY not in server.log()
