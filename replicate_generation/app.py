"""The HTTP layer: factory, auth, request parsing, error mapping. Served as `app:create_app()`."""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from dotenv import find_dotenv, load_dotenv
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation import observability, ops
from replicate_generation.backends import wait_for_backends
from replicate_generation.catalogue import MODELS
from replicate_generation.concurrency_manager import (
    ConcurrencyManager,
    Limits,
    LimitSource,
    validate_limit,
)
from replicate_generation.errors import (
    ExpandedRequestTooLarge,
    GenerationError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidWebhook,
    QueueFull,
    SchemaUnavailable,
    SettingsError,
    ShuttingDown,
    StoreBusy,
    StoreUnavailable,
    TokenRejected,
)
from replicate_generation.generation import Generator
from replicate_generation.jobs import webhooks
from replicate_generation.jobs.runner import JobRunner, Submission, output_path, webhook_secret
from replicate_generation.jobs.store import JobRow
from replicate_generation.model_functions import TOKEN_SHAPED, account_key, resolve_model
from replicate_generation.observability import current_request_id
from replicate_generation.outputs import InvalidName
from replicate_generation.request_parsing import (
    Parsed,
    estimate,
    parse_batch,
    parse_single,
    request_hash,
)
from replicate_generation.routing import FallbackChains
from replicate_generation.schemas import ModelPolicy, Resolver, resolving
from replicate_generation.settings import Settings

SERVICE = "replicate-concurrent-generation"
VERSION = "3.1.0"
AUTH_MESSAGE = ("No valid API key provided. Either provide X-Admin-API-Key or "
                "X-Replicate-API-Key header")
STATUS_BY_KIND = {"deadline_exceeded": 504, "shutting_down": 503, "storage_error": 507,
                  "internal_error": 500}
TOKEN_SHAPE = re.compile(r"^[\x21-\x7e]{8,256}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# Bodies are a few levels deep (tasks[0].input_images[1]); far deeper is an attack on the parser.
MAX_JSON_DEPTH = 32
LIMIT_FIELDS = {"concurrent_limit": "max_concurrent", "requests_per_minute": "requests_per_minute",
                "burst": "burst", "polls_per_minute": "polls_per_minute"}

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)
F = TypeVar("F", bound=Callable[..., Any])


class ApiError(Exception):
    """An error answered with the one JSON error shape."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None,
                 **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.extra = extra


@dataclass(frozen=True)
class Caller:
    """Who is calling and whose Replicate account pays."""

    admin: bool
    token: str | None

    @property
    def account(self) -> str | None:
        return account_key(self.token) if self.token else None


# --------------------------------------------------------------------------- factory


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; with no settings, read them from the environment and `.env`."""
    if settings is None:
        load_dotenv(find_dotenv(usecwd=True))
        settings = Settings.from_env(os.environ)
    _configure_logging(settings)
    observability.install_logging(settings.log_format)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    try:
        chains = FallbackChains.parse(settings.fallback_chains)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    wait_for_backends(settings)
    runner = JobRunner(settings)
    app.extensions["settings"] = settings
    app.extensions["chains"] = chains
    app.extensions["model_policy"] = ModelPolicy.parse(settings.model_policy)
    app.extensions["jobs"] = runner
    app.extensions["generator"] = runner.generator
    # gunicorn's worker_exit hook closes it first; this covers every other way of serving.
    atexit.register(runner.close)
    app.register_blueprint(bp)
    ops.register(app, VERSION)
    _register_console(app, settings)
    observability.init_app(app)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.register_error_handler(StoreBusy, _store_busy)
    app.register_error_handler(StoreUnavailable, _store_unavailable)
    app.register_error_handler(ExpandedRequestTooLarge, _expanded_too_large)
    app.register_error_handler(SchemaUnavailable, _schema_unavailable)
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is closed")
    return app


def _register_console(app: Flask, settings: Settings) -> None:
    # Imported here: both modules import this one for its auth and job helpers.
    from replicate_generation import job_extras, web

    job_extras.register(app)
    web.register(app, settings)


