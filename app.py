"""The HTTP layer: factory, auth, request parsing, error mapping. Served as `app:create_app()`."""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from dotenv import find_dotenv, load_dotenv
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from catalogue import MODELS
from concurrency_manager import Limits
from dispatcher import QueueFull, ShuttingDown
from generation import Generator, Task, TaskResult
from model_functions import GenerationError, InvalidRequest, account_key, build_input, resolve_model
from outputs import InvalidName, default_stem, safe_filename
from settings import Settings

SERVICE = "replicate-concurrent-generation"
VERSION = "3.1.0"
AUTH_MESSAGE = ("No valid API key provided. Either provide X-Admin-API-Key or "
                "X-Replicate-API-Key header")
STATUS_BY_KIND = {"deadline_exceeded": 504, "shutting_down": 503, "storage_error": 507,
                  "internal_error": 500}
TOKEN_SHAPE = re.compile(r"^[\x21-\x7e]{8,256}$")
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
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    generator = Generator(settings)
    app.extensions["settings"] = settings
    app.extensions["generator"] = generator
    atexit.register(generator.close)
    app.register_blueprint(bp)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is closed")
    return app


class RedactSecrets(logging.Filter):
    """Last line of defence: no configured secret or Replicate-shaped token reaches a log."""

    TOKEN = re.compile(r"r8_[A-Za-z0-9]{8,}")

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


def _configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(settings.log_level)
    # httpx logs every request at INFO: one line per poll would drown the service's own lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    redact = RedactSecrets([settings.replicate_api_token, settings.admin_api_key])
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
            handler.removeFilter(old)
        handler.addFilter(redact)


def _settings() -> Settings:
    return cast(Settings, current_app.extensions["settings"])


def _generator() -> Generator:
    return cast(Generator, current_app.extensions["generator"])


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
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "Request body must be valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body


def _single_task(body: dict[str, Any]) -> Task:
    params = {k: v for k, v in body.items() if k not in ("model_name", "custom_filename")}
    spec = resolve_model(body.get("model_name"))
    model_input = build_input(spec, params.pop("prompt", None), params)
    stem = (safe_filename(body["custom_filename"], "custom_filename")
            if body.get("custom_filename") is not None else default_stem(spec.id, None))
    return Task(index=0, spec=spec, input=model_input, stem=stem)


def _batch_tasks(body: dict[str, Any], max_items: int) -> list[Task]:
    if "tasks" in body and "prompts" in body:
        raise InvalidRequest("tasks", "Give either tasks or prompts, not both")
    if "tasks" in body:
        tasks = _tasks_mode(body, max_items)
    elif "prompts" in body:
        tasks = _prompts_mode(body, max_items)
    else:
        raise InvalidRequest("prompts", "Either tasks array or prompts array is required")
    _check_unique_names(tasks)
    return tasks


def _items(body: dict[str, Any], key: str, max_items: int) -> list[Any]:
    items = body[key]
    if not isinstance(items, list) or not items:
        raise InvalidRequest(key, f"{key} must be a non-empty array")
    if len(items) > max_items:
        raise InvalidRequest(key, f"{key} has {len(items)} items; at most {max_items} per batch")
    return items


def _prompts_mode(body: dict[str, Any], max_items: int) -> list[Task]:
    prompts = _items(body, "prompts", max_items)
    names = body.get("custom_filenames")
    if names is not None and (not isinstance(names, list) or len(names) != len(prompts)):
        raise InvalidRequest("custom_filenames",
                             "custom_filenames length must match prompts length")
    spec = resolve_model(body.get("model_name"))
    shared = {k: v for k, v in body.items()
              if k not in ("model_name", "prompts", "custom_filenames")}
    tasks = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest(f"prompts[{i}]", f"prompts[{i}] must be a non-empty string")
        model_input = build_input(spec, prompt, shared)
        stem = (safe_filename(names[i], f"custom_filenames[{i}]") if names is not None
                else default_stem(spec.id, i))
        tasks.append(Task(index=i, spec=spec, input=model_input, stem=stem))
    return tasks


def _tasks_mode(body: dict[str, Any], max_items: int) -> list[Task]:
    items = _items(body, "tasks", max_items)
    shared = {k: v for k, v in body.items() if k not in ("model_name", "tasks")}
    if "prompt" in shared:
        # Each task's own prompt would silently win over it: say so instead.
        raise InvalidRequest("prompt", "With tasks, put each prompt inside its task")
    tasks = []
    for i, item in enumerate(items):
        where = f"tasks[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(where, f"Task {i} must be a dictionary")
        spec = resolve_model(item.get("model_name", body.get("model_name")),
                             f"{where}.model_name")
        own = {k: v for k, v in item.items() if k not in ("model_name", "custom_filename")}
        if "prompt" not in own:
            raise InvalidRequest(f"{where}.prompt", f"Task {i} missing required field: prompt")
        params = {**shared, **own}
        model_input = build_input(spec, params.pop("prompt"), params, prefix=f"{where}.")
        stem = (safe_filename(item["custom_filename"], f"{where}.custom_filename")
                if item.get("custom_filename") is not None else default_stem(spec.id, i))
        tasks.append(Task(index=i, spec=spec, input=model_input, stem=stem))
    return tasks


