"""OpenAPI 3.1 for the service, built from the catalogue and the route table, so it cannot drift.

A Flask rule missing from OPERATIONS fails the build (and a test); request bodies are oneOf per
model, discriminated by `model_name`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from flask import Flask

from replicate_generation.models.catalogue import MODELS, ModelSpec, Param
from replicate_generation.models.routing import REFERENCE_KEYS
from replicate_generation.models.schemas import MODEL_NAME_PATTERN
from replicate_generation.observability import HEADER as REQUEST_ID_HEADER
from replicate_generation.request_parsing import OPTION_KEYS
from replicate_generation.settings import Settings

Schema = dict[str, Any]
URI_PATTERN = "^(https?://|data:)"
LIST_REFERENCE_KEYS = ("image_input", "reference_images")
JOB_STATES = ["queued", "running", "cancel_requested", "succeeded", "partially_failed", "failed",
              "canceled"]
ITEM_STATES = ["queued", "running", "succeeded", "failed", "canceled"]
DOCS_ASSETS = {"swagger-ui.css": "text/css", "index.css": "text/css",
               "swagger-ui-bundle.js": "text/javascript",
               "swagger-ui-standalone-preset.js": "text/javascript",
               "init.js": "text/javascript",
               "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


# --------------------------------------------------------------------------- parameters


def param_schema(param: Param) -> Schema:
    """One catalogue parameter as JSON Schema: type, choices, range, length and default."""
    schema = _base_schema(param)
    schema["description"] = param.description
    if param.choices is not None:
        schema["enum"] = list(param.choices)
    if param.minimum is not None:
        schema["minimum"] = param.minimum
    if param.maximum is not None:
        schema["maximum"] = param.maximum
    if param.default is not None:
        schema["default"] = param.default
    return schema


def _base_schema(param: Param) -> Schema:
    if param.type == "uri":
        return _uri()
    if param.type == "uri_list":
        items: Schema = {"type": "array", "items": _uri(), "minItems": 1}
        if param.max_items is not None:
            items["maxItems"] = param.max_items
        return items
    schema: Schema = {"type": param.type}
    if param.type == "string" and param.max_length is not None:
        schema["maxLength"] = param.max_length
    if param.required and param.type == "string":
        schema.update(minLength=1, pattern=r"\S")
    return schema


def _uri() -> Schema:
    return {"type": "string", "pattern": URI_PATTERN,
            "description": "An http(s) URL or a data: URI (never a path on the server)."}


def model_properties(spec: ModelSpec) -> Schema:
    """Every key a body may give this model: its parameters, then references it routes."""
    props = {p.name: param_schema(p) for p in spec.params}
    for key in REFERENCE_KEYS:
        if key not in props:
            routed = ({"type": "array", "items": _uri(), "minItems": 1}
                      if key in LIST_REFERENCE_KEYS else _uri())
            props[key] = {**routed, "description": "A reference this model cannot take: the "
                          "request is routed to a model that can (see `routed`)."}
    return props


def model_schema(spec: ModelSpec) -> Schema:
    """The component schema of one model's parameters (what /models describes)."""
    return {"type": "object", "title": spec.id, "description": spec.description,
            "properties": model_properties(spec), "additionalProperties": False,
            "required": [p.name for p in spec.params if p.required]}


def _model_name(spec: ModelSpec) -> Schema:
    return {"type": "string", "enum": [spec.id, spec.ref],
            "description": "Short id or full Replicate name."}


def options_properties() -> Schema:
    """The request options taken out of the body before validation (request_parsing)."""
    flags = {"async": "Answer 202 with the job at once (as `Prefer: respond-async`).",
             "dry_run": "Answer the cost and the models without calling Replicate.",
             "fallback": "Follow the model's fallback chain when it fails (default true).",
             "fallback_on_content_policy": "Fall back on content-policy failures too.",
             "placeholder": "Image models: write a black placeholder when every model failed."}
    props: Schema = {name: {"type": "boolean", "description": text} for name, text in
                     flags.items()}
    props["webhook"] = {"type": "string", "format": "uri",
                        "description": "POST the finished job here (Standard Webhooks)."}
    assert set(props) == set(OPTION_KEYS)  # noqa: S101 - a new option must be described
    return props


