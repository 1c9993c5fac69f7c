"""Turning a request into a job: /generate and /generate-batch (idempotency key, webhook policy,
answer at once or wait for the results) and /jobs/<id>/retry (the failed items as a new job,
checked again against the model policy and schemas in force)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flask import g, jsonify, request

from replicate_generation.errors import IdempotencyConflict, InvalidRequest
from replicate_generation.generation import Task
from replicate_generation.http import context
from replicate_generation.http.auth import budgets_of, other_models, paying_token
from replicate_generation.http.errors import Answer, ApiError
from replicate_generation.http.files import signed_items
from replicate_generation.jobs import webhooks
from replicate_generation.jobs.bodies import item_body, job_body
from replicate_generation.jobs.rows import ItemRow, JobRow
from replicate_generation.jobs.runner import JobRunner, Submission
from replicate_generation.models import schemas
from replicate_generation.models.validation import resolve_model
from replicate_generation.request_parsing import Parsed, estimate, request_hash

IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# The finished job's body as the route shows it, with its status code.
Shape = Callable[[JobRow, list[dict[str, Any]]], tuple[dict[str, Any], int]]


def submit(kind: str, body: dict[str, Any], parsed: Parsed, shape: Shape) -> Answer:
    """Run a parsed request as a job: 202 with the job when async, else wait and answer."""
    # A malformed Idempotency-Key or webhook is a 400 for a dry run too.
    idempotency_key, webhook_url = _idempotency_key(), _webhook_target(parsed.options.webhook)
    if parsed.options.dry_run:
        prices = context.generator().runtime.prices
        return jsonify(estimate(parsed.tasks, prices)), 200, {}
    accepted_at = time.time()  # deadline_seconds counts from here, for every item
    token = paying_token(g.caller)
    asynchronous = parsed.options.run_async or _prefers_async()
    submission = Submission(
        kind=kind, tasks=key_tasks(parsed.tasks), idempotency_key=idempotency_key,
        request_hash=request_hash(request.path, body), webhook_url=webhook_url,
        webhook_private=g.caller.admin, key_id=_key_id(), caller=g.caller.name,
        budgets=budgets_of(g.caller, context.settings()),
        interactive=(parsed.options.priority or ("batch" if asynchronous else "interactive"))
        == "interactive", start_deadline=_start_deadline(parsed, accepted_at))
    runner = context.runner()
    try:
        job, created = runner.submit(token, submission)
    except IdempotencyConflict:
        raise ApiError(422, "This Idempotency-Key was already used with a different request "
                       "body", field="Idempotency-Key") from None
    headers = {"Location": f"/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    if asynchronous:
        headers["Preference-Applied"] = "respond-async"
        return jsonify(job_body(job)), 202, headers
    return _when_done(runner, job, shape, headers)


def _start_deadline(parsed: Parsed, accepted_at: float) -> float | None:
    """When, in wall-clock seconds, the request's items may no longer be created."""
    seconds = parsed.options.deadline_seconds
    return None if seconds is None else accepted_at + seconds


def _when_done(runner: JobRunner, job: JobRow, shape: Shape, headers: dict[str, str]) -> Answer:
    finished = runner.wait(job.id)
    if finished is None:  # removed by retention while we waited: cannot happen in practice
        raise ApiError(404, "Job not found")
    items = signed_items([item_body(i, runner.settings.output_dir)
                          for i in runner.store.items(job.id)], runner.generator.storage)
    payload, status = shape(finished, items)
    return jsonify(payload), status, headers


def retry(job: JobRow) -> Answer:
    """A new job with the job's failed items, same models and parameters: 202 with it. Each is
    checked again against MODEL_POLICY and its model's schema as they are now."""
    runner = context.runner()
    # Expired items too: the retry is asked for now, and runs without a start deadline.
    failed = [item for item in runner.store.items(job.id) if item.state in ("failed", "expired")]
    if not failed:
        raise ApiError(409, "This job has no failed or expired item to retry")
    with other_models():
        tasks = [_revalidated(index, item) for index, item in enumerate(failed)]
    new_job, _ = runner.submit(paying_token(g.caller), Submission(
        kind=job.kind, tasks=key_tasks(tasks), key_id=_key_id(), caller=g.caller.name,
        budgets=budgets_of(g.caller, context.settings())))
    body = job_body(new_job)
    body["retry_of"] = job.id
    return jsonify(body), 202, {"Location": f"/jobs/{new_job.id}"}


def key_tasks(tasks: list[Task]) -> list[Task]:
    """The tasks as the caller's issued key may run them: 403 for a model it may not run,
    fallbacks to such models left out."""
    key = g.caller.key
    if key is None or key.models is None:
        return tasks
    allowed = key.models
    for task in tasks:
        if not _key_allows(allowed, task.spec.id, task.spec.ref):
            raise ApiError(403, f"This API key may not run {task.spec.id}; it may run: "
                           f"{', '.join(allowed)}", field="model_name",
                           error_type="model_not_allowed")
    return [replace(task, chain=tuple(m for m in task.chain if _key_allows(allowed, m.id, m.ref)))
            for task in tasks]


def _key_allows(allowed: tuple[str, ...], model_id: str, ref: str) -> bool:
    """By curated name, owner/name, or a pinned owner/name:version."""
    unpinned = model_id.split(":", 1)[0]
    return any(name in allowed for name in (model_id, ref, unpinned))


def _key_id() -> str | None:
    return g.caller.key.id if g.caller.key is not None else None


def _revalidated(index: int, item: ItemRow) -> Task:
    """The failed item as a task again; InvalidRequest naming `items[<i>]...` when the policy
    in force refuses its model now, or the model's schema its input."""
    task = Task.from_record(index, item.spec)
    if not task.spec.curated:  # a chain holds curated models only: the policy always allows them
        where = f"items[{item.index}]."
        spec = resolve_model(task.spec.id, f"{where}model_name")
        if not isinstance(spec, schemas.SchemaModel) or spec.schema is None:
            raise InvalidRequest(f"{where}model_name", f"Model '{task.spec.id}' is no longer "
                                 "accepted here (MODEL_POLICY)")
        schemas.check_input(spec.schema, task.input, where, spec.id)
    return task


def _prefers_async() -> bool:
    prefer = request.headers.get("Prefer", "")
    return any(p.strip().lower().startswith("respond-async") for p in prefer.split(","))


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters",
                       field="Idempotency-Key")
    return key


def _webhook_target(url: str | None) -> str | None:
    """Check a webhook URL against the policy for this caller (see docs/webhooks.md)."""
    if url is None:
        return None
    if not context.settings().webhook_signing_key:
        raise InvalidRequest("webhook", "Webhooks are not enabled on this server "
                             "(WEBHOOK_SIGNING_KEY is not set)")
    return webhooks.check_target(url, allow_private=g.caller.admin,
                                 allowed=context.settings().egress_allow_private)
