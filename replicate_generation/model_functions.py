"""What each model does: validate a request against the catalogue, call Replicate, keep its output.

No Flask here. Every Replicate call goes through a per-token `replicate.Client` and through the
account's limits (a lease while the prediction is in flight, a paced token for every create and
every poll). Errors come out as `GenerationError` with a kind the HTTP layer maps to a status.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import replicate
from replicate.exceptions import ReplicateError

from replicate_generation import metrics
from replicate_generation.any_outputs import is_empty, save_any
from replicate_generation.catalogue import MODELS, ModelSpec, Param
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.errors import (
    DeadlineExceeded,
    GenerationError,
    InvalidRequest,
    Suspended,
    TokenRejected,
)
from replicate_generation.outputs import DownloadError, SavedFile, output_sources, save_outputs
from replicate_generation.reconcile import (
    Absent,
    Found,
    Intent,
    Lookup,
    Unresolvable,
    find_prediction,
    input_digest,
)

log = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
NOT_RETRIED = {401: "replicate_unauthorized", 402: "replicate_payment_required",
               404: "replicate_not_found", 422: "replicate_invalid_input"}
CONTENT_POLICY_MARKERS = ("(E005)", "flagged as sensitive", "NSFW")
MAX_SERVER_ERRORS = 3
MAX_URI_LENGTH = 2048
DOWNLOAD_GRACE_SECONDS = 120.0
CANCEL_WAIT_SECONDS = 60.0
# Replicate holds a `Prefer: wait=N` create for at most 60 s.
MAX_SYNC_WAIT_SECONDS = 60
# A long prediction is polled at this fraction of its age, so it is seen soon after it ends
# without spending the account's poll budget on predictions that run for minutes.
POLL_AGE_FRACTION = 0.05
MIN_POLL_SECONDS = 0.2


# --------------------------------------------------------------------------- validation


# Set by schemas.resolving for one request: resolves models outside the catalogue, if allowed.
OTHER_MODELS: ContextVar[Callable[[str, str], ModelSpec | None] | None] = ContextVar(
    "other_models", default=None)


def resolve_model(name: object, field: str = "model_name") -> ModelSpec:
    """Return the catalogue entry for a short id (`flux-dev`) or a full ref (`owner/name`);
    any other `owner/name(:version)` only where MODEL_POLICY allows it (schemas.py)."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(field, f"{field} is required and must be a string")
    for spec in MODELS.values():
        if name in (spec.id, spec.ref):
            return spec
    other = OTHER_MODELS.get()
    found = other(name, field) if other is not None else None
    if found is not None:
        return found
    raise InvalidRequest(
        field, f"Model '{name[:200]}' not supported", supported_models=sorted(MODELS)
    )


def build_input(
    spec: ModelSpec, prompt: object, params: Mapping[str, object], prefix: str = ""
) -> dict[str, object]:
    """Validate every parameter against the catalogue and return the full model input."""
    if prompt is None:
        raise InvalidRequest(f"{prefix}prompt", f"{prefix}prompt is required")
    checked = {"prompt": _check(_prompt_param(spec), prompt, f"{prefix}prompt")}
    if not str(checked["prompt"]).strip():
        raise InvalidRequest(f"{prefix}prompt", f"{prefix}prompt must not be empty")
    for name, value in params.items():
        param = spec.param(name)
        if param is None or name == "prompt":
            allowed = ", ".join(p.name for p in spec.params if p.name != "prompt")
            raise InvalidRequest(
                f"{prefix}{name}",
                f"Unknown parameter '{name[:100]}' for model {spec.id}; allowed: {allowed}",
            )
        checked[name] = _check(param, value, f"{prefix}{name}")
    for param in spec.params:
        if param.name not in checked:
            if param.required:
                raise InvalidRequest(f"{prefix}{param.name}", f"{prefix}{param.name} is required")
            if param.default is not None:
                checked[param.name] = param.default
    return checked


def _prompt_param(spec: ModelSpec) -> Param:
    param = spec.param("prompt")
    if param is None:  # every catalogue entry has one; a test guards the catalogue
        raise InvalidRequest("model_name", f"model {spec.id} takes no prompt")
    return param


def check_value(param: Param, value: object, field: str) -> object:
    """Return the value if it fits the parameter; else InvalidRequest naming `field`."""
    return _check(param, value, field)


