"""The JSON API: `create_app` builds the service (served as `app:create_app()`), and each route
below is a thin view; auth, request reading, the error shape and the bodies live in `http/`."""

from __future__ import annotations

import atexit
import logging

from flask import Blueprint, Flask, Response, g, jsonify, request
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation import observability, ops, web
from replicate_generation.backends import wait_for_backends
from replicate_generation.errors import InvalidRequest
from replicate_generation.http import context, errors, events, files, responses, submission
from replicate_generation.http.auth import (
    account_of,
    has_key,
    may_see,
    other_models,
    owned_job,
    require_key,
    resolve_caller,
)
from replicate_generation.http.errors import Answer, ApiError
from replicate_generation.http.inputs import int_arg, json_object
from replicate_generation.http.keys import audit, keys_bp
from replicate_generation.http.limit_fields import overrides_from
from replicate_generation.http.logs import configure_logging
from replicate_generation.http.usage import usage_bp
from replicate_generation.jobs.notifier import webhook_scope, webhook_secret
from replicate_generation.jobs.rows import ITEM_STATES
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.models import schema_fetch
from replicate_generation.models.catalogue import MODELS
from replicate_generation.models.validation import resolve_model
from replicate_generation.request_parsing import parse_batch, parse_single
from replicate_generation.settings import Settings, read_environ

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)
# An item cursor is an item's index: past any job's size, a page is simply empty.
MAX_ITEM_INDEX = 10**9
# Registered after the operator routes, so that /openapi.json lists the paths as it always has.
extras = Blueprint("extras", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; with no settings, read them from the environment and `.env`."""
    if settings is None:
        settings = Settings.from_env(read_environ(export=True))
    configure_logging(settings)
    observability.install_logging(settings.log_format)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    wait_for_backends(settings)
    schema_fetch.CACHE.resize(settings.schema_cache_max_bytes)
    runner = JobRunner(settings)
    context.install(app, settings, runner)
    # gunicorn's worker_exit hook closes it first; this covers every other way of serving.
    atexit.register(runner.close)
    app.register_blueprint(bp)
    ops.register(app, responses.VERSION)
    app.register_blueprint(extras)
    app.register_blueprint(keys_bp)
    app.register_blueprint(usage_bp)
    events.register(app, settings)
    web.register(app, settings)
    observability.init_app(app)
    errors.register(app)
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is closed")
    return app


# --------------------------------------------------------------------------- service and models


@bp.get("/health")
def health() -> Response:
    """Report liveness, each backend and the limits in force; never waits on a limiter."""
    return jsonify(responses.health(context.settings(), context.runner()))


@bp.get("/status")
def status() -> Response:
    """Live figures: everyone sees totals, a user their own account, the admin every account."""
    settings = context.settings()
    caller = resolve_caller(settings) if has_key() else None
    return jsonify(responses.status(caller, settings, context.runner()))


@bp.get("/models")
def models() -> Response:
    """List every model with its parameters, types, allowed values and defaults."""
    return jsonify(supported_models=sorted(MODELS), model_count=len(MODELS),
                   models={spec.id: spec.describe() for spec in MODELS.values()})


@bp.get("/models/<owner>/<name>")
def model_detail(owner: str, name: str) -> Response:
    """One model's parameters: the catalogue's, or (where MODEL_POLICY allows) its own schema's."""
    ref = f"{owner}/{name}"
    curated = next((s for s in MODELS.values() if ref in (s.ref, s.id)), None)
    if curated is not None:
        return jsonify(curated.describe())
    g.caller = resolve_caller(context.settings())
    try:
        with other_models():
            return jsonify(resolve_model(ref).describe())
    except InvalidRequest as exc:  # no model at this path for this caller: not a bad request
        missing = ApiError(404, str(exc))
        missing.extra = dict(exc.extra)  # supported_models
        raise missing from None


# --------------------------------------------------------------------------- limits


@bp.post("/configure")
@require_key("admin")
def configure() -> Response:
    """Override the given limits (null clears one) for every process, across restarts."""
    changes = overrides_from(json_object())
    manager = context.generator().manager
    manager.configure_fields(changes)
    log.info("limit overrides changed: %s", changes)
    audit("limits.configured", None, dict(changes))
    return jsonify(responses.configuration(manager, "Concurrency settings updated"))


@bp.delete("/configure")
@require_key("admin")
def clear_configuration() -> Response:
    """Drop every /configure override: the environment's limits apply again."""
    manager = context.generator().manager
    manager.clear_configuration()
    log.info("limit overrides cleared")
    audit("limits.cleared", None, {})
    return jsonify(responses.configuration(
        manager, "Overrides cleared; the environment's limits apply"))


# --------------------------------------------------------------------------- generating


@bp.post("/generate")
@require_key()
def generate() -> Answer:
    """Generate one prompt's outputs: wait for them, or (async) return the job at once."""
    body = json_object()
    with other_models():
        parsed = parse_single(body, context.chains())
    return submission.submit("generate", body, parsed, responses.single_result)


@bp.post("/generate-batch")
@require_key()
def generate_batch() -> Answer:
    """Generate many prompts in parallel; results come back in input order."""
    body = json_object()
    with other_models():
        parsed = parse_batch(body, context.settings().max_batch_size, context.chains())
    return submission.submit("batch", body, parsed, responses.batch_result)


# --------------------------------------------------------------------------- jobs and files


@bp.get("/jobs")
@require_key()
def list_jobs() -> Response:
    """The caller's jobs (every job for the admin key), newest first, a page at a time."""
    limit = int_arg("limit", 20, 1, 100)
    after = request.args.get("after")
    cursor = None
    if after:
        last = owned_job(after)
        cursor = (last.created_at, last.id)
    account = None if g.caller.admin else g.caller.account
    key_id = g.caller.key.id if g.caller.key is not None else None
    jobs = context.runner().store.list_jobs(account, limit + 1, cursor, key_id=key_id)
    return jsonify(responses.job_page(jobs, limit))


@bp.get("/jobs/<job_id>")
@require_key()
def get_job(job_id: str) -> Response:
    """A job's state, counts, cost and timestamps, and its first items (the rest: its pages)."""
    return jsonify(responses.job_summary(context.runner(), owned_job(job_id)))


@bp.post("/jobs/<job_id>/cancel")
@require_key()
def cancel_job(job_id: str) -> Response:
    """Drop queued items, cancel running predictions on Replicate, keep finished results."""
    job = owned_job(job_id)
    runner = context.runner()
    updated = runner.cancel(job.id) or job
    if g.caller.admin:
        audit("job.canceled", job.id, {"account": job.account[:12]})
    return jsonify(responses.job_summary(runner, updated))


@bp.get("/files/<path:relative>")
@require_key()
def get_file(relative: str) -> WerkzeugResponse:
    """An output, to the account whose job wrote it: streamed (ranges and content type where
    it is on this disk) or, with OUTPUT_SERVING=signed, a redirect to a signed bucket URL."""
    if "\x00" in relative:  # no file name holds one, and the OS refuses it with a ValueError
        raise ApiError(404, "File not found")
    runner = context.runner()
    job_id = runner.store.file_job(relative)
    job = runner.store.get(job_id) if job_id else None
    if job is None or not may_see(job):
        raise ApiError(404, "File not found")
    stream_asked = request.headers.get("X-Output-Delivery", "").lower() == "stream"
    return files.file_response(runner.generator.storage, relative, redirect_ok=not stream_asked)


@bp.get("/webhooks/secret")
@require_key()
def webhook_signing_secret() -> Response:
    """The caller's own secret for verifying this service's webhooks."""
    key = context.settings().webhook_signing_key
    if not key:
        raise ApiError(404, "Webhooks are not enabled on this server")
    scope = webhook_scope(account_of(g.caller), g.caller.key.id if g.caller.key else None)
    return jsonify(secret=webhook_secret(key, scope),
                   scheme="Standard Webhooks (HMAC-SHA256)")


@extras.get("/jobs/<job_id>/archive")
@require_key()
def job_archive(job_id: str) -> WerkzeugResponse:
    """Every file the job wrote, in input order, as one zip named after the job."""
    job = owned_job(job_id)
    runner = context.runner()
    relatives = [f for item in runner.store.items(job.id) for f in item.files]
    return Response(files.job_zip(runner.generator.storage, relatives), mimetype="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job.id}.zip"',
                             "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@extras.get("/jobs/<job_id>/items")
@require_key()
def job_items(job_id: str) -> Response:
    """A job's items in input order, a page at a time: after a cursor, of one state if asked."""
    job = owned_job(job_id)
    state = request.args.get("state")
    if state is not None and state not in ITEM_STATES:
        raise InvalidRequest("state", f"state must be one of: {', '.join(ITEM_STATES)}")
    return jsonify(responses.item_page(
        context.runner(), job, after=int_arg("after", -1, 0, MAX_ITEM_INDEX),
        limit=int_arg("limit", responses.ITEM_PAGE_DEFAULT, 1, responses.ITEM_PAGE_MAX),
        state=state))


@extras.post("/jobs/<job_id>/retry")
@require_key()
def retry_job(job_id: str) -> Answer:
    """A new job with the failed items, same models and parameters: 202 with the new job."""
    return submission.retry(owned_job(job_id))