def generate_schema(spec: ModelSpec) -> Schema:
    props = {"model_name": _model_name(spec), **model_properties(spec),
             "custom_filename": {"type": "string", "minLength": 1, "maxLength": 200,
                                 "description": "A plain file name; the real extension wins."},
             **options_properties()}
    return {"type": "object", "title": f"generate {spec.id}", "properties": props,
            "required": ["model_name", "prompt"], "additionalProperties": False}


def batch_prompts_schema(spec: ModelSpec, max_items: int) -> Schema:
    own = model_properties(spec)
    prompt = own.pop("prompt")
    props = {"model_name": _model_name(spec),
             "prompts": {"type": "array", "items": prompt, "minItems": 1, "maxItems": max_items},
             "custom_filenames": {"type": "array", "items": {"type": "string", "minLength": 1},
                                  "description": "One per prompt, same length."},
             **own, **options_properties()}
    return {"type": "object", "title": f"batch of prompts for {spec.id}", "properties": props,
            "required": ["model_name", "prompts"], "additionalProperties": False}


def task_schema(spec: ModelSpec) -> Schema:
    props = {"model_name": _model_name(spec), **model_properties(spec),
             "custom_filename": {"type": "string", "minLength": 1, "maxLength": 200}}
    return {"type": "object", "title": f"task for {spec.id}", "properties": props,
            "required": ["model_name", "prompt"], "additionalProperties": False}


def _one_of_models(prefix: str, generic: bool = False) -> Schema:
    """One schema per curated model; with `generic` (MODEL_POLICY not curated) one more for any
    other `owner/name(:version)`, whose model_name no mapping can list (so no discriminator)."""
    mapping = {}
    for spec in MODELS.values():
        mapping[spec.id] = f"#/components/schemas/{prefix}_{spec.id}"
        mapping[spec.ref] = f"#/components/schemas/{prefix}_{spec.id}"
    one_of = [ref(f"{prefix}_{s.id}") for s in MODELS.values()]
    if generic:
        return {"oneOf": [*one_of, ref(f"{prefix}_other")]}
    return {"oneOf": one_of, "discriminator": {"propertyName": "model_name", "mapping": mapping}}


def other_model_schema(title: str, first: Schema) -> Schema:
    """A non-curated model's request: free-form parameters, checked against its own schema."""
    curated = sorted({name for s in MODELS.values() for name in (s.id, s.ref)})
    name = {"type": "string", "pattern": MODEL_NAME_PATTERN, "not": {"enum": curated},
            "description": "Any other Replicate model, `owner/name` or `owner/name:<version>`, "
                           "where MODEL_POLICY allows it. Its parameters are those of its own "
                           "schema (GET /models/{owner}/{name}); unknown ones are a 400."}
    return {"type": "object", "title": title, "properties": {"model_name": name, **first},
            "required": ["model_name"], "additionalProperties": True}


def batch_tasks_schema(max_items: int) -> Schema:
    return {"type": "object", "title": "batch of tasks",
            "description": "Mixed models. Other top-level keys are parameters shared by every "
                           "task (a task's own win); `prompt` belongs in each task.",
            "properties": {"tasks": {"type": "array", "items": ref("Task"), "minItems": 1,
                                     "maxItems": max_items},
                           **options_properties()},
            "required": ["tasks"], "additionalProperties": True}


# --------------------------------------------------------------------------- responses


def _primitives() -> tuple[Schema, Schema, Schema, Schema]:
    """New string, number, boolean and list-of-strings schemas, for one build of the document."""
    string = {"type": "string"}
    return string, {"type": "number"}, {"type": "boolean"}, {"type": "array", "items": string}