class RedactSecrets(logging.Filter):
    """Last line of defence: no configured secret or Replicate-shaped token reaches a log."""

    TOKEN = TOKEN_SHAPED

    def __init__(self, secrets: Iterable[str | None]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.TOKEN.sub("r8_[redacted]", message)
        for secret in self._secrets:
            cleaned = cleaned.replace(secret, "[redacted]")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class EscapeControlCharacters(logging.Filter):
    """No text a client sent (a path, a prompt) can start a forged log line or hide in one."""

    UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069"
                        "\ufeff\ud800-\udfff]")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = self.escape(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._indented(logging.Formatter().formatException(record.exc_info))
        return True

    @classmethod
    def escape(cls, text: str) -> str:
        return cls.UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)

    @classmethod
    def _indented(cls, traceback: str) -> str:
        # Every line after the first indented: an exception's message cannot pose as a record.
        return "\n  ".join(cls.escape(line) for line in traceback.split("\n"))


# gunicorn's own loggers: its access log writes the percent-decoded request path verbatim.
GUNICORN_LOGGERS = ("gunicorn.access", "gunicorn.error")


def _configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(settings.log_level)
    # httpx logs every request at INFO: one line per poll would drown the service's own lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    filters = (EscapeControlCharacters(),
               RedactSecrets([settings.replicate_api_token, settings.admin_api_key]))
    loggers = [root, *(logging.getLogger(name) for name in GUNICORN_LOGGERS)]
    for handler in {h for logger in loggers for h in logger.handlers}:
        _replace_filters(handler, filters)


def _replace_filters(handler: logging.Handler, filters: tuple[logging.Filter, ...]) -> None:
    """Install these filters on the handler, dropping an earlier app's of the same kinds."""
    kinds = tuple(type(f) for f in filters)
    for old in [f for f in handler.filters if isinstance(f, kinds)]:
        handler.removeFilter(old)
    for new in filters:
        handler.addFilter(new)


def _settings() -> Settings:
    return cast(Settings, current_app.extensions["settings"])


def _generator() -> Generator:
    return cast(Generator, current_app.extensions["generator"])


def _runner() -> JobRunner:
    return cast(JobRunner, current_app.extensions["jobs"])


def _chains() -> FallbackChains:
    return cast(FallbackChains, current_app.extensions["chains"])


# --------------------------------------------------------------------------- auth


def _resolve_caller(settings: Settings) -> Caller:
    """Admin key (constant-time) spends the server token; a user key spends the caller's own."""
    admin_key = request.headers.get("X-Admin-API-Key")
    if admin_key is not None:
        expected = settings.admin_api_key
        if not expected or not hmac.compare_digest(
                admin_key.encode("utf-8", "surrogatepass"), expected.encode("utf-8")):
            raise ApiError(401, AUTH_MESSAGE)
        return Caller(admin=True, token=settings.replicate_api_token)
    user_token = request.headers.get("X-Replicate-API-Key")
    if user_token is not None and TOKEN_SHAPE.match(user_token):
        return Caller(admin=False, token=user_token)
    raise ApiError(401, AUTH_MESSAGE)


def require_key(role: str = "any") -> Callable[[F], F]:
    """Guard a view: 401 without a valid key, 403 for a user key on an admin route."""

    def decorate(view: F) -> F:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            caller = _resolve_caller(_settings())
            if role == "admin" and not caller.admin:
                raise ApiError(403, "This route needs the admin key (X-Admin-API-Key)")
            g.caller = caller
            if caller.token is not None and not caller.admin:
                # A user's orphaned jobs can resume once their token is known again.
                _runner().remember(caller.token)
            return view(*args, **kwargs)

        return cast(F, guarded)

    return decorate


def _paying_token(caller: Caller) -> str:
    if caller.token is None:
        raise ApiError(503, "Admin API key accepted, but the server has no REPLICATE_API_TOKEN "
                       "configured; call with X-Replicate-API-Key instead",
                       headers={"Retry-After": "60"})
    return caller.token


