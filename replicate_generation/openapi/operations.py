"""Every route of the app as an OpenAPI operation: its summary, security, parameters, body and
responses. A Flask rule missing from OPERATIONS fails the build (and a test)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from flask import Flask

from replicate_generation.jobs.rows import ITEM_STATES
from replicate_generation.observability import HEADER as REQUEST_ID_HEADER
from replicate_generation.openapi.bodies import operation_examples
from replicate_generation.openapi.common import Schema, ref
from replicate_generation.openapi.keys import audit_params, usage_params
from replicate_generation.settings import Settings

# One part of `owner/name`, as models/schemas.py's MODEL_REF reads it.
MODEL_PART = "[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
DOCS_ASSETS = {"swagger-ui.css": "text/css", "index.css": "text/css",
               "swagger-ui-bundle.js": "text/javascript",
               "swagger-ui-standalone-preset.js": "text/javascript",
               "init.js": "text/javascript",
               "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}

REQUEST_ID_PARAM = {"name": REQUEST_ID_HEADER, "in": "header", "required": False,
                    "description": "Your id for this request (1-128 of [A-Za-z0-9._:-]); "
                                   "anything else is replaced by a new one.",
                    "schema": {"type": "string"}}
ASYNC_PARAMS = [
    {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "`respond-async`: answer 202 with the job at once."},
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": r"^[!-~]([ -~]{0,253}[!-~])?$"},
     "description": "1-255 printable ASCII characters; the same key with another body is a "
                    "422."},
]
# Where an event stream resumes: EventSource sends the header itself when it reconnects.
_EVENT_ID = {"type": "string", "pattern": "^[0-9]{1,18}$"}
EVENT_PARAMS = [
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": _EVENT_ID,
     "description": "The id of the last event you received: the stream goes on after it, "
                    "with nothing missed or repeated."},
    {"name": "last_event_id", "in": "query", "required": False, "schema": _EVENT_ID,
     "description": "The same, for a first connection that cannot set headers."},
]
Security = list[dict[str, list[str]]]
ANY_KEY: Security = [{"AdminKey": []}, {"ReplicateKey": []}, {"IssuedKey": []},
                     {"IssuedBearer": []}]
ADMIN_ONLY: Security = [{"AdminKey": []}]
OPTIONAL_KEY: Security = [{}, *ANY_KEY]
# 402: past a budget (an issued key's, or ACCOUNT_BUDGET_USD); 403: a model a key may not run.
GENERATE_ERRORS = (400, 401, 402, 403, 413, 415, 422, 429, 502, 503, 504, 507)

# (endpoint, method) -> summary, security, request body schema, {status: response schema}, extra.
Operation = dict[str, Any]
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("api.health", "GET"): {"summary": "Liveness, each backend, and the limits in force",
                            "security": [],
                            "responses": {200: "Health"}},
    ("api.status", "GET"): {"summary": "Live figures; your account (or all, admin) with a key",
                            "security": OPTIONAL_KEY,
                            "responses": {200: "Status", 401: "Error", 503: "Error"}},
    ("api.models", "GET"): {"summary": "Every model and its parameters", "security": [],
                            "responses": {200: "Models"}},
    ("api.model_detail", "GET"): {
        "summary": "One model's parameters: a curated one's (no key needed), or those of any "
                   "other model's own schema where MODEL_POLICY allows it (with a key)",
        "security": OPTIONAL_KEY,
        "responses": {200: "ModelDetail", 401: "Error", 404: "Error", 502: "Error",
                      503: "Error"}},
    ("api.configure", "POST"): {
        "summary": "Override limits for every process (null clears one)",
        "security": ADMIN_ONLY, "body": ref("ConfigureRequest"),
        "responses": {200: "Configuration", 400: "Error", 401: "Error", 403: "Error",
                      413: "Error", 415: "Error"}},
    ("api.clear_configuration", "DELETE"): {
        "summary": "Drop every override", "security": ADMIN_ONLY,
        "responses": {200: "Configuration", 401: "Error", 403: "Error"}},
    ("api.generate", "POST"): {
        "summary": "Generate one prompt's outputs (or submit it as a job)", "security": ANY_KEY,
        "body": ref("GenerateRequest"), "params": ASYNC_PARAMS, "job": True,
        "examples": operation_examples(batch=False),
        "responses": {200: ["GenerateResult", "Estimate"], 202: "JobSummary",
                      **dict.fromkeys(GENERATE_ERRORS, "Error")}},
    ("api.generate_batch", "POST"): {
        "summary": "Generate many prompts in parallel, results in input order",
        "security": ANY_KEY, "body": ref("GenerateBatchRequest"), "params": ASYNC_PARAMS,
        "examples": operation_examples(batch=True),
        "job": True, "responses": {200: ["BatchResult", "Estimate"], 202: "JobSummary",
                                   **dict.fromkeys(GENERATE_ERRORS, "Error")}},
    ("api.list_jobs", "GET"): {
        "summary": "Your jobs, newest first", "security": ANY_KEY,
        "params": [{"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                   {"name": "after", "in": "query", "required": False,
                    "schema": {"type": "string"}}],
        "responses": {200: "JobList", 400: "Error", 401: "Error", 404: "Error", 503: "Error"}},
    ("api.get_job", "GET"): {"summary": "A job and its first items (items_next pages on)",
                             "security": ANY_KEY,
                             "responses": {200: "Job", 401: "Error", 404: "Error", 503: "Error"}},
    ("api.cancel_job", "POST"): {"summary": "Cancel a job", "security": ANY_KEY,
                                 "responses": {200: "Job", 401: "Error", 404: "Error",
                                               503: "Error"}},
    ("api.get_file", "GET"): {
        "summary": "Download an output (Range supported on disk; OUTPUT_SERVING=signed: 302 "
                   "to a signed bucket URL)", "security": ANY_KEY,
        "params": [{"name": "Range", "in": "header", "required": False,
                    "schema": {"type": "string"}}],
        "responses": {200: "file", 206: "file", 302: None, 304: None, 401: "Error",
                      404: "Error", 416: "Error", 502: "Error", 503: "Error"}},
    ("api.webhook_signing_secret", "GET"): {
        "summary": "Your webhook signing secret", "security": ANY_KEY,
        "responses": {200: "WebhookSecret", 401: "Error", 404: "Error", 503: "Error"}},
    ("ops.openapi", "GET"): {"summary": "This description", "security": [],
                             "responses": {200: "openapi"}},
    ("ops.docs", "GET"): {"summary": "Interactive documentation (Swagger UI)", "security": [],
                          "responses": {200: "html"}},
    ("ops.docs_asset", "GET"): {"summary": "A Swagger UI file, served from the package",
                                "security": [], "responses": {200: "asset", 404: "Error"}},
    ("ops.ready", "GET"): {"summary": "Readiness: 503 while a dependency is down",
                           "security": [], "responses": {200: "Ready", 503: "NotReady"}},
    ("ops.metrics_view", "GET"): {"summary": "Prometheus metrics", "security": "metrics",
                             "responses": {200: "metrics", 401: "Error", 403: "Error"}},
    ("extras.job_archive", "GET"): {
        "summary": "Every file of a job, in input order, as one zip", "security": ANY_KEY,
        "responses": {200: "zip", 401: "Error", 404: "Error", 503: "Error"}},
    ("extras.job_items", "GET"): {
        "summary": "A job's items in input order, a page at a time (after a cursor, by state)",
        "security": ANY_KEY,
        "params": [{"name": "after", "in": "query", "required": False,
                    "description": "The next_cursor of the previous page (an item's index).",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 10**9}},
                   {"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                   {"name": "state", "in": "query", "required": False,
                    "schema": {"enum": list(ITEM_STATES)}}],
        "responses": {200: "JobItemList", 400: "Error", 401: "Error", 404: "Error",
                      503: "Error"}},
    ("extras.retry_job", "POST"): {
        "summary": "Retry a job's failed items as a new job (same models and parameters, "
                   "checked again against the model policy and schemas in force)",
        "security": ANY_KEY, "job": True,
        "responses": {202: "JobSummary", 400: "Error", 401: "Error", 402: "Error",
                      403: "Error", 404: "Error", 409: "Error", 413: "Error", 429: "Error",
                      502: "Error", 503: "Error"}},
    ("keys.mint_key", "POST"): {
        "summary": "Issue a key for an internal service (its secret shown this once)",
        "security": ADMIN_ONLY, "body": ref("KeyMint"),
        "example": {"name": "reports-service", "budget_usd": 50, "models": ["flux-dev"]},
        "responses": {201: "Key", 400: "Error", 401: "Error", 403: "Error", 409: "Error",
                      413: "Error", 415: "Error"}},
    ("keys.list_keys", "GET"): {"summary": "Every issued key, revoked ones too (no secrets)",
                                "security": ADMIN_ONLY,
                                "responses": {200: "KeyList", 401: "Error", 403: "Error"}},
    ("keys.get_key", "GET"): {"summary": "One issued key", "security": ADMIN_ONLY,
                              "responses": {200: "Key", 401: "Error", 403: "Error"}},
    ("keys.change_key", "PATCH"): {
        "summary": "Change a live key's name, budget, limits, models or expiry",
        "security": ADMIN_ONLY, "body": ref("KeyChange"),
        "responses": {200: "Key", 400: "Error", 401: "Error", 403: "Error", 409: "Error",
                      413: "Error", 415: "Error"}},
    ("keys.rotate_key", "POST"): {
        "summary": "A new secret (shown this once); the old one works for grace_seconds",
        "security": ADMIN_ONLY, "body": ref("KeyRotate"), "body_optional": True,
        "responses": {200: "Key", 400: "Error", 401: "Error", 403: "Error", 409: "Error",
                      413: "Error", 415: "Error"}},
    ("keys.revoke_key", "DELETE"): {
        "summary": "Revoke a key from its next request on (kept, shown as revoked)",
        "security": ADMIN_ONLY, "responses": {200: "Key", 401: "Error", 403: "Error"}},
    ("keys.audit_log", "GET"): {
        "summary": "Keys minted, changed, rotated and revoked, limit changes and admin cancels",
        "security": ADMIN_ONLY, "params": audit_params(),
        "responses": {200: "AuditList", 400: "Error", 401: "Error", 403: "Error"}},
    ("events.job_events", "GET"): {
        "summary": "A job's events as Server-Sent Events, from its start (or after "
                   "Last-Event-ID) to its end: item states, counts, files, cost; 204 once ended",
        "security": ANY_KEY, "params": EVENT_PARAMS,
        "responses": {200: "event_stream", 204: None, 400: "Error", 401: "Error", 404: "Error",
                      429: "Error", 503: "Error"}},
    ("events.all_events", "GET"): {
        "summary": "Events of every job you may see, as Server-Sent Events, from now (or "
                   "after Last-Event-ID)",
        "security": ANY_KEY, "params": EVENT_PARAMS,
        "responses": {200: "event_stream", 400: "Error", 401: "Error", 429: "Error",
                      503: "Error"}},
    ("usage.usage", "GET"): {
        "summary": "What was spent, by key, model or day (the admin's all, a key's its own)",
        "security": ANY_KEY, "params": usage_params(),
        "responses": {200: "usage", 400: "Error", 401: "Error", 503: "Error"}},
    # The browser console (README, "Console"): HTML pages and a session cookie, not a key.
    ("console.index", "GET"): {"summary": "The console (or its sign-in page)", "security": [],
                               "responses": {200: "html"}},
    ("console.job_page", "GET"): {"summary": "The console's page for one job", "security": [],
                                  "responses": {200: "html"}},
    ("console.usage_page", "GET"): {"summary": "The console's usage page", "security": [],
                                    "responses": {200: "html"}},
    ("console.keys_page", "GET"): {"summary": "The console's keys page (admin)", "security": [],
                                   "responses": {200: "html"}},
    ("console.api_delete", "DELETE"): {"summary": "DELETE on the JSON API as the console "
                                       "session's account (needs X-CSRF-Token)", "security": [],
                                       "responses": {200: "proxied", 401: "Error", 403: "Error",
                                                     404: "Error"}},
    ("console.sign_in", "POST"): {"summary": "Open a console session (form: kind, key)",
                                  "security": [],
                                  "responses": {303: None, 401: "html", 403: "text", 413: "Error",
                                                503: "html"}},
    ("console.sign_out", "POST"): {"summary": "Close the console session", "security": [],
                                   "responses": {303: None, 403: "text"}},
    ("console.asset", "GET"): {"summary": "A console script or style sheet", "security": [],
                               "responses": {200: "console_asset", 404: "Error"}},
    ("console.api_read", "GET"): {"summary": "The JSON API as the console session's account",
                             "security": [], "responses": {200: "proxied", 401: "Error",
                                                           403: "Error", 404: "Error"}},
    ("console.api_write", "POST"): {"summary": "The JSON API as the console session's account "
                                         "(needs X-CSRF-Token)",
                              "security": [], "responses": {200: "proxied",
                                                            202: "JobSummary",
                                                            401: "Error", 403: "Error",
                                                            404: "Error"}},
}
COMMON_ERRORS = (404, 405, 500)
# The console's own routes (HTML pages, a session cookie, a proxy to the API above): described
# above so every route is known, and left out of the public document.
INTERNAL_BLUEPRINTS = ("console",)
# The document's groups, in the order /docs shows them. An operation's tag is its blueprint's
# where that names a group, else its path's first part's (PATH_TAGS), else "operations".
TAGS = {"generate": "Submit prompts or tasks: wait for the outputs, or get a job at once.",
        "jobs": "Jobs: state, items, cancel, retry, a zip of the files, the webhook secret.",
        "files": "Download an output file.",
        "events": "Server-Sent Events: a job's, or every job's of yours, as they happen.",
        "models": "The models and their parameters.",
        "keys": "Issued keys and the audit log (admin).",
        "usage": "What was spent, by key, model or day.",
        "operations": "Health, readiness, status, limits, metrics and this document."}
PATH_TAGS = {"generate": "generate", "generate-batch": "generate", "jobs": "jobs",
             "webhooks": "jobs", "files": "files", "models": "models", "events": "events"}


def _path_of(rule: str) -> tuple[str, list[str]]:
    """Flask's `/jobs/<job_id>` as OpenAPI's `/jobs/{job_id}`, with its parameter names."""
    names = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), names


def _content(kind: str | list[str] | None) -> Schema | None:
    if kind is None:
        return None
    if isinstance(kind, list):
        return {"application/json": {"schema": {"anyOf": [ref(k) for k in kind]}}}
    # octet-stream first: generators that know one binary type (openapi-python-client) take it.
    files: Schema = {mime: {"schema": binary(mime)} for mime in (
        "application/octet-stream", "image/*", "video/*", "audio/*")}
    special: dict[str, Schema] = {
               "file": files, "html": {"text/html": {"schema": {"type": "string"}}},
               "metrics": {"text/plain": {"schema": {"type": "string"}}},
               "openapi": {"application/json": {"schema": {"type": "object",
                                                           "additionalProperties": True}}},
               "asset": {mime: {"schema": binary(mime) if mime.startswith("image/")
                                else {"type": "string"}}
                         for mime in sorted(set(DOCS_ASSETS.values()))},
               "zip": {"application/zip": {"schema": binary("application/zip")}},
               # `id:`, `event:` (job.created, item.state, item.file, items.failed,
               # job.cancel_requested, job.finished) and `data:` (JSON) lines; `:` comments.
               "event_stream": {"text/event-stream": {"schema": {"type": "string"}}},
               "text": {"text/plain": {"schema": {"type": "string"}}},
               "console_asset": {"text/css": {}, "text/javascript": {}},
               "usage": {"application/json": {"schema": ref("Usage")},
                         "text/csv": {"schema": {"type": "string"}}},
               "proxied": {"application/json": {}, "application/zip": {}, **files}}
    if kind in special:
        return special[kind]
    return {"application/json": {"schema": ref(kind)}}


def binary(mime: str) -> Schema:
    """A response body of bytes: `format: binary` (OpenAPI 3.0's word, still what generators
    read) and 3.1's contentMediaType."""
    exact = {} if "*" in mime else {"contentMediaType": mime}
    return {"type": "string", "format": "binary", **exact}


