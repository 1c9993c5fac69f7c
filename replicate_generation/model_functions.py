"""One prediction's life: a slot, one create (never paid twice), polls, cancel, download.

No Flask. Every call goes through the account's client and limits (a lease in flight, a paced
token per create and poll); errors are `GenerationError`s whose kind maps to an HTTP status.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import replicate
from replicate.exceptions import ReplicateError

from replicate_generation import json_depth, metrics
from replicate_generation.clients import (
    ClientPool,
    account_key,
    create_headers,
    read_prediction,
    redact_upstream,
    resets_in,
    take_throttle_hint,
)
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.egress import Egress
from replicate_generation.errors import (
    DeadlineExceeded,
    GenerationError,
    OutputsNotSaved,
    Suspended,
)
from replicate_generation.limits.base import ANYONE, Turn
from replicate_generation.models.catalogue import ModelSpec
from replicate_generation.models.hardware import NO_TIME_PRICES, TimePrices
from replicate_generation.models.schemas import deployment_of
from replicate_generation.outputs import (
    DownloadError,
    OutputStorage,
    SavedFile,
    is_empty,
    output_sources,
    save_any,
    save_outputs,
)
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
DOWNLOAD_GRACE_SECONDS = 120.0
CANCEL_WAIT_SECONDS = 60.0
# Replicate holds a `Prefer: wait=N` create for at most 60 s.
MAX_SYNC_WAIT_SECONDS = 60
# Polls at this fraction of a prediction's age: soon seen once done, cheap while it runs long.
POLL_AGE_FRACTION = 0.05
MIN_POLL_SECONDS = 0.2
# Outputs nesting deeper are not saved (no model's files or text need it; a hostile one might).
MAX_OUTPUT_DEPTH = 32
# The longest prediction error kept and shown: a model's author writes it.
MAX_UPSTREAM_ERROR_CHARS = 2000
# Replicate refuses a Cancel-After shorter than this.
MIN_CANCEL_AFTER_SECONDS = 5


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
    billed_seconds: float | None = None  # Replicate's metrics.predict_time


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
    egress: Egress = field(default_factory=Egress)  # outputs: policy, bounds, each job's tally
    prices: TimePrices = NO_TIME_PRICES  # what a non-curated model costs per billed second
    storage: OutputStorage | None = None  # where outputs end up; None: the disk at output_root


@dataclass(frozen=True)
class Job:
    """One prediction to make and where its files go."""

    spec: ModelSpec
    input: dict[str, object]
    token: str = field(repr=False)
    dest_dir: Path
    stem: str
    turn: Turn = ANYONE  # its place among the account's waiters
    start_by: float | None = None  # wall clock: no create is sent after it (deadline_seconds)

    @property
    def account(self) -> str:
        return account_key(self.token)

    @property
    def metric_label(self) -> str:
        """The model as metrics name it: non-curated models share one label (bounded series)."""
        return self.spec.id if self.spec.curated else "other"


def _never() -> bool:
    return False


def _pass() -> None:
    return None


def _ignore(_attempt: Attempt) -> None:
    return None


def _nothing_known() -> set[str]:
    return set()


@dataclass(frozen=True)
class Hooks:
    """How a durable job follows and steers one task, so no create is ever paid twice."""

    on_intent: Callable[[Attempt], None] = _ignore  # before a create; raises if none may be sent
    on_created: Callable[[Attempt], None] = _ignore  # stores the id before anything else happens
    known_predictions: Callable[[], set[str]] = _nothing_known  # ids other items own: never adopted
    should_cancel: Callable[[], bool] = _never  # asked at every poll
    should_suspend: Callable[[], bool] = _never  # stopping: leave it for the next start to poll


NO_HOOKS = Hooks()


def generate(job: Job, rt: Runtime, attempts: list[Attempt] | None = None, *,
             hooks: Hooks = NO_HOOKS, resume: str | None = None,
             pending: Attempt | None = None) -> Generated:
    """Run one prediction within the account's limits, then download its outputs at once.

    `resume`: it exists, so it is only polled; `pending`: a lost create is looked up first.
    """
    attempts = attempts if attempts is not None else []
    deadline = rt.clock() + rt.task_timeout
    start_by = _start_by(job, rt)
    # A prediction made (or maybe made, `pending`) waits for its slot whatever the start deadline.
    slot_by = deadline if resume or pending else _earliest(deadline, start_by)
    client = rt.clients.get(job.token)
    in_slot = False
    try:
        with rt.manager.slot(job.account, slot_by, job.turn) as free_slot:
            in_slot = True
            if resume is None:
                prediction = _create(client, job, rt, deadline, attempts, hooks, pending,
                                     start_by, ended=free_slot)
            else:
                prediction = SimpleNamespace(id=resume, status="starting")
            final = _await_terminal(client, job, rt, prediction, deadline, hooks,
                                    since=attempts[-1].intent_at if attempts else None)
    except DeadlineExceeded:
        if not in_slot and slot_by < deadline:
            raise _expired("the start deadline passed before it got a slot") from None
        raise GenerationError(
            "deadline_exceeded",
            f"no slot or create budget within the {rt.task_timeout:g} s task deadline",
        ) from None
    if attempts:
        attempts[-1].status = "succeeded"
    files = _download(final, job, rt, deadline)
    return Generated(prediction_id=final.id, files=files, attempts=attempts,
                     billed_seconds=_billed_seconds(final))


def _start_by(job: Job, rt: Runtime) -> float | None:
    """The job's start deadline on rt.clock() (it is kept in wall-clock seconds)."""
    return None if job.start_by is None else job.start_by - time.time() + rt.clock()


