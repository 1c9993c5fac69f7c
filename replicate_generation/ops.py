"""Operator routes: /openapi.json, /docs (Swagger UI from the package), /metrics and /ready."""

from __future__ import annotations

import sqlite3
from importlib import resources

from flask import Blueprint, Flask, Response, current_app, jsonify, request, send_file
from sqlalchemy.exc import DBAPIError
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, NotFound, Unauthorized

from replicate_generation import metrics
from replicate_generation.errors import StoreUnavailable
from replicate_generation.http import context
from replicate_generation.http.auth import same_secret
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.openapi import DOCS_ASSETS, build_spec
from replicate_generation.outputs import OutputStoreUnavailable
from replicate_generation.settings import Settings

ops = Blueprint("ops", __name__)

# Swagger UI runs from its own files only: no inline script, nothing from another origin.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Replicate Concurrent Generation API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="stylesheet" href="/docs/index.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""
DOCS_INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl], layout: "StandaloneLayout",
    validatorUrl: null
  });
});
"""


def register(app: Flask, version: str) -> None:
    """Add the operator routes; the spec is built once, after every route exists."""
    app.register_blueprint(ops)
    app.extensions["openapi_version"] = version


@ops.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description, generated from the catalogue and the route table."""
    spec = current_app.extensions.get("openapi_spec")
    if spec is None:
        version = current_app.extensions["openapi_version"]
        spec = build_spec(current_app, context.settings(), version)
        current_app.extensions["openapi_spec"] = spec
    return jsonify(spec)


@ops.get("/docs")
def docs() -> Response:
    """Swagger UI, entirely from this package's files."""
    return _with_csp(Response(DOCS_PAGE, mimetype="text/html"))


@ops.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    """One of Swagger UI's bundled files (flask-swagger-ui's dist), or our initialiser."""
    if name not in DOCS_ASSETS:
        raise NotFound("No such documentation file")
    if name == "init.js":
        return _with_csp(Response(DOCS_INIT, mimetype="text/javascript"))
    path = resources.files("flask_swagger_ui") / "dist" / name
    response = send_file(str(path), mimetype=DOCS_ASSETS[name], max_age=3600)
    return _with_csp(response)


def _with_csp(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = DOCS_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@ops.get("/ready")
def ready() -> tuple[Response, int]:
    """200 once the store is open and the dispatcher runs; 503 while either is not."""
    checks = readiness_checks(context.runner())
    if all(value == "ok" for value in checks.values()):
        return jsonify(status="ready", checks=checks), 200
    return jsonify(status="not_ready", error="The service is not ready", checks=checks), 503


def readiness_checks(runner: JobRunner) -> dict[str, str]:
    """Each dependency and whether it works now ("ok" or why not)."""
    dispatcher = runner.generator.dispatcher
    checks = {"dispatcher": "ok" if dispatcher.running else "stopped"}
    jobs = "state_file" if runner.store.db.backend == "sqlite" else "jobs"
    try:
        runner.store.db.probe_write()
        checks[jobs] = "ok"
    except StoreUnavailable as exc:
        checks[jobs] = f"unavailable: {exc}"
    except (sqlite3.Error, DBAPIError, OSError) as exc:
        checks[jobs] = f"unusable: {type(exc).__name__}: {str(exc)[:200]}"
    checks["limits"] = runner.limits_status()
    try:
        runner.generator.storage.probe_write()
        checks["outputs"] = "ok"
    except OutputStoreUnavailable as exc:
        checks["outputs"] = f"unavailable: {exc}"
    return checks


@ops.get("/metrics")
def metrics_view() -> Response:
    """Prometheus text exposition, to whoever METRICS_ACCESS allows."""
    _check_scraper(context.settings())
    runner = context.runner()
    body = metrics.render(metrics.StateCollector(runner.generator.manager, runner.store))
    return Response(body, mimetype="text/plain", content_type=metrics.CONTENT_TYPE_LATEST)


def _check_scraper(settings: Settings) -> None:
    if settings.metrics_access == "open":
        return
    if settings.metrics_access == "token":
        _check_bearer(settings.metrics_token or "")
        return
    given = request.headers.get("X-Admin-API-Key")
    if given is None:
        if "X-Replicate-API-Key" in request.headers:
            raise Forbidden("Metrics need the admin key (X-Admin-API-Key)")
        raise Unauthorized("Metrics need the admin key (X-Admin-API-Key)")
    if not same_secret(given, settings.admin_api_key):
        raise Unauthorized("Metrics need the admin key (X-Admin-API-Key)")


def _check_bearer(expected: str) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not same_secret(given.strip(), expected):
        raise Unauthorized("Metrics need the METRICS_TOKEN as a bearer token",
                           www_authenticate=WWWAuthenticate("bearer", {"realm": "metrics"}))