def _response(status: int, kind: str | list[str] | None, operation: Operation) -> Schema:
    headers: Schema = {REQUEST_ID_HEADER: {"description": "This request's id (yours if sane).",
                                           "schema": {"type": "string"}}}
    if status in (429, 503):
        headers["Retry-After"] = {"schema": {"type": "string"}}
    if operation.get("job") and status in (200, 202):
        headers["Location"] = {"description": "The job.", "schema": {"type": "string"}}
    out: Schema = {"description": _describe_status(status), "headers": headers}
    content = _content(kind)
    if content is not None:
        out["content"] = content
    return out


def _describe_status(status: int) -> str:
    return {200: "OK", 201: "Created", 202: "Accepted: the job runs",
            204: "Nothing more: the job ended before Last-Event-ID", 206: "Partial content",
            302: "Found: a signed URL in Location", 304: "Not modified",
            400: "Bad input (`field` names it)", 401: "No valid key",
            402: "Past a budget (the key's or the account's)", 403: "Not allowed with this key",
            404: "Not found", 405: "Wrong method", 409: "Conflicts with the current state",
            413: "Body (or the job's records) too large", 415: "Body not application/json",
            416: "Range not satisfiable", 422: "Idempotency-Key reused with another body",
            429: "Queue full, or the account keeps all it may: retry after Retry-After",
            500: "Internal error",
            502: "Replicate failed (`error_type`)", 503: "Unavailable (Retry-After)",
            504: "Deadline exceeded", 507: "Storage error"}.get(status, "See the body")


