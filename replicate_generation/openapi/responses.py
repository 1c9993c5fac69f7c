"""What the service answers: the one error shape, jobs and their items, results, estimates,
health, readiness, status, models and the admin routes' bodies."""

from __future__ import annotations

from replicate_generation.http.limit_fields import LIMIT_FIELDS
from replicate_generation.jobs.rows import ITEM_STATES
from replicate_generation.openapi.common import Schema, answer, nullable, ref

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
    item = answer({
        "index": {"type": "integer"}, "state": {"enum": list(ITEM_STATES)}, "success": boolean,
        "prompt": nullable("string"), "name": nullable("string"),
        "seed": nullable("integer"), "files": strings,
        "urls": strings, "count": {"type": "integer"}, "model_requested": string,
        "model_used": nullable("string"), "routed": nullable("string"), "notes": strings,
        "prediction_id": nullable("string"),
        "attempts": {"type": "array", "items": ref("Attempt")},
        "cost_usd": nullable("number"), "placeholder": boolean,
        "error": nullable("string"), "error_type": nullable("string"),
        "queued_at": nullable("string"), "started_at": nullable("string"),
        "finished_at": nullable("string")})
    # What every job body shows (jobs/bodies.py); `webhook` only when one was given.
    summary: Schema = {
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
        "GenerateResult": answer({
            "success": boolean, "model_name": string, "model_used": nullable("string"),
            "prompt": nullable("string"), "files": strings, "urls": strings,
            "count": {"type": "integer"}, "prediction_id": nullable("string"),
            "request_id": string, "output_id": string, "job_id": string,
            "cost_usd": nullable("number"),
            "results": {"type": "array", "items": ref("JobItem")}}),
        "BatchResult": answer({
            "success": boolean,
            "model_name": {"oneOf": [string, strings],
                           "description": "The model, or every model of a batch of tasks."},
            "request_id": string, "output_id": string, "job_id": string,
            "state": {"enum": JOB_STATES}, "total_prompts": {"type": "integer"},
            "successful_count": {"type": "integer"}, "failed_count": {"type": "integer"},
            "successful_results": {"type": "array", "items": ref("BatchSuccess")},
            "failed_results": {"type": "array", "items": ref("BatchFailure")},
            "cost_usd": number, "results": {"type": "array", "items": ref("JobItem")}}),
        "BatchSuccess": answer({"prompt_index": {"type": "integer"}, "files": strings,
                                "urls": strings, "prompt": nullable("string"),
                                "count": {"type": "integer"}}),
        "BatchFailure": answer({"prompt_index": {"type": "integer"}, "prompt": nullable("string"),
                                "error": nullable("string"), "error_type": nullable("string")}),
        "Estimate": answer({
            "dry_run": {"const": True}, "estimated_cost_usd": nullable("number"),
            "total_items": {"type": "integer"}, "models": strings,
            "items": {"type": "array", "items": ref("EstimateItem")},
            "cost_usd": {"type": "null"}, "cost_note": string}, ("cost_usd", "cost_note"),
            description="With a non-curated model the cost is unknown: null, and `cost_note` "
                        "says why."),
        "EstimateItem": answer({
            "index": {"type": "integer"}, "model_requested": string, "model": string,
            "routed": nullable("string"), "notes": strings, "fallback_chain": strings,
            "estimated_cost_usd": nullable("number"),
            "max_cost_usd_with_fallbacks": nullable("number")}),
    }