def _check(param: Param, value: object, field: str) -> object:
    """Return the value if it fits the parameter's type, choices and range."""
    checker = _CHECKERS[param.type]
    checker(param, value, field)
    if param.choices is not None and value not in param.choices:
        options = ", ".join(repr(c) for c in param.choices)
        raise InvalidRequest(field, f"{field} must be one of {options}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if param.minimum is not None and value < param.minimum:
            raise InvalidRequest(field, f"{field} must be >= {param.minimum}")
        if param.maximum is not None and value > param.maximum:
            raise InvalidRequest(field, f"{field} must be <= {param.maximum}")
    return value


def _check_string(param: Param, value: object, field: str) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(field, f"{field} must be a string")
    if param.max_length is not None and len(value) > param.max_length:
        raise InvalidRequest(field, f"{field} must be at most {param.max_length} characters")


def _check_integer(param: Param, value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(field, f"{field} must be an integer")


def _check_number(param: Param, value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, f"{field} must be a number")


def _check_boolean(param: Param, value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise InvalidRequest(field, f"{field} must be true or false")


def _check_uri(param: Param, value: object, field: str) -> None:
    """Accept an http(s) URL or a data: URI; never a path on this server."""
    message = (f"{field} must be an http(s) URL or a data: URI "
               "(paths on the server are not accepted)")
    if not isinstance(value, str):
        raise InvalidRequest(field, message)
    if value.startswith("data:"):
        if "," not in value:
            raise InvalidRequest(field, f"{field} is not a valid data: URI")
        return
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. "http://[": an unclosed IPv6 host
        raise InvalidRequest(field, message) from None
    if (parts.scheme not in ("http", "https") or not parts.netloc or len(value) > MAX_URI_LENGTH
            or any(ch.isspace() or not ch.isprintable() for ch in value)):
        raise InvalidRequest(field, message)


def _check_uri_list(param: Param, value: object, field: str) -> None:
    """Accept a list of 1..max_items URIs, each as `_check_uri` does; name the bad item."""
    most = param.max_items
    if not isinstance(value, list):
        raise InvalidRequest(field, f"{field} must be a list of http(s) URLs or data: URIs")
    if not value or (most is not None and len(value) > most):
        limit = f"1 to {most}" if most is not None else "at least 1"
        raise InvalidRequest(field, f"{field} must hold {limit} items, not {len(value)}")
    for i, item in enumerate(value):
        _check_uri(param, item, f"{field}[{i}]")


_CHECKERS: dict[str, Callable[[Param, object, str], None]] = {
    "string": _check_string,
    "integer": _check_integer,
    "number": _check_number,
    "boolean": _check_boolean,
    "uri": _check_uri,
    "uri_list": _check_uri_list,
}


# --------------------------------------------------------------------------- errors


def account_key(token: str) -> str:
    """Name an account by a hash of its token: limits, stats and logs never hold the token."""
    return "acct_" + hashlib.sha256(token.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- clients


class _Throttle(threading.local):
    """The last 429 this thread saw (ReplicateError drops Retry-After and the body retry_after)."""

    retry_after: float | None = None


_throttle = _Throttle()
_RESETS_IN = re.compile(r"resets in ~?(\d+(?:\.\d+)?)\s*s")


def retry_after_of(response: httpx.Response) -> float | None:
    """Read how long Replicate asks us to wait: header, body `retry_after`, or the detail text."""
    header = response.headers.get("retry-after", "").strip()
    if header.replace(".", "", 1).isdigit():
        return float(header)
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict):
        value = body.get("retry_after")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        match = _RESETS_IN.search(str(body.get("detail", "")))
        if match:
            return float(match.group(1))
    return None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (tens of ms), which every
    new account's client would otherwise pay on its first create."""
    return httpx.create_ssl_context()


class GuardedTransport(httpx.BaseTransport):
    """Give every request a timeout and remember 429 hints for the calling thread.

    replicate 1.0.7 sends prediction creates with no timeout at all, so a hung create would pin a
    worker forever; and its ReplicateError keeps neither Retry-After nor the body's retry_after.
    """

    def __init__(self, timeout: httpx.Timeout, max_connections: int) -> None:
        self._timeout = timeout.as_dict()
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._inner = httpx.HTTPTransport(verify=_tls_context(), limits=limits)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: given.get(key) if given.get(key) is not None else default
            for key, default in self._timeout.items()
        }
        response = metrics.observe_replicate_call(self._inner.handle_request, request)
        if response.status_code == 429:
            response.read()
            _throttle.retry_after = retry_after_of(response)
        return response

    def close(self) -> None:
        self._inner.close()


# How long an account whose token Replicate answered 401 is refused without asking again.
REJECTED_SECONDS = 60.0
# Rejections remembered at most (oldest dropped first), so a storm of bad tokens stays bounded.
MAX_REJECTED = 100_000


class ClientPool:
    """One replicate.Client per token (bounded LRU), never the module-level default client.

    Clients of accounts with no work left are dropped (`forget`); an account whose token
    Replicate answered 401 is refused for a while (`reject`), keyed by its hash, never its token.
    """

    def __init__(self, base_url: str, *, max_clients: int = 256, max_connections: int = 100,
                 timeout: httpx.Timeout | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._base_url = base_url
        self._max = max_clients
        self._max_connections = max_connections
        self._timeout = timeout or httpx.Timeout(30.0, connect=5.0, pool=10.0)
        self._clients: OrderedDict[str, replicate.Client] = OrderedDict()
        self._rejected: OrderedDict[str, float] = OrderedDict()
        self._on_rejected: list[Callable[[str], None]] = []
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, token: str) -> replicate.Client:
        """Return the client for this token, building (and warming) it once; raise
        TokenRejected while Replicate's last word on the token was a 401."""
        key = account_key(token)
        with self._lock:
            remaining = self._rejection_left(key)
            if remaining is not None:
                raise TokenRejected(remaining)
            client = self._clients.get(key)
            if client is None:
                client = self._build(token)
                self._clients[key] = client
                while len(self._clients) > self._max:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
            return client

    def forget(self, account: str) -> None:
        """Drop the account's client (its work ended); a later call builds a new one."""
        with self._lock:
            self._clients.pop(account, None)

    def cached(self) -> int:
        """How many clients are kept."""
        with self._lock:
            return len(self._clients)

    def on_rejected(self, callback: Callable[[str], None]) -> None:
        """Call back with the account (outside the lock) when its token gets a 401."""
        self._on_rejected.append(callback)

    def reject(self, account: str) -> None:
        """Replicate answered 401 for this account: refuse its work for REJECTED_SECONDS."""
        with self._lock:
            self._clients.pop(account, None)
            self._rejected.pop(account, None)
            self._rejected[account] = self._clock() + REJECTED_SECONDS
            while len(self._rejected) > MAX_REJECTED:
                self._rejected.popitem(last=False)
        log.warning("replicate rejected the token of account=%s (401); refusing it for %.0fs",
                    account, REJECTED_SECONDS)
        for callback in self._on_rejected:
            try:
                callback(account)
            except Exception:  # noqa: BLE001 - the item still fails as unauthorized
                log.exception("handling the rejection of account=%s failed", account)

    def rejected_for(self, account: str) -> float | None:
        """Seconds the account is still refused for, or None."""
        with self._lock:
            return self._rejection_left(account)

    def _rejection_left(self, account: str) -> float | None:
        """Caller holds the lock; expired entries are dropped (oldest first, they expire first)."""
        now = self._clock()
        while self._rejected and next(iter(self._rejected.values())) <= now:
            self._rejected.popitem(last=False)
        until = self._rejected.get(account)
        return None if until is None else until - now

    def _build(self, token: str) -> replicate.Client:
        transport = GuardedTransport(self._timeout, self._max_connections)
        client = replicate.Client(api_token=token, base_url=self._base_url, transport=transport)
        # The client builds its httpx client lazily without a lock: touching it here, under ours,
        # stops concurrent first calls from each building (and leaking) a pool of their own.
        _ = client._client  # noqa: SLF001
        return client


# --------------------------------------------------------------------------- running


@dataclass
class Attempt:
    """One prediction (or create that failed) made for a task."""

    model: str
    prediction_id: str | None = None
    status: str | None = None  # "creating": the POST may be in flight, its answer not stored
    error: str | None = None
    intent_at: float | None = None  # wall clock just before the create was sent
    input_sha256: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "prediction_id": self.prediction_id,
                "status": self.status, "error": self.error, "intent_at": self.intent_at,
                "input_sha256": self.input_sha256}

    def intent(self) -> Intent | None:
        """What this attempt was about to create, if its create was sent."""
        if self.intent_at is None or self.input_sha256 is None:
            return None
        return Intent(self.model, self.input_sha256, self.intent_at)


@dataclass
class Generated:
    """What a finished task produced."""

    prediction_id: str
    files: list[SavedFile]
    attempts: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True)