def _security(value: Any, settings: Settings) -> list[dict[str, list[str]]]:
    if value != "metrics":
        return list(value)
    by_access: dict[str, Security] = {"admin": ADMIN_ONLY, "token": [{"MetricsToken": []}],
                                      "open": []}
    return by_access[settings.metrics_access]


def _operation(endpoint: str, method: str, path_params: list[str], operation: Operation,
               settings: Settings) -> Schema:
    params = [{"name": name, "in": "path", "required": True,
               "schema": _path_schema(endpoint, name)} for name in path_params]
    params += [*operation.get("params", []), REQUEST_ID_PARAM]
    statuses = dict(operation["responses"])
    for status in COMMON_ERRORS:
        statuses.setdefault(status, "Error")
    out: Schema = {
        "operationId": endpoint.split(".", 1)[1], "summary": operation["summary"],
        "security": _security(operation["security"], settings), "parameters": params,
        "responses": {str(s): _response(s, k, operation) for s, k in sorted(statuses.items())}}
    if "body" in operation:
        media: Schema = {"schema": operation["body"]}
        if "examples" in operation:  # else /docs builds one from the oneOf, mixing every model
            media["examples"] = operation["examples"]
        elif "example" in operation:
            media["example"] = operation["example"]
        out["requestBody"] = {"required": not operation.get("body_optional"),
                              "content": {"application/json": media}}
    return out