def response_schemas() -> dict[str, Schema]:
    """Components for what the service answers."""
    string, _, _, strings = _primitives()
    return {
        "Error": {"type": "object", "required": ["error"], "description": "The one error shape.",
                  "properties": {"error": string, "request_id": string, "field": string,
                                 "supported_models": strings, "error_type": string}},
        **_job_schemas(), **_result_schemas(), **_health_schemas(), **_admin_schemas(),
    }


def _job_schemas() -> dict[str, Schema]:
    """A job, its items, and a page of jobs."""
    string, _, boolean, strings = _primitives()
    item = {"type": "object", "properties": {
        "index": {"type": "integer"}, "state": {"enum": ITEM_STATES}, "success": boolean,
        "prompt": nullable("string"), "seed": nullable("integer"), "files": strings,
        "urls": strings, "count": {"type": "integer"}, "model_requested": string,
        "model_used": nullable("string"), "routed": nullable("string"), "notes": strings,
        "prediction_id": nullable("string"), "attempts": {"type": "array",
                                                          "items": {"type": "object"}},
        "cost_usd": nullable("number"), "placeholder": boolean,
        "error": nullable("string"), "error_type": nullable("string"),
        "queued_at": nullable("string"), "started_at": nullable("string"),
        "finished_at": nullable("string")}}
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    job = {"type": "object", "required": ["id", "object", "state"], "properties": {
        "id": string, "object": {"const": "job"}, "kind": {"enum": ["generate", "batch"]},
        "state": {"enum": JOB_STATES}, "status_url": string, "request_id": string,
        "output_id": string,
        "total": {"type": "integer"}, "counts": counts, "created_at": string,
        "started_at": nullable("string"), "finished_at": nullable("string"),
        "cancel_requested_at": nullable("string"), "cost_usd": nullable("number"),
        "webhook": {"type": "object"}, "items": {"type": "array", "items": ref("JobItem")}}}
    return {
        "JobItem": item, "Job": job,
        "JobList": {"type": "object", "required": ["object", "data", "has_more"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": ref("Job")},
            "has_more": boolean, "next": nullable("string")}},
    }


def _result_schemas() -> dict[str, Schema]:
    """What /generate and /generate-batch answer, and a dry run's estimate."""
    string, number, boolean, strings = _primitives()
    return {
        "GenerateResult": {"type": "object", "required": ["success", "results"], "properties": {
            "success": boolean, "model_name": string, "files": strings, "urls": strings,
            "request_id": string, "output_id": string, "job_id": string,
            "cost_usd": nullable("number"),
            "results": {"type": "array", "items": ref("JobItem")}}},
        "BatchResult": {"type": "object", "required": ["success", "results"], "properties": {
            "success": boolean, "total_prompts": {"type": "integer"},
            "successful_count": {"type": "integer"}, "failed_count": {"type": "integer"},
            "request_id": string, "output_id": string, "job_id": string,
            "successful_results": {"type": "array", "items": {"type": "object"}},
            "failed_results": {"type": "array", "items": {"type": "object"}},
            "cost_usd": number, "results": {"type": "array", "items": ref("JobItem")}}},
        "Estimate": {"type": "object", "required": ["dry_run", "estimated_cost_usd"],
                     "properties": {"dry_run": {"const": True}, "estimated_cost_usd": number,
                                    "total_items": {"type": "integer"}, "models": strings,
                                    "items": {"type": "array", "items": {"type": "object"}}}},
    }