class Runtime:
    """The shared machinery a task runs on."""

    manager: ConcurrencyManager
    clients: ClientPool
    output_root: Path
    api_origin: str
    task_timeout: float
    poll_interval: float  # the longest pause between two polls of one prediction
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    sync_wait: int = MAX_SYNC_WAIT_SECONDS  # Prefer: wait=N on creates; 0 turns it off
    reconcile_settle: float = 2.0  # a lost create may show up in the listing a moment later


@dataclass(frozen=True)
class Job:
    """One prediction to make and where its files go."""

    spec: ModelSpec
    input: dict[str, object]
    token: str = field(repr=False)
    dest_dir: Path
    stem: str

    @property
    def account(self) -> str:
        return account_key(self.token)

    @property
    def metric_label(self) -> str:
        """The model as metrics name it: non-curated models share one label (bounded series)."""
        return self.spec.id if self.spec.curated else "other"


def _never() -> bool:
    return False


def _ignore(_attempt: Attempt) -> None:
    return None


def _nothing_known() -> set[str]:
    return set()


@dataclass(frozen=True)
class Hooks:
    """How a durable job follows and steers one task.

    `on_intent` runs just before a create is sent (so a lost answer can be looked up, never paid
    twice), and raises instead when nothing may be sent (Suspended: the process stops or lost
    the job; GenerationError "canceled"); `on_created` runs as soon as a prediction exists (so
    its id is stored before anything else happens); `known_predictions` are ids other items
    already own (never adopted by a lookup); `should_cancel` is asked at every poll;
    `should_suspend` tells a stopping process to leave a running prediction for the next start
    to poll.
    """

    on_intent: Callable[[Attempt], None] = _ignore
    on_created: Callable[[Attempt], None] = _ignore
    known_predictions: Callable[[], set[str]] = _nothing_known
    should_cancel: Callable[[], bool] = _never
    should_suspend: Callable[[], bool] = _never