def _path_schema(endpoint: str, name: str) -> Schema:
    if endpoint == "ops.docs_asset":
        return {"type": "string", "enum": sorted(DOCS_ASSETS)}
    if endpoint == "api.model_detail":  # the parts of a model reference (models/schemas.py)
        version = "(:[0-9a-f]{64})?" if name == "name" else ""
        return {"type": "string", "pattern": f"^{MODEL_PART}{version}$",
                "description": "A curated model, or any other where MODEL_POLICY allows it; "
                               "else a 404."}
    return {"type": "string", "minLength": 1}


def _rules(app: Flask) -> Iterator[tuple[str, str, str]]:
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule.rule, rule.endpoint, method


def tag_of(endpoint: str, path: str) -> str:
    blueprint = endpoint.split(".", 1)[0]
    if blueprint in TAGS:
        return blueprint
    return PATH_TAGS.get(path.strip("/").split("/", 1)[0], "operations")


def paths(app: Flask, settings: Settings) -> Schema:
    """Every public route of the app, tagged; a route OPERATIONS does not describe is an error."""
    out: Schema = {}
    for rule, endpoint, method in _rules(app):
        operation = OPERATIONS.get((endpoint, method))
        if operation is None:
            raise KeyError(f"{method} {rule} ({endpoint}) has no OpenAPI description")
        if endpoint.split(".", 1)[0] in INTERNAL_BLUEPRINTS:
            continue
        path, names = _path_of(rule)
        described = _operation(endpoint, method, names, operation, settings)
        out.setdefault(path, {})[method.lower()] = {"tags": [tag_of(endpoint, path)],
                                                    **described}
    return out