def _health_schemas() -> dict[str, Schema]:
    """The account's limits, and what /health, /ready and /status answer."""
    string, _, _, strings = _primitives()
    return {
        "Limits": {"type": "object", "properties": {
            name: {"type": "integer"} for name in ("concurrent_limit", "requests_per_minute",
                                                    "burst", "polls_per_minute")}},
        "Dependency": {"type": "object", "required": ["backend", "status"], "properties": {
            "backend": {"enum": ["sqlite", "redis", "postgresql"]}, "status": string}},
        "Health": {"type": "object", "required": ["status", "dependencies"], "properties": {
            "status": {"enum": ["healthy", "degraded"]}, "service": string, "version": string,
            "supported_models": strings,
            "dependencies": {"type": "object", "properties": {
                "limits": ref("Dependency"), "jobs": ref("Dependency")}},
            "concurrency_status": {"oneOf": [ref("Limits"), {"type": "null"}]}}},
        "Ready": {"type": "object", "required": ["status", "checks"], "properties": {
            "status": {"enum": ["ready", "not_ready"]}, "error": string, "request_id": string,
            "checks": {"type": "object", "additionalProperties": string}}},
        "Status": {"type": "object", "required": ["limits", "totals"], "properties": {
            "limits": ref("Limits"), "totals": {"type": "object"},
            "backends": {"type": "object", "additionalProperties": string},
            "limit_sources": {"type": "object"}, "accounts": {"type": "array"}}},
    }


def _admin_schemas() -> dict[str, Schema]:
    """The model list and details, changing the limits, and the webhook secret."""
    string, _, boolean, strings = _primitives()
    return {
        "Models": {"type": "object", "required": ["models"], "properties": {
            "supported_models": strings, "model_count": {"type": "integer"},
            "models": {"type": "object"}}},
        "Configuration": {"type": "object", "required": ["success"], "properties": {
            "success": boolean, "message": string, "new_settings": ref("Limits"),
            "limit_sources": {"type": "object"}}},
        "ConfigureRequest": {"type": "object", "minProperties": 1, "additionalProperties": False,
                             "properties": {name: nullable("integer", minimum=1) for name in (
                                 "concurrent_limit", "requests_per_minute", "burst",
                                 "polls_per_minute")}},
        "ModelDetail": {"type": "object", "required": ["id", "parameters"], "properties": {
            "id": string, "replicate_model": string, "parameters": {"type": "object"}}},
        "WebhookSecret": {"type": "object", "required": ["secret"], "properties": {
            "secret": string, "scheme": string}},
    }


# --------------------------------------------------------------------------- operations

REQUEST_ID_PARAM = {"name": REQUEST_ID_HEADER, "in": "header", "required": False,
                    "description": "Your id for this request (1-128 of [A-Za-z0-9._:-]); "
                                   "anything else is replaced by a new one.",
                    "schema": {"type": "string"}}