NO_HOOKS = Hooks()


def generate(job: Job, rt: Runtime, attempts: list[Attempt] | None = None, *,
             hooks: Hooks = NO_HOOKS, resume: str | None = None,
             pending: Attempt | None = None) -> Generated:
    """Run one prediction within the account's limits, then download its outputs at once.

    With `resume`, the prediction already exists (created before a crash): it is polled, never
    created again. With `pending`, a create was sent but its answer never stored: it is looked
    up before anything is created.
    """
    attempts = attempts if attempts is not None else []
    deadline = rt.clock() + rt.task_timeout
    client = rt.clients.get(job.token)
    try:
        with rt.manager.slot(job.account, deadline):
            if resume is None:
                prediction = _create(client, job, rt, deadline, attempts, hooks, pending)
            else:
                prediction = SimpleNamespace(id=resume, status="starting")
            final = _await_terminal(client, job, rt, prediction, deadline, hooks,
                                    since=attempts[-1].intent_at if attempts else None)
    except DeadlineExceeded:
        raise GenerationError(
            "deadline_exceeded",
            f"no slot or create budget within the {rt.task_timeout:g} s task deadline",
        ) from None
    if attempts:
        attempts[-1].status = "succeeded"
    files = _download(final, job, rt, deadline)
    return Generated(prediction_id=final.id, files=files, attempts=attempts)


def _create(client: replicate.Client, job: Job, rt: Runtime, deadline: float,
            attempts: list[Attempt], hooks: Hooks, pending: Attempt | None = None) -> Any:
    """Create the prediction exactly once: 429s back off the whole account and retry; a create
    whose answer is lost or ambiguous is looked up before it is ever sent again."""
    if pending is not None:
        adopted = _settle(client, job, rt, deadline, pending, hooks)
        if adopted is not None:
            return adopted
    server_errors = 0
    while True:
        rt.manager.wait_for_create(job.account, deadline)
        attempt = Attempt(model=job.spec.ref, status="creating", intent_at=rt.clock(),
                          input_sha256=input_digest(job.input))
        attempts.append(attempt)
        try:
            hooks.on_intent(attempt)
        except BaseException:
            attempts.pop()  # refused (Suspended, canceled): never sent, so never an attempt
            raise
        prediction, definite = _send_create(client, job, rt, deadline, attempt)
        if prediction is not None:
            return _created(job, rt, attempt, prediction, hooks)
        if not definite:
            adopted = _settle(client, job, rt, deadline, attempt, hooks)
            if adopted is not None:
                return adopted
        if attempt.status == "throttled":
            continue  # the shared back-off paces the next try
        server_errors += 1
        _raise_after_too_many(server_errors, attempt.error or "the create failed",
                              _status_of(attempt))
        rt.sleep(min(_retry_pause(server_errors), max(0.0, deadline - rt.clock())))