def _check_unique_names(tasks: list[Task]) -> None:
    """Two items may not write the same file, including the `_N` names of multi-output items."""
    seen: dict[str, int] = {}
    for task in tasks:
        count = task.input.get("num_outputs", 1)
        names = [task.stem] if count == 1 else [f"{task.stem}_{n}" for n in
                                                range(1, int(cast(int, count)) + 1)]
        for name in names:
            other = seen.setdefault(name.casefold(), task.index)
            if other != task.index:
                raise InvalidRequest("custom_filenames",
                                     f"item {task.index} would write '{name}', as item {other} "
                                     "does; file names must be unique within a batch")


# --------------------------------------------------------------------------- routes


@bp.get("/health")
def health() -> Response:
    """Report liveness and the limits in force; never waits on a limiter."""
    settings = _settings()
    limits = _generator().manager.limits()
    return jsonify(status="healthy", service=SERVICE, version=VERSION,
                   supported_models=sorted(MODELS),
                   concurrency_status=_limits_view(limits),
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
    return jsonify(
        service=SERVICE, version=VERSION, limits=_limits_view(generator.manager.limits()),
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


@bp.post("/configure")
@require_key("admin")
def configure() -> Response:
    """Change the per-account limits for every process, at once and across restarts."""
    body = _json_object()
    manager = _generator().manager
    limits = _limits_from(body, manager.limits())
    manager.configure(limits)
    log.info("limits changed to %s", limits)
    return jsonify(success=True, message="Concurrency settings updated",
                   new_settings=_limits_view(limits))


def _limits_from(body: dict[str, Any], current: Limits) -> Limits:
    unknown = sorted(set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"Unknown setting '{unknown[0][:100]}'; allowed: "
                             + ", ".join(LIMIT_FIELDS))
    if not body:
        raise InvalidRequest("concurrent_limit", "Give at least one of " + ", ".join(LIMIT_FIELDS))
    changes: dict[str, int] = {}
    for name, value in body.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(name, f"{name} must be an integer")
        changes[LIMIT_FIELDS[name]] = value
    limits = Limits(**{**current.__dict__, **changes})
    try:
        limits.validate()
    except ValueError as exc:
        field = next((k for k, v in LIMIT_FIELDS.items() if v in str(exc)), "concurrent_limit")
        message = str(exc).replace("max_concurrent", "concurrent_limit")
        raise InvalidRequest(field, message) from None
    return limits


def _limits_view(limits: Limits) -> dict[str, int]:
    return {"concurrent_limit": limits.max_concurrent,
            "requests_per_minute": limits.requests_per_minute,
            "burst": limits.burst, "polls_per_minute": limits.polls_per_minute}


@bp.post("/generate")
@require_key()
def generate() -> tuple[Response, int]:
    """Generate one prompt's outputs and wait for them."""
    token = _paying_token(g.caller)
    task = _single_task(_json_object())
    request_id, results = _run([task], token)
    result = results[0]
    body: dict[str, Any] = {"success": result.ok, "model_name": task.spec.id,
                            "prompt": task.prompt, "files": result.files,
                            "count": len(result.files), "prediction_id": result.prediction_id,
                            "request_id": request_id, "results": [result.as_dict()]}
    if result.error is not None:
        body["error"] = f"Generation failed: {result.error}"
        body["error_type"] = result.error.kind
        return jsonify(body), STATUS_BY_KIND.get(result.error.kind, 502)
    return jsonify(body), 200


@bp.post("/generate-batch")
@require_key()
def generate_batch() -> tuple[Response, int]:
    """Generate many prompts in parallel; results come back in input order."""
    token = _paying_token(g.caller)
    body = _json_object()
    tasks = _batch_tasks(body, _settings().max_batch_size)
    request_id, results = _run(tasks, token)
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    models_used = sorted({t.spec.id for t in tasks})
    return jsonify(
        success=not failed, model_name=models_used[0] if len(models_used) == 1 else models_used,
        request_id=request_id, total_prompts=len(results), successful_count=len(ok),
        failed_count=len(failed),
        successful_results=[{"prompt_index": r.task.index, "files": r.files,
                             "prompt": r.task.prompt, "count": len(r.files)} for r in ok],
        failed_results=[{"prompt_index": r.task.index, "prompt": r.task.prompt,
                         "error": str(r.error), "error_type": r.error.kind if r.error else None}
                        for r in failed],
        results=[r.as_dict() for r in results]), 200


def _run(tasks: list[Task], token: str) -> tuple[str, list[TaskResult]]:
    generator = _generator()
    request_id, dest_dir = generator.new_request_dir()
    return request_id, generator.run(token, tasks, dest_dir)


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


def _unexpected_error(exc: Exception) -> tuple[Response, int, dict[str, str]]:
    if isinstance(exc, InvalidRequest):
        return jsonify(_error_body(str(exc), field=exc.field, **exc.extra)), 400, {}
    if isinstance(exc, InvalidName):
        return jsonify(_error_body(str(exc), field=exc.field)), 400, {}
    if isinstance(exc, QueueFull):
        return (jsonify(_error_body(str(exc))), 429,
                {"Retry-After": str(int(exc.retry_after))})
    if isinstance(exc, ShuttingDown):
        return jsonify(_error_body("The service is shutting down")), 503, {"Retry-After": "10"}
    if isinstance(exc, GenerationError):
        return (jsonify(_error_body(str(exc), error_type=exc.kind)),
                STATUS_BY_KIND.get(exc.kind, 502), {})
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(_error_body("Internal error; it has been logged")), 500, {}