ASYNC_PARAMS = [
    {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "`respond-async`: answer 202 with the job at once."},
    {"name": "Idempotency-Key", "in": "header", "required": False,
     "schema": {"type": "string"}, "description": "1-255 printable ASCII characters."},
]
Security = list[dict[str, list[str]]]
ANY_KEY: Security = [{"AdminKey": []}, {"ReplicateKey": []}]
ADMIN_ONLY: Security = [{"AdminKey": []}]
OPTIONAL_KEY: Security = [{}, {"AdminKey": []}, {"ReplicateKey": []}]
GENERATE_ERRORS = (400, 401, 413, 415, 422, 429, 502, 503, 504, 507)

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
        "responses": {200: "ModelDetail", 400: "Error", 401: "Error", 502: "Error",
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
        "example": {"model_name": "flux-dev", "prompt": "A serene mountain landscape at sunset",
                    "aspect_ratio": "16:9", "output_format": "jpg"},
        "responses": {200: ["GenerateResult", "Estimate"], 202: "Job",
                      **dict.fromkeys(GENERATE_ERRORS, "Error")}},
    ("api.generate_batch", "POST"): {
        "summary": "Generate many prompts in parallel, results in input order",
        "security": ANY_KEY, "body": ref("GenerateBatchRequest"), "params": ASYNC_PARAMS,
        "example": {"model_name": "flux-dev", "prompts": ["A red sports car", "A blue ocean wave"],
                    "custom_filenames": ["car", "wave"], "aspect_ratio": "16:9"},
        "job": True, "responses": {200: ["BatchResult", "Estimate"], 202: "Job",
                                   **dict.fromkeys(GENERATE_ERRORS, "Error")}},
    ("api.list_jobs", "GET"): {
        "summary": "Your jobs, newest first", "security": ANY_KEY,
        "params": [{"name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                   {"name": "after", "in": "query", "required": False,
                    "schema": {"type": "string"}}],
        "responses": {200: "JobList", 400: "Error", 401: "Error", 404: "Error", 503: "Error"}},
    ("api.get_job", "GET"): {"summary": "A job and its items", "security": ANY_KEY,
                             "responses": {200: "Job", 401: "Error", 404: "Error", 503: "Error"}},
    ("api.cancel_job", "POST"): {"summary": "Cancel a job", "security": ANY_KEY,
                                 "responses": {200: "Job", 401: "Error", 404: "Error",
                                               503: "Error"}},
    ("api.get_file", "GET"): {
        "summary": "Download an output (Range supported)", "security": ANY_KEY,
        "params": [{"name": "Range", "in": "header", "required": False,
                    "schema": {"type": "string"}}],
        "responses": {200: "file", 206: "file", 304: None, 401: "Error", 404: "Error",
                      416: "Error", 503: "Error"}},
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
                           "security": [], "responses": {200: "Ready", 503: "Ready"}},
    ("ops.metrics_view", "GET"): {"summary": "Prometheus metrics", "security": "metrics",
                             "responses": {200: "metrics", 401: "Error", 403: "Error"}},
    ("extras.job_archive", "GET"): {
        "summary": "Every file of a job, in input order, as one zip", "security": ANY_KEY,
        "responses": {200: "zip", 401: "Error", 404: "Error", 503: "Error"}},
    ("extras.retry_job", "POST"): {
        "summary": "Retry a job's failed items as a new job (same models and parameters, "
                   "checked again against the model policy and schemas in force)",
        "security": ANY_KEY, "job": True,
        "responses": {202: "Job", 400: "Error", 401: "Error", 404: "Error", 409: "Error",
                      413: "Error", 429: "Error", 502: "Error", 503: "Error"}},
    # The browser console (README, "Console"): HTML pages and a session cookie, not a key.
    ("console.index", "GET"): {"summary": "The console (or its sign-in page)", "security": [],
                               "responses": {200: "html"}},
    ("console.job_page", "GET"): {"summary": "The console's page for one job", "security": [],
                                  "responses": {200: "html"}},
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
                              "security": [], "responses": {200: "proxied", 202: "Job",
                                                            401: "Error", 403: "Error",
                                                            404: "Error"}},
}
COMMON_ERRORS = (404, 405, 500)


def _path_of(rule: str) -> tuple[str, list[str]]:
    """Flask's `/jobs/<job_id>` as OpenAPI's `/jobs/{job_id}`, with its parameter names."""
    names = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), names