def _send_create(client: replicate.Client, job: Job, rt: Runtime, deadline: float,
                 attempt: Attempt) -> tuple[Any, bool]:
    """POST the create. Returns (prediction, True) on success, (None, True) when it surely made
    nothing, (None, False) when it may have made a prediction whose answer was lost."""
    try:
        if job.spec.version:  # a pinned version is created by version id
            return client.predictions.create(
                version=job.spec.version, input=job.input, wait=_sync_wait(rt, deadline)), True
        return client.models.predictions.create(
            model=job.spec.ref, input=job.input, wait=_sync_wait(rt, deadline)), True
    except ReplicateError as exc:
        attempt.error = _describe(exc, job.token)
        if (exc.status or 0) >= 500:
            # A 502/504 can come back after the prediction was made.
            return None, False
        attempt.status = "throttled" if exc.status == 429 else "not_created"
        _handle_create_error(exc, job, rt)
        return None, True
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # Nothing reached Replicate, so nothing was created.
        attempt.status = "not_created"
        attempt.error = f"could not reach Replicate: {type(exc).__name__}"
        return None, True
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # Sent, and the answer lost or not a prediction (ValueError covers pydantic's).
        attempt.error = f"lost Replicate's answer to a create: {type(exc).__name__}"
        return None, False


def _created(job: Job, rt: Runtime, attempt: Attempt, prediction: Any, hooks: Hooks) -> Any:
    attempt.prediction_id = prediction.id
    attempt.status = prediction.status
    attempt.error = None
    hooks.on_created(attempt)
    rt.manager.create_accepted(job.account)
    metrics.prediction_created(job.metric_label)
    log.info("prediction %s model=%s account=%s", prediction.id, job.spec.ref, job.account)
    return prediction


def _sync_wait(rt: Runtime, deadline: float) -> int | bool:
    """Seconds Replicate may hold the create until the prediction ends (False: do not hold)."""
    seconds = int(min(rt.sync_wait, MAX_SYNC_WAIT_SECONDS, deadline - rt.clock() - 1.0))
    return seconds if seconds >= 1 else False


def _status_of(attempt: Attempt) -> int | None:
    match = re.match(r"Replicate answered (\d{3})", attempt.error or "")
    return int(match.group(1)) if match else None


# One lookup at a time in this process, so two items with the same input never adopt one
# prediction between the lookup and storing its id.
_adoption = threading.Lock()


def _settle(client: replicate.Client, job: Job, rt: Runtime, deadline: float, attempt: Attempt,
            hooks: Hooks) -> Any | None:
    """Resolve an attempt whose create answer was lost: adopt its prediction and return it, or
    return None when the listing proves none was made; raise when that cannot be known."""
    intent = attempt.intent()
    if intent is None:
        return None  # never sent
    with _adoption:
        lookup = _look_up(client, job, rt, deadline, intent, hooks)
        if isinstance(lookup, Absent) and rt.reconcile_settle > 0:
            rt.sleep(min(rt.reconcile_settle, max(0.0, deadline - rt.clock())))
            lookup = _look_up(client, job, rt, deadline, intent, hooks)
        if isinstance(lookup, Found):
            log.info("adopted prediction %s (%s) after a lost create answer",
                     lookup.prediction_id, lookup.status)
            # Polled once at least: the listing does not carry the whole prediction.
            return _created(job, rt, attempt, SimpleNamespace(id=lookup.prediction_id,
                                                              status="starting"), hooks)
    if isinstance(lookup, Unresolvable):
        attempt.status = "uncertain"
        raise GenerationError("create_uncertain", f"a create's answer was lost and whether it "
                              f"made a prediction cannot be known: {lookup.reason}; not created "
                              "again, to avoid paying twice")
    attempt.status = "not_created"
    return None