def _earliest(deadline: float, start_by: float | None) -> float:
    return deadline if start_by is None else min(deadline, start_by)


def _expired(why: str) -> GenerationError:
    return GenerationError("expired", f"not created within deadline_seconds ({why})")


def _create(client: replicate.Client, job: Job, rt: Runtime, deadline: float,
            attempts: list[Attempt], hooks: Hooks, pending: Attempt | None = None,
            start_by: float | None = None, *, ended: Callable[[], None] = _pass) -> Any:
    """Create the prediction exactly once: 429s back off the whole account and retry; a create
    whose answer is lost or ambiguous is looked up before it is ever sent again. None is sent
    after `start_by` (rt.clock()): GenerationError("expired") instead."""
    if pending is not None:
        adopted = _settle(client, job, rt, deadline, pending, hooks)
        if adopted is not None:
            return adopted
    server_errors = 0
    while True:
        _wait_for_create(job, rt, deadline, start_by)
        if start_by is not None and rt.clock() >= start_by:
            raise _expired("the start deadline passed before its create was sent")
        attempt = Attempt(model=job.spec.ref, status="creating", intent_at=rt.clock(),
                          input_sha256=input_digest(job.input))
        attempts.append(attempt)
        try:
            hooks.on_intent(attempt)
        except BaseException:
            attempts.pop()  # refused (Suspended, canceled): never sent, so never an attempt
            raise
        prediction, definite = _send_create(client, job, rt, deadline, attempt, start_by)
        if prediction is not None:
            return _created(job, rt, attempt, prediction, hooks, ended)
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


def _wait_for_create(job: Job, rt: Runtime, deadline: float, start_by: float | None) -> None:
    """A create token by the task deadline, or by the start deadline when that comes first."""
    try:
        rt.manager.wait_for_create(job.account, _earliest(deadline, start_by))
    except DeadlineExceeded:
        if start_by is not None and start_by < deadline:
            raise _expired("the start deadline passed before its turn to create") from None
        raise


def _cancel_after(rt: Runtime, start_by: float | None) -> int | None:
    """Whole seconds left until the start deadline, for Replicate's Cancel-After (at least 5)."""
    if start_by is None:
        return None
    return max(MIN_CANCEL_AFTER_SECONDS, int(start_by - rt.clock()))