def _health_schemas() -> dict[str, Schema]:
    """The account's limits, and what /health, /ready and /status answer."""
    string, _, boolean, strings = _primitives()
    integer = {"type": "integer"}
    ready = {"type": "object", "required": ["status", "checks"], "properties": {
        "status": {"enum": ["ready", "not_ready"]}, "error": string, "request_id": string,
        "checks": {"type": "object", "additionalProperties": string}}}
    return {
        "Limits": answer({name: {"type": "integer"} for name in LIMIT_FIELDS}),
        "LimitSources": answer({name: ref("LimitSource") for name in LIMIT_FIELDS},
                               description="Where each limit in force comes from."),
        "LimitSource": answer({
            "value": integer, "source": string, "set_at": nullable("string"),
            "declared": answer({"min": nullable("integer"), "max": nullable("integer"),
                                "processes": integer})}),
        "Dependency": {"type": "object", "required": ["backend", "status"], "properties": {
            "backend": {"enum": ["sqlite", "redis", "postgresql"]}, "status": string}},
        "Health": answer({
            "status": {"enum": ["healthy", "degraded"]}, "service": string, "version": string,
            "supported_models": strings,
            "dependencies": answer({
                "limits": ref("Dependency"), "jobs": ref("Dependency"),
                "outputs": answer({"backend": {"enum": ["disk", "s3"]}, "status": string,
                                   "location": string})}),
            "concurrency_status": {"oneOf": [ref("Limits"), {"type": "null"}]},
            "admin_key_configured": boolean, "server_token_configured": boolean}),
        "Ready": ready,
        # The 503 is an error, so it says what went wrong in `error`, as every error does.
        "NotReady": {**ready, "required": ["status", "checks", "error"]},
        **_status_schemas(),
    }


def _status_schemas() -> dict[str, Schema]:
    """What /status answers: the limits, their sources, totals and the accounts it may show."""
    string, number, boolean, _ = _primitives()
    integer = {"type": "integer"}
    return {
        "Status": answer({
            "service": string, "version": string,
            "backends": {"type": "object", "additionalProperties": string},
            "limits": ref("Limits"), "limit_sources": ref("LimitSources"),
            "admin_api_configured": boolean, "default_replicate_key_configured": boolean,
            "totals": answer({name: integer for name in ("in_flight", "waiting",
                                                         "creates_last_minute",
                                                         "queued_in_this_process")}),
            "accounts": {"type": "array", "items": ref("AccountStatus")},
            # The admin's only: what this process keeps in memory.
            "process": {"type": "object", "additionalProperties": integer},
            "schema_cache": {"type": "object", "additionalProperties": integer}},
            ("process", "schema_cache")),
        "AccountStatus": answer({
            "account": string, "in_flight": integer, "waiting": integer,
            "creates_last_minute": integer, "backoff_remaining": number,
            "queued_in_this_process": integer}),
    }


def _admin_schemas() -> dict[str, Schema]:
    """The model list and details, the limits as changed, and the webhook secret."""
    string, _, boolean, strings = _primitives()
    return {
        "Models": answer({
            "supported_models": strings, "model_count": {"type": "integer"},
            "models": {"type": "object", "additionalProperties": ref("ModelDetail")}}),
        "Configuration": answer({
            "success": boolean, "message": string, "new_settings": ref("Limits"),
            "limit_sources": ref("LimitSources")}),
        "ModelDetail": answer({
            "id": string, "replicate_model": string, "kind": string,
            "description": nullable("string"),
            "price": answer({"usd": nullable("number"), "per": nullable("string")}),
            "reference_input": {"oneOf": [ref("ReferenceInput"), {"type": "null"}]},
            "parameters": {"type": "object", "additionalProperties": ref("Parameter")}}),
        "ReferenceInput": answer({"key": string, "media": nullable("string"),
                                  "max_items": {"type": "integer"}}),
        "Parameter": answer({
            "type": string, "description": nullable("string"), "required": boolean,
            "default": {"description": "Any JSON value; null: none."},
            "choices": {"type": "array", "items": {}}, "minimum": {"type": "number"},
            "maximum": {"type": "number"}, "max_length": {"type": "integer"},
            "max_items": {"type": "integer"}},
            ("choices", "minimum", "maximum", "max_length", "max_items")),
        "WebhookSecret": answer({"secret": string, "scheme": string}),
    }