def _look_up(client: replicate.Client, job: Job, rt: Runtime, deadline: float, intent: Intent,
             hooks: Hooks) -> Lookup:
    """The listing's answer, retrying failed listings until the task's deadline."""
    failures = 0
    while True:
        try:
            return find_prediction(
                client, intent, now=rt.clock(), exclude=hooks.known_predictions(),
                pace=lambda: rt.manager.wait_for_poll(job.account, deadline))
        except ValueError as exc:
            return Unresolvable(f"the prediction listing could not be read: {exc}")
        except (ReplicateError, httpx.HTTPError) as exc:
            failures += 1
            log.warning("listing predictions failed (%d in a row): %s", failures,
                        type(exc).__name__)
            pause = min(_retry_pause(failures), deadline - rt.clock())
            if pause <= 0:
                return Unresolvable("the prediction listing kept failing until the deadline")
            rt.sleep(pause)


def _handle_create_error(exc: ReplicateError, job: Job, rt: Runtime) -> None:
    """A create Replicate surely refused: back off on 429, raise on everything else."""
    status = exc.status or 0
    if status == 429:
        retry_after = _throttle.retry_after or _retry_after_from_detail(exc) or 5.0
        _throttle.retry_after = None
        rt.manager.throttled(job.account, min(max(retry_after, 0.5), 60.0))
        log.warning("replicate throttled creates for account=%s; backing off %.1fs",
                    job.account, retry_after)
        return
    if status == 401:
        rt.clients.reject(job.account)
    if status in NOT_RETRIED:
        raise GenerationError(NOT_RETRIED[status], _describe(exc, job.token),
                              upstream_status=status)
    raise GenerationError("upstream_error", _describe(exc, job.token), upstream_status=status)


def _raise_after_too_many(count: int, message: str, status: int | None = None) -> None:
    if count >= MAX_SERVER_ERRORS:
        raise GenerationError("upstream_unavailable", f"{message} (after {count} tries)",
                              upstream_status=status)


def _retry_pause(count: int) -> float:
    """Exponential pause before retrying a create that did not reach or was refused by Replicate."""
    return float(min(0.5 * 2**count, 10.0))


def _retry_after_from_detail(exc: ReplicateError) -> float | None:
    match = _RESETS_IN.search(exc.detail or "")
    return float(match.group(1)) if match else None


def _describe(exc: ReplicateError, token: str | None) -> str:
    """Replicate's error as a message safe to return, store and log."""
    parts = [f"Replicate answered {exc.status}"]
    if exc.title:
        parts.append(exc.title)
    if exc.detail:
        parts.append(exc.detail.strip())
    return redact_upstream(": ".join(parts), token)


# Replicate's token shape, and credentials quoted back after "Bearer"/"Token" (whatever shape).
TOKEN_SHAPED = re.compile(r"r8_[\w-]{8,}")
_QUOTED_CREDENTIAL = re.compile(r"(?i)\b(bearer|token)(\s+|\s*[=:]\s*)[^\s\"',;]{8,}")


def redact_upstream(text: str, token: str | None) -> str:
    """Upstream text without the calling token (as sent or URL-encoded) or anything token-shaped."""
    if token:
        for spelling in {token, quote(token, safe="")}:
            text = text.replace(spelling, "[redacted]")
    text = TOKEN_SHAPED.sub("r8_[redacted]", text)
    return _QUOTED_CREDENTIAL.sub(r"\1\2[redacted]", text)