# --------------------------------------------------------------------------- parsing


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object, or the right 4xx."""
    if not request.is_json:
        raise ApiError(415, "Content-Type must be application/json")
    body = _parse_json(_body_bytes())
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    problem = _json_problem(body)
    if problem is not None:
        field, message = problem
        raise InvalidRequest(field, f"{field} {message}")
    return body


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _body_bytes() -> bytes:
    """The raw body; a streamed (chunked) body past the limit is a 413, not a truncated read."""
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(data) >= limit:
        # werkzeug stops reading at the limit without a word: one more byte says it was cut.
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return data


def _parse_json(data: bytes) -> object:
    """Strict JSON: no NaN/Infinity, no duplicate keys, no nesting deep enough to recurse out."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise InvalidRequest(exc.key, f"The key '{exc.key[:100]}' appears twice in one "
                             "object") from None
    except RecursionError:
        raise ApiError(400, f"Request body nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise ApiError(400, "Request body must be valid JSON") from None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _json_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """The first (field path, problem) in the body that would fail later instead of here."""
    stack: list[tuple[str, object, int]] = [("", body, 0)]
    while stack:  # a loop, not recursion: depth is what is being checked
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path[:200], f"nests more than {MAX_JSON_DEPTH} levels deep"
        if not _is_utf8(path):  # the path holds every key on the way here; shown escaped
            return (path.encode("utf-8", "backslashreplace").decode("utf-8"),
                    "is a key that is not valid Unicode text (it holds a lone surrogate)")
        problem = _value_problem(value)
        if problem is not None:
            return path, problem
        stack.extend((p, v, depth + 1) for p, v in reversed(_children(path, value)))
    return None


def _value_problem(value: object) -> str | None:
    # A lone surrogate has no UTF-8 (prompts, names and hashes are all encoded); 1e999 is inf,
    # and an integer past the largest double overflows wherever it is taken as a number.
    if isinstance(value, str) and not _is_utf8(value):
        return "is not valid Unicode text (it holds a lone surrogate)"
    if isinstance(value, float) and not math.isfinite(value):
        return "is a number too large to represent"
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        return "is a number too large to represent"
    return None


def _children(path: str, value: object) -> list[tuple[str, object]]:
    """A JSON value's members, each with its field path (`tasks[0].prompt`)."""
    if isinstance(value, dict):
        return [(f"{path}.{key}" if path else key, item) for key, item in value.items()]
    if isinstance(value, list):
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return []


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- routes


@bp.get("/health")
def health() -> Response:
    """Report liveness, each backend and the limits in force; never waits on a limiter."""
    settings = _settings()
    dependencies = _runner().dependencies()
    healthy = all(d["status"] == "ok" for d in dependencies.values())
    return jsonify(status="healthy" if healthy else "degraded", service=SERVICE,
                   version=VERSION, supported_models=sorted(MODELS),
                   dependencies=dependencies,
                   concurrency_status=_limits_view(_generator().manager.limits())
                   if dependencies["limits"]["status"] == "ok" else None,
                   admin_key_configured=bool(settings.admin_api_key),
                   server_token_configured=bool(settings.replicate_api_token))


@bp.get("/status")
def status() -> Response:
    """Live figures: everyone sees totals, a user their own account, the admin every account."""
    settings, generator = _settings(), _generator()
    caller = _resolve_caller(settings) if _has_key() else None
    totals = generator.manager.stats()
    accounts = [a for a in totals if caller is not None and (caller.admin or
                                                              a.account == caller.account)]
    sources = generator.manager.limit_sources()
    # Admin only: what this process keeps per account (bounded by the accounts with work here).
    held = {"process": _runner().held()} if caller is not None and caller.admin else {}
    return jsonify(
        **held,
        service=SERVICE, version=VERSION, backends=_runner().backends(),
        limits=_limits_view(_effective(sources)),
        limit_sources=_sources_view(sources),
        admin_api_configured=bool(settings.admin_api_key),
        default_replicate_key_configured=bool(settings.replicate_api_token),
        totals={"in_flight": sum(a.in_flight for a in totals),
                "waiting": sum(a.waiting for a in totals),
                "creates_last_minute": sum(a.creates_last_minute for a in totals),
                "queued_in_this_process": generator.dispatcher.queued()},
        accounts=[{**a._asdict(), "queued_in_this_process": generator.dispatcher.queued(
            a.account)} for a in accounts])


def _has_key() -> bool:
    return "X-Admin-API-Key" in request.headers or "X-Replicate-API-Key" in request.headers


@bp.get("/models")
def models() -> Response:
    """List every model with its parameters, types, allowed values and defaults."""
    return jsonify(supported_models=sorted(MODELS), model_count=len(MODELS),
                   models={spec.id: spec.describe() for spec in MODELS.values()})


@bp.get("/models/<owner>/<name>")
def model_detail(owner: str, name: str) -> Response:
    """One model's parameters as the service checks them: the catalogue's, or (non-curated,
    where MODEL_POLICY allows it, with a key) those of its own schema."""
    ref = f"{owner}/{name}"
    curated = next((s for s in MODELS.values() if ref in (s.ref, s.id)), None)
    if curated is not None:
        return jsonify(curated.describe())
    g.caller = _resolve_caller(_settings())
    with _other_models():
        return jsonify(resolve_model(ref).describe())


def _other_models() -> Any:
    """Let this request's parsing resolve non-curated models, fetched with its own token."""
    resolver = Resolver(policy=current_app.extensions["model_policy"],
                        rt=_generator().runtime, token=lambda: _paying_token(g.caller))
    return resolving(resolver)


@bp.post("/configure")
@require_key("admin")
def configure() -> Response:
    """Override the given limits (null clears one) for every process, across restarts."""
    changes = _overrides_from(_json_object())
    manager = _generator().manager
    manager.configure_fields(changes)
    log.info("limit overrides changed: %s", changes)
    return _configuration_view(manager, "Concurrency settings updated")


@bp.delete("/configure")
@require_key("admin")
def clear_configuration() -> Response:
    """Drop every /configure override: the environment's limits apply again."""
    manager = _generator().manager
    manager.clear_configuration()
    log.info("limit overrides cleared")
    return _configuration_view(manager, "Overrides cleared; the environment's limits apply")


def _configuration_view(manager: ConcurrencyManager, message: str) -> Response:
    sources = manager.limit_sources()
    return jsonify(success=True, message=message, new_settings=_limits_view(_effective(sources)),
                   limit_sources=_sources_view(sources))


def _overrides_from(body: dict[str, Any]) -> dict[str, int | None]:
    """The fields the body gives, by Limits name; each an int in range, or None to clear it."""
    unknown = sorted(set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"Unknown setting '{unknown[0][:100]}'; allowed: "
                             + ", ".join(LIMIT_FIELDS))
    if not body:
        raise InvalidRequest("concurrent_limit", "Give at least one of " + ", ".join(LIMIT_FIELDS))
    changes: dict[str, int | None] = {}
    for name, value in body.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(name, f"{name} must be an integer, or null to clear it")
        if value is not None:
            try:
                validate_limit(LIMIT_FIELDS[name], value)
            except ValueError as exc:
                raise InvalidRequest(name, str(exc).replace(LIMIT_FIELDS[name], name)) from None
        changes[LIMIT_FIELDS[name]] = value
    return changes


def _effective(sources: Mapping[str, LimitSource]) -> Limits:
    return Limits(**{name: source.value for name, source in sources.items()})


def _sources_view(sources: Mapping[str, LimitSource]) -> dict[str, dict[str, Any]]:
    return {public: sources[name].as_dict() for public, name in LIMIT_FIELDS.items()}


def _limits_view(limits: Limits) -> dict[str, int]:
    return {"concurrent_limit": limits.max_concurrent,
            "requests_per_minute": limits.requests_per_minute,
            "burst": limits.burst, "polls_per_minute": limits.polls_per_minute}


@bp.post("/generate")
@require_key()
def generate() -> tuple[Response, int, dict[str, str]]:
    """Generate one prompt's outputs: wait for them, or (async) return the job at once."""
    body = _json_object()
    with _other_models():
        parsed = parse_single(body, _chains())
    return _submit("generate", body, parsed, _single_view)


@bp.post("/generate-batch")
@require_key()
def generate_batch() -> tuple[Response, int, dict[str, str]]:
    """Generate many prompts in parallel; results come back in input order."""
    body = _json_object()
    with _other_models():
        parsed = parse_batch(body, _settings().max_batch_size, _chains())
    return _submit("batch", body, parsed, _batch_view)


View = Callable[[JobRow, list[dict[str, Any]]], tuple[dict[str, Any], int]]


def _submit(kind: str, body: dict[str, Any], parsed: Parsed,
            view: View) -> tuple[Response, int, dict[str, str]]:
    """Run a parsed request as a job: 202 with the job when async, else wait and answer."""
    if parsed.options.dry_run:
        return jsonify(estimate(parsed.tasks)), 200, {}
    token = _paying_token(g.caller)
    submission = Submission(
        kind=kind, tasks=parsed.tasks, idempotency_key=_idempotency_key(),
        request_hash=request_hash(request.path, body),
        webhook_url=_webhook_target(parsed.options.webhook),
        webhook_private=g.caller.admin)
    runner = _runner()
    try:
        job, created = runner.submit(token, submission)
    except IdempotencyConflict:
        raise ApiError(422, "This Idempotency-Key was already used with a different request "
                       "body", field="Idempotency-Key") from None
    headers = {"Location": f"/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    if parsed.options.run_async or _prefers_async():
        headers["Preference-Applied"] = "respond-async"
        return jsonify(runner.describe(job, url_root="", items=False)), 202, headers
    finished = runner.wait(job.id)
    if finished is None:  # removed by retention while we waited: cannot happen in practice
        raise ApiError(404, "Job not found")
    items = [runner.describe_item(i, url_root="") for i in runner.store.items(job.id)]
    payload, status = view(finished, items)
    return jsonify(payload), status, headers


def _single_view(job: JobRow, items: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The seed's /generate shape, plus the job and the full result."""
    item = items[0]
    body: dict[str, Any] = {"success": item["success"], "model_name": item["model_requested"],
                            "model_used": item["model_used"], "prompt": item["prompt"],
                            "files": item["files"], "urls": item["urls"],
                            "count": item["count"], "prediction_id": item["prediction_id"],
                            "request_id": current_request_id(), "output_id": job.request_id,
                            "job_id": job.id, "cost_usd": item["cost_usd"], "results": items}
    if item["success"]:
        return body, 200
    body["error"] = f"Generation failed: {item['error']}"
    body["error_type"] = item["error_type"]
    body["placeholder"] = item["placeholder"]
    return body, STATUS_BY_KIND.get(str(item["error_type"]), 502)


def _batch_view(job: JobRow, items: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The seed's /generate-batch shape, plus the job and every result in input order."""
    ok = [i for i in items if i["success"]]
    failed = [i for i in items if not i["success"]]
    models = sorted({str(i["model_requested"]) for i in items})
    return {
        "success": not failed, "model_name": models[0] if len(models) == 1 else models,
        "request_id": current_request_id(), "output_id": job.request_id, "job_id": job.id,
        "state": job.state,
        "total_prompts": len(items), "successful_count": len(ok), "failed_count": len(failed),
        "successful_results": [{"prompt_index": i["index"], "files": i["files"],
                                "urls": i["urls"], "prompt": i["prompt"], "count": i["count"]}
                               for i in ok],
        "failed_results": [{"prompt_index": i["index"], "prompt": i["prompt"],
                            "error": i["error"], "error_type": i["error_type"]}
                           for i in failed],
        "cost_usd": round(sum(float(i["cost_usd"] or 0) for i in items), 6),
        "results": items}, 200


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
    if not _settings().webhook_signing_key:
        raise InvalidRequest("webhook", "Webhooks are not enabled on this server "
                             "(WEBHOOK_SIGNING_KEY is not set)")
    return webhooks.check_target(url, allow_private=g.caller.admin)


# --------------------------------------------------------------------------- jobs


@bp.get("/jobs")
@require_key()
def list_jobs() -> Response:
    """The caller's jobs (every job for the admin key), newest first, a page at a time."""
    limit = _int_arg("limit", 20, 1, 100)
    after = request.args.get("after")
    cursor = None
    if after:
        last = _owned_job(after)
        cursor = (last.created_at, last.id)
    account = None if g.caller.admin else g.caller.account
    runner = _runner()
    jobs = runner.store.list_jobs(account, limit + 1, cursor)
    page = jobs[:limit]
    has_more = len(jobs) > limit
    return jsonify(object="list", data=[runner.describe(j, url_root="", items=False)
                                        for j in page],
                   has_more=has_more,
                   next=f"/jobs?limit={limit}&after={page[-1].id}" if has_more else None)


@bp.get("/jobs/<job_id>")
@require_key()
def get_job(job_id: str) -> Response:
    """A job's state, counts, timestamps and items in input order, with partial results."""
    return jsonify(_runner().describe(_owned_job(job_id), url_root=""))


@bp.post("/jobs/<job_id>/cancel")
@require_key()
def cancel_job(job_id: str) -> Response:
    """Drop queued items, cancel running predictions on Replicate, keep finished results."""
    job = _owned_job(job_id)
    runner = _runner()
    updated = runner.cancel(job.id) or job
    return jsonify(runner.describe(updated, url_root=""))


@bp.get("/files/<path:relative>")
@require_key()
def get_file(relative: str) -> WerkzeugResponse:
    """Stream an output to the account whose job wrote it (ranges and content type included)."""
    if "\x00" in relative:  # no file name holds one, and the OS refuses it with a ValueError
        raise ApiError(404, "File not found")
    runner = _runner()
    job_id = runner.store.file_job(relative)
    job = runner.store.get(job_id) if job_id else None
    path = output_path(runner.generator.runtime.output_root, relative)
    if job is None or path is None or not _may_see(job):
        raise ApiError(404, "File not found")
    return send_file(path, conditional=True, max_age=0)


@bp.get("/webhooks/secret")
@require_key()
def webhook_signing_secret() -> Response:
    """The caller's own secret for verifying this service's webhooks."""
    key = _settings().webhook_signing_key
    if not key:
        raise ApiError(404, "Webhooks are not enabled on this server")
    return jsonify(secret=webhook_secret(key, _account_of(g.caller)),
                   scheme="Standard Webhooks (HMAC-SHA256)")


def _owned_job(job_id: str) -> JobRow:
    job = _runner().store.get(job_id)
    if job is None or not _may_see(job):
        # Someone else's job looks exactly like a job that does not exist.
        raise ApiError(404, "Job not found")
    return job


def _may_see(job: JobRow) -> bool:
    caller: Caller = g.caller
    return caller.admin or (caller.account is not None and hmac.compare_digest(
        caller.account, job.account))


def _account_of(caller: Caller) -> str:
    if caller.account is None:
        raise ApiError(503, "The server has no REPLICATE_API_TOKEN configured",
                       headers={"Retry-After": "60"})
    return caller.account


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    # isdecimal, not isdigit: "²" is a digit that int() refuses (a 500 instead of a 400).
    # The length first: int() refuses over 4300 digits with a ValueError.
    if not raw.isdecimal() or len(raw) > 20 or not low <= int(raw) <= high:
        raise InvalidRequest(name, f"{name} must be an integer from {low} to {high}")
    return int(raw)


# --------------------------------------------------------------------------- errors


def _error_body(message: str, **extra: object) -> dict[str, object]:
    return {"error": message, **extra}


def _api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
    return jsonify(_error_body(str(exc), **exc.extra)), exc.status, exc.headers


def _http_error(exc: HTTPException) -> WerkzeugResponse:
    """Werkzeug's own errors (404, 405, 413...) in our shape, keeping their headers."""
    response = exc.get_response()
    response.set_data(jsonify(_error_body(exc.description or exc.name)).get_data())
    response.content_type = "application/json"
    return response


def _token_rejected(exc: TokenRejected) -> tuple[Response, int, dict[str, str]]:
    """401 for a user's own token (theirs to fix); 503 when it is the server's token."""
    caller = g.get("caller")
    status = 503 if caller is not None and caller.admin else 401
    return (jsonify(_error_body(str(exc), error_type=exc.kind)), status,
            {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})


def _store_busy(exc: StoreBusy) -> tuple[Response, int, dict[str, str]]:
    """The state file stayed locked past the wait a request may take: nothing half done."""
    return (jsonify(_error_body(str(exc), error_type="store_busy")), 503,
            {"Retry-After": str(exc.retry_after)})


def _store_unavailable(exc: StoreUnavailable) -> tuple[Response, int, dict[str, str]]:
    """Redis or PostgreSQL is down: nothing was created; waiting work keeps its place."""
    return (jsonify(_error_body(str(exc), error_type="dependency_unavailable",
                                dependency=exc.dependency)), 503,
            {"Retry-After": str(exc.retry_after)})


def _schema_unavailable(exc: SchemaUnavailable) -> tuple[Response, int, dict[str, str]]:
    """A non-curated model's schema could not be fetched: nothing was created."""
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after else {}
    return jsonify(_error_body(str(exc), error_type="schema_unavailable")), exc.status, headers


def _expanded_too_large(exc: ExpandedRequestTooLarge) -> tuple[Response, int, dict[str, str]]:
    return jsonify(_error_body(str(exc), limit=exc.limit, expanded_bytes=exc.size)), 413, {}


def _unexpected_error(exc: Exception) -> tuple[Response, int, dict[str, str]]:
    if isinstance(exc, InvalidRequest):
        return jsonify(_error_body(str(exc), field=exc.field, **exc.extra)), 400, {}
    if isinstance(exc, InvalidName | InvalidWebhook):
        return jsonify(_error_body(str(exc), field=exc.field)), 400, {}
    if isinstance(exc, QueueFull):
        kind = "account_queue_full" if exc.scope == "account" else "queue_full"
        return (jsonify(_error_body(str(exc), error_type=kind)), 429,
                {"Retry-After": str(int(exc.retry_after))})
    if isinstance(exc, TokenRejected):
        return _token_rejected(exc)
    if isinstance(exc, ShuttingDown):
        return jsonify(_error_body("The service is shutting down")), 503, {"Retry-After": "10"}
    if isinstance(exc, GenerationError):
        return (jsonify(_error_body(str(exc), error_type=exc.kind)),
                STATUS_BY_KIND.get(exc.kind, 502), {})
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(_error_body("Internal error; it has been logged")), 500, {}