def _send_create(client: replicate.Client, job: Job, rt: Runtime, deadline: float,
                 attempt: Attempt, start_by: float | None = None) -> tuple[Any, bool]:
    """POST the create (with Cancel-After when there is a start deadline: Replicate aborts it
    unbilled if it has not started by then). Returns (prediction, True) on success, (None, True)
    when it surely made nothing, (None, False) when it may have made a prediction whose answer
    was lost."""
    cancel_after = _cancel_after(rt, start_by)
    wait = _sync_wait(rt, deadline, cancel_after)
    headers = {} if cancel_after is None else {"Cancel-After": f"{cancel_after}s"}
    try:
        with create_headers(headers):
            if job.spec.version:  # a pinned version is created by version id
                return client.predictions.create(
                    version=job.spec.version, input=job.input, wait=wait), True
            deployment = deployment_of(job.spec)
            if deployment is not None:  # its current release runs, on its own hardware
                return client.deployments.predictions.create(
                    deployment, input=job.input, wait=wait), True
            return client.models.predictions.create(
                model=job.spec.ref, input=job.input, wait=wait), True
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
    except (httpx.HTTPError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        # Sent, and the answer lost or not a prediction (ValueError covers pydantic's).
        attempt.error = f"lost Replicate's answer to a create: {type(exc).__name__}"
        return None, False


def _created(job: Job, rt: Runtime, attempt: Attempt, prediction: Any, hooks: Hooks,
             ended: Callable[[], None] = _pass) -> Any:
    """Record a new prediction's id; one that a held create saw end first calls `ended` (its
    slot is free before the write, so the account's next create need not wait on it)."""
    if prediction.status in TERMINAL:
        ended()
    attempt.prediction_id = prediction.id
    attempt.status = prediction.status
    attempt.error = None
    hooks.on_created(attempt)
    rt.manager.create_accepted(job.account)
    metrics.prediction_created(job.metric_label)
    log.info("prediction %s model=%s account=%s", prediction.id, job.spec.ref, job.account)
    return prediction


def _sync_wait(rt: Runtime, deadline: float, cancel_after: int | None = None) -> int | bool:
    """Seconds Replicate may hold the create until the prediction ends (False: do not hold);
    shorter than its Cancel-After, so the answer is never `aborted` (replicate 1.0.7 cannot
    read that status)."""
    longest = min(rt.sync_wait, MAX_SYNC_WAIT_SECONDS, deadline - rt.clock() - 1.0)
    if cancel_after is not None:
        longest = min(longest, cancel_after - 1)
    seconds = int(longest)
    return seconds if seconds >= 1 else False


def _status_of(attempt: Attempt) -> int | None:
    match = re.match(r"Replicate answered (\d{3})", attempt.error or "")
    return int(match.group(1)) if match else None


# One lookup at a time: two items with one input never adopt the same prediction.
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
        retry_after = take_throttle_hint() or resets_in(exc.detail or "") or 5.0
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


def _describe(exc: ReplicateError, token: str | None) -> str:
    """Replicate's error as a message safe to return, store and log."""
    parts = [f"Replicate answered {exc.status}"]
    if exc.title:
        parts.append(exc.title)
    if exc.detail:
        parts.append(exc.detail.strip())
    return _bounded(redact_upstream(": ".join(parts), token))


def _bounded(text: str) -> str:
    """Upstream text as kept and shown: an excerpt when it is long (a model writes its errors)."""
    if len(text) <= MAX_UPSTREAM_ERROR_CHARS:
        return text
    return f"{text[:MAX_UPSTREAM_ERROR_CHARS]}... ({len(text):,} characters in all)"


def _await_terminal(client: replicate.Client, job: Job, rt: Runtime, prediction: Any,
                    deadline: float, hooks: Hooks = NO_HOOKS, since: float | None = None) -> Any:
    """Poll (paced) until the prediction ends; past the deadline or on request, cancel it.
    `since` is when its create was sent: the older it is, the less often it is polled."""
    errors = 0
    since = rt.clock() if since is None else since
    while prediction.status not in TERMINAL:
        if hooks.should_cancel():
            billed = _cancel(client, job, rt, prediction.id)
            raise GenerationError("canceled", f"prediction {prediction.id} was canceled with "
                                  "its job", prediction_id=prediction.id, billed_seconds=billed)
        if hooks.should_suspend():
            raise Suspended
        pause = min(_poll_pause(rt, since), deadline - rt.clock())
        if pause <= 0:
            raise _past_deadline(client, job, rt, prediction.id, since)
        rt.sleep(pause)
        try:
            rt.manager.wait_for_poll(job.account, deadline)
            prediction = read_prediction(client, prediction.id)
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


def _past_deadline(client: replicate.Client, job: Job, rt: Runtime, prediction_id: str,
                   since: float) -> GenerationError:
    """Cancel a prediction the task can no longer wait for; return the error to raise."""
    billed = _cancel(client, job, rt, prediction_id)
    metrics.prediction_finished(job.metric_label, "deadline_exceeded", rt.clock() - since)
    return GenerationError(
        "deadline_exceeded",
        f"prediction {prediction_id} did not finish within {rt.task_timeout:g} s "
        "and was canceled", prediction_id=prediction_id, billed_seconds=billed)


def _billed_seconds(prediction: Any) -> float | None:
    """What Replicate bills the prediction for, when it says (metrics.predict_time)."""
    seconds = (getattr(prediction, "metrics", None) or {}).get("predict_time")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
        return float(seconds)
    return None


def _poll_pause(rt: Runtime, since: float) -> float:
    """Poll young predictions often and old ones at a fraction of their age."""
    age = max(0.0, rt.clock() - since)
    return min(rt.poll_interval, max(MIN_POLL_SECONDS, age * POLL_AGE_FRACTION))


def _check_terminal(prediction: Any, token: str | None, *, curated: bool = True) -> Any:
    """Turn a failed, canceled or empty prediction into a GenerationError (with the seconds
    Replicate billed it)."""
    pid, billed = prediction.id, _billed_seconds(prediction)
    if prediction.status == "succeeded":
        if json_depth.too_deep(prediction.output, MAX_OUTPUT_DEPTH):
            raise GenerationError("download_failed", f"prediction {pid} succeeded but its output "
                                  f"nests deeper than {MAX_OUTPUT_DEPTH} levels and was not "
                                  "saved; Replicate keeps it for an hour", prediction_id=pid,
                                  billed_seconds=billed)
        empty = (not output_sources(prediction.output) if curated
                 else is_empty(prediction.output))
        if empty:
            raise GenerationError("empty_output", f"prediction {pid} succeeded with no output "
                                  "(often a safety filter)", prediction_id=pid,
                                  billed_seconds=billed)
        return prediction
    if prediction.status == "aborted":  # its Cancel-After passed before it started: unbilled
        raise GenerationError("expired", f"prediction {pid} did not start within "
                              "deadline_seconds; Replicate aborted it unbilled",
                              prediction_id=pid)
    error = _bounded(redact_upstream(str(prediction.error or prediction.status), token))
    if prediction.status == "failed":
        kind = "content_policy" if any(m in error for m in CONTENT_POLICY_MARKERS) else \
            "model_failed"
        raise GenerationError(kind, f"prediction {pid} failed: {error}", prediction_id=pid,
                              billed_seconds=billed)
    raise GenerationError("canceled", f"prediction {pid} was {prediction.status} on Replicate",
                          prediction_id=pid, billed_seconds=billed)


def _cancel(client: replicate.Client, job: Job, rt: Runtime,
            prediction_id: str) -> float | None:
    """Best effort: stop paying for a prediction nobody will wait for; the seconds Replicate
    billed it, when its answer says."""
    try:
        # A shared 429 back-off may pause polls for a while; a cancel is worth waiting for.
        rt.manager.wait_for_poll(job.account, rt.clock() + CANCEL_WAIT_SECONDS)
        canceled = client.predictions.cancel(prediction_id)
        log.info("canceled prediction %s account=%s", prediction_id, job.account)
    except Exception as exc:  # noqa: BLE001 - the task fails either way; say so in the log
        log.warning("cancel of %s failed: %s", prediction_id, type(exc).__name__)
        return None
    return _billed_seconds(canceled)


def _download(prediction: Any, job: Job, rt: Runtime, deadline: float) -> list[SavedFile]:
    """Download the outputs now (Replicate deletes them after an hour), under the egress policy
    and within the prediction's and job's bounds; a failure keeps the files saved before it."""
    fallback = job.input.get("output_format")
    options: dict[str, Any] = {
        "root": rt.output_root, "deadline": max(deadline, rt.clock() + DOWNLOAD_GRACE_SECONDS),
        "auth_token": job.token, "auth_origin": rt.api_origin, "clock": rt.clock,
        "policy": rt.egress.policy, "max_bytes": rt.egress.bounds.max_file_bytes,
        "storage": rt.storage}
    try:
        with rt.egress.budget(job.dest_dir) as budget:
            if not job.spec.curated:
                return save_any(prediction.output, job.dest_dir, job.stem, budget=budget,
                                **options)
            return save_outputs(
                output_sources(prediction.output), job.dest_dir, job.stem, budget=budget,
                fallback_ext=f".{fallback}" if isinstance(fallback, str) else None, **options)
    except DownloadError as exc:
        what = "was refused" if exc.refused else "could not be saved"
        raise OutputsNotSaved("output_refused" if exc.refused else "download_failed",
                              f"prediction {prediction.id} succeeded but its output {what}: "
                              f"{redact_upstream(str(exc), job.token)}",
                              prediction_id=prediction.id,
                              files=tuple(f.relative for f in exc.saved)) from None
    except OSError as exc:
        raise GenerationError("storage_error", f"prediction {prediction.id} succeeded but "
                              f"writing its output failed: {exc.strerror}",
                              prediction_id=prediction.id) from None
