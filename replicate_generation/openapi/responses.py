"""What the service answers: the one error shape, jobs and their items, results, estimates,
health, readiness, status, models and the admin routes' bodies."""

from __future__ import annotations

from replicate_generation.jobs.rows import ITEM_STATES
from replicate_generation.openapi.common import Schema, nullable, ref

JOB_STATES = ["queued", "running", "cancel_requested", "succeeded", "partially_failed", "failed",
              "canceled"]


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
        "index": {"type": "integer"}, "state": {"enum": list(ITEM_STATES)}, "success": boolean,
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
        "total": {"type": "integer"}, "counts": ref("JobCounts"), "created_at": string,
        "started_at": nullable("string"), "finished_at": nullable("string"),
        "cancel_requested_at": nullable("string"), "cost_usd": nullable("number"),
        "webhook": ref("JobWebhook"),
        "retry_of": {"type": "string", "description": "The job a retry was made from."}}
    optional = ("webhook", "retry_of")
    job = answer({**summary, "items": {"type": "array", "items": ref("JobItem")},
                  "items_has_more": boolean, "items_next": nullable("string")}, optional,
                 description="A job with its first items; `items_next` pages on.")
    return {
        "JobItem": item, **_job_parts(),
        "JobSummary": answer(summary, optional, description="A job without its items (as "
                             "submitted, and in lists): GET /jobs/{job_id} shows them."),
        "Job": job,
        "JobItemList": answer({
            "object": {"const": "list"}, "job_id": string,
            "data": {"type": "array", "items": ref("JobItem")}, "has_more": boolean,
            "next_cursor": nullable("string"), "next": nullable("string")}),
        "JobList": answer({
            "object": {"const": "list"}, "data": {"type": "array", "items": ref("JobSummary")},
            "has_more": boolean, "next": nullable("string")}),
    }


def _job_parts() -> dict[str, Schema]:
    """An item's attempt, a job's counts by item state, and its webhook's delivery."""
    string = {"type": "string"}
    return {
        "Attempt": answer({name: nullable("string") for name in ("model", "prediction_id",
                                                                  "status", "error")}),
        "JobCounts": answer({state: {"type": "integer"} for state in ITEM_STATES},
                            description="How many items are in each state."),
        "JobWebhook": answer({"url": string, "state": nullable("string"),
                              "attempts": {"type": "integer"}, "error": nullable("string")}),
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
    ready = {"type": "object", "required": ["status", "checks"], "properties": {
        "status": {"enum": ["ready", "not_ready"]}, "error": string, "request_id": string,
        "checks": {"type": "object", "additionalProperties": string}}}
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
        "Ready": ready,
        # The 503 is an error, so it says what went wrong in `error`, as every error does.
        "NotReady": {**ready, "required": ["status", "checks", "error"]},
        "Status": {"type": "object", "required": ["limits", "totals"], "properties": {
            "limits": ref("Limits"), "totals": {"type": "object"},
            "backends": {"type": "object", "additionalProperties": string},
            "limit_sources": {"type": "object"}, "accounts": {"type": "array"}}},
    }


def _admin_schemas() -> dict[str, Schema]:
    """The model list and details, the limits as changed, and the webhook secret."""
    string, _, boolean, strings = _primitives()
    return {
        "Models": {"type": "object", "required": ["models"], "properties": {
            "supported_models": strings, "model_count": {"type": "integer"},
            "models": {"type": "object"}}},
        "Configuration": {"type": "object", "required": ["success"], "properties": {
            "success": boolean, "message": string, "new_settings": ref("Limits"),
            "limit_sources": {"type": "object"}}},
        "ModelDetail": {"type": "object", "required": ["id", "parameters"], "properties": {
            "id": string, "replicate_model": string, "parameters": {"type": "object"}}},
        "WebhookSecret": {"type": "object", "required": ["secret"], "properties": {
            "secret": string, "scheme": string}},
    }