def _await_terminal(client: replicate.Client, job: Job, rt: Runtime, prediction: Any,
                    deadline: float, hooks: Hooks = NO_HOOKS, since: float | None = None) -> Any:
    """Poll (paced) until the prediction ends; past the deadline or on request, cancel it.
    `since` is when its create was sent: the older it is, the less often it is polled."""
    errors = 0
    since = rt.clock() if since is None else since
    while prediction.status not in TERMINAL:
        if hooks.should_cancel():
            _cancel(client, job, rt, prediction.id)
            raise GenerationError("canceled", f"prediction {prediction.id} was canceled with "
                                  "its job", prediction_id=prediction.id)
        if hooks.should_suspend():
            raise Suspended
        pause = min(_poll_pause(rt, since), deadline - rt.clock())
        if pause <= 0:
            _cancel(client, job, rt, prediction.id)
            metrics.prediction_finished(job.metric_label, "deadline_exceeded", rt.clock() - since)
            raise GenerationError(
                "deadline_exceeded",
                f"prediction {prediction.id} did not finish within {rt.task_timeout:g} s "
                "and was canceled", prediction_id=prediction.id)
        rt.sleep(pause)
        try:
            rt.manager.wait_for_poll(job.account, deadline)
            prediction = client.predictions.get(prediction.id)
            errors = 0
        except DeadlineExceeded:
            continue
        except ReplicateError as exc:
            if exc.status == 401:
                rt.clients.reject(job.account)
            if exc.status in (401, 404):
                # The prediction is gone or not this token's: polling again cannot help.
                raise GenerationError(NOT_RETRIED[exc.status], f"polling {prediction.id}: "
                                      f"{_describe(exc, job.token)}", prediction_id=prediction.id,
                                      upstream_status=exc.status) from None
            errors += 1
            log.warning("poll of %s failed (%d in a row): %s", prediction.id, errors,
                        _describe(exc, job.token))
        except Exception as exc:  # noqa: BLE001 - a failed poll costs nothing; try again
            errors += 1
            log.warning("poll of %s failed (%d in a row): %s", prediction.id, errors,
                        type(exc).__name__)
    metrics.prediction_finished(job.metric_label, str(prediction.status), rt.clock() - since)
    return _check_terminal(prediction, job.token, curated=job.spec.curated)


def _poll_pause(rt: Runtime, since: float) -> float:
    """Poll young predictions often and old ones at a fraction of their age."""
    age = max(0.0, rt.clock() - since)
    return min(rt.poll_interval, max(MIN_POLL_SECONDS, age * POLL_AGE_FRACTION))


def _check_terminal(prediction: Any, token: str | None, *, curated: bool = True) -> Any:
    """Turn a failed, canceled or empty prediction into a GenerationError."""
    pid = prediction.id
    if prediction.status == "succeeded":
        empty = (not output_sources(prediction.output) if curated
                 else is_empty(prediction.output))
        if empty:
            raise GenerationError("empty_output", f"prediction {pid} succeeded with no output "
                                  "(often a safety filter)", prediction_id=pid)
        return prediction
    error = redact_upstream(str(prediction.error or prediction.status), token)
    if prediction.status == "failed":
        kind = "content_policy" if any(m in error for m in CONTENT_POLICY_MARKERS) else \
            "model_failed"
        raise GenerationError(kind, f"prediction {pid} failed: {error}", prediction_id=pid)
    raise GenerationError("canceled", f"prediction {pid} was {prediction.status} on Replicate",
                          prediction_id=pid)


def _cancel(client: replicate.Client, job: Job, rt: Runtime, prediction_id: str) -> None:
    """Best effort: stop paying for a prediction nobody will wait for."""
    try:
        # A shared 429 back-off may pause polls for a while; a cancel is worth waiting for.
        rt.manager.wait_for_poll(job.account, rt.clock() + CANCEL_WAIT_SECONDS)
        client.predictions.cancel(prediction_id)
        log.info("canceled prediction %s account=%s", prediction_id, job.account)
    except Exception as exc:  # noqa: BLE001 - the task fails either way; say so in the log
        log.warning("cancel of %s failed: %s", prediction_id, type(exc).__name__)


def _download(prediction: Any, job: Job, rt: Runtime, deadline: float) -> list[SavedFile]:
    """Download the outputs now: Replicate deletes them after an hour."""
    fallback = job.input.get("output_format")
    try:
        if not job.spec.curated:
            return save_any(
                prediction.output, job.dest_dir, job.stem, root=rt.output_root,
                deadline=max(deadline, rt.clock() + DOWNLOAD_GRACE_SECONDS),
                auth_token=job.token, auth_origin=rt.api_origin, clock=rt.clock)
        return save_outputs(
            output_sources(prediction.output), job.dest_dir, job.stem, root=rt.output_root,
            deadline=max(deadline, rt.clock() + DOWNLOAD_GRACE_SECONDS), auth_token=job.token,
            auth_origin=rt.api_origin, clock=rt.clock,
            fallback_ext=f".{fallback}" if isinstance(fallback, str) else None)
    except DownloadError as exc:
        raise GenerationError("download_failed", f"prediction {prediction.id} succeeded but "
                              f"its output could not be saved: "
                              f"{redact_upstream(str(exc), job.token)}",
                              prediction_id=prediction.id) from None
    except OSError as exc:
        raise GenerationError("storage_error", f"prediction {prediction.id} succeeded but "
                              f"writing its output failed: {exc.strerror}",
                              prediction_id=prediction.id) from None