def _content(kind: str | list[str] | None) -> Schema | None:
    if kind is None:
        return None
    if isinstance(kind, list):
        return {"application/json": {"schema": {"anyOf": [ref(k) for k in kind]}}}
    files: Schema = {mime: {} for mime in ("application/octet-stream", "image/*", "video/*",
                                            "audio/*")}
    special: dict[str, Schema] = {
               "file": files, "html": {"text/html": {"schema": {"type": "string"}}},
               "metrics": {"text/plain": {"schema": {"type": "string"}}},
               "openapi": {"application/json": {"schema": {"type": "object"}}},
               "asset": {mime: {} for mime in sorted(set(DOCS_ASSETS.values()))},
               "zip": {"application/zip": {}},
               "text": {"text/plain": {"schema": {"type": "string"}}},
               "console_asset": {"text/css": {}, "text/javascript": {}},
               "proxied": {"application/json": {}, "application/zip": {}, **files}}
    if kind in special:
        return special[kind]
    return {"application/json": {"schema": ref(kind)}}


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
    return {200: "OK", 202: "Accepted: the job runs", 206: "Partial content",
            304: "Not modified", 400: "Bad input (`field` names it)", 401: "No valid key",
            403: "Not allowed with this key", 404: "Not found", 405: "Wrong method",
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
    params = [{"name": name, "in": "path", "required": True, "schema": _path_schema(name)}
              for name in path_params]
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
        if "example" in operation:  # else /docs builds one from the oneOf, mixing every model
            media["example"] = operation["example"]
        out["requestBody"] = {"required": True, "content": {"application/json": media}}
    return out


def _path_schema(name: str) -> Schema:
    if name == "name":
        return {"type": "string", "enum": sorted(DOCS_ASSETS)}
    return {"type": "string", "minLength": 1}


def _rules(app: Flask) -> Iterator[tuple[str, str, str]]:
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule.rule, rule.endpoint, method


def paths(app: Flask, settings: Settings) -> Schema:
    """Every route of the app; a route OPERATIONS does not describe is an error."""
    out: Schema = {}
    for rule, endpoint, method in _rules(app):
        operation = OPERATIONS.get((endpoint, method))
        if operation is None:
            raise KeyError(f"{method} {rule} ({endpoint}) has no OpenAPI description")
        path, names = _path_of(rule)
        out.setdefault(path, {})[method.lower()] = _operation(endpoint, method, names,
                                                              operation, settings)
    return out


def components(settings: Settings) -> Schema:
    schemas: Schema = {f"Model_{s.id}": model_schema(s) for s in MODELS.values()}
    for spec in MODELS.values():
        schemas[f"Generate_{spec.id}"] = generate_schema(spec)
        schemas[f"BatchPrompts_{spec.id}"] = batch_prompts_schema(spec, settings.max_batch_size)
        schemas[f"Task_{spec.id}"] = task_schema(spec)
    generic = settings.model_policy.mode != "curated"
    if generic:
        schemas["Generate_other"] = other_model_schema("generate any other model",
                                                       options_properties())
        schemas["BatchPrompts_other"] = other_model_schema(
            "batch of prompts for any other model", {"prompts": {
                "type": "array", "items": {"type": "string"}, "minItems": 1,
                "maxItems": settings.max_batch_size}, **options_properties()})
        schemas["Task_other"] = other_model_schema("task for any other model", {})
    schemas["GenerateRequest"] = _one_of_models("Generate", generic)
    schemas["BatchPromptsRequest"] = _one_of_models("BatchPrompts", generic)
    schemas["Task"] = _one_of_models("Task", generic)
    schemas["BatchTasksRequest"] = batch_tasks_schema(settings.max_batch_size)
    schemas["GenerateBatchRequest"] = {"oneOf": [ref("BatchPromptsRequest"),
                                                 ref("BatchTasksRequest")]}
    schemas.update(response_schemas())
    return {"schemas": schemas, "securitySchemes": {
        "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key",
                     "description": "Internal services; the server's Replicate token pays."},
        "ReplicateKey": {"type": "apiKey", "in": "header", "name": "X-Replicate-API-Key",
                         "description": "Your own Replicate token pays, for this request only."},
        "MetricsToken": {"type": "http", "scheme": "bearer",
                         "description": "METRICS_TOKEN, when METRICS_ACCESS=token."}}}


def build_spec(app: Flask, settings: Settings, version: str) -> Schema:
    """The whole OpenAPI 3.1 document for this app and its settings."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Replicate Concurrent Generation API", "version": version,
                 "description": "Generate images, videos and audio with Replicate models "
                                "within each account's limits. Every error answers "
                                "`{\"error\": ..., \"request_id\": ...}`."},
        "paths": paths(app, settings),
        "components": components(settings),
    }
