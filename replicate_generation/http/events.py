"""GET /jobs/<id>/events and GET /events: a job's (or every job the caller may see) changes as
Server-Sent Events, read from the store's event log after a Last-Event-ID, so a client that
reconnects misses nothing and sees nothing twice, whichever worker or replica did the work.

A stream holds a gunicorn thread: a process serves EVENT_STREAMS_PER_PROCESS at most (half its
threads), a caller EVENT_STREAMS_PER_CALLER; beyond either, 429. A stream ends after
EVENT_STREAM_MAX_SECONDS (the client resumes), and a job's stream after the job's end.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request

from replicate_generation.errors import InvalidRequest, StoreBusy, StoreUnavailable
from replicate_generation.http import context
from replicate_generation.http.auth import Caller, owned_job, require_key
from replicate_generation.http.errors import ApiError
from replicate_generation.jobs.events import READ_BATCH, Event, EventLog, Scope
from replicate_generation.jobs.stream_wakeups import StreamWakeups
from replicate_generation.settings import Settings

log = logging.getLogger(__name__)
events_bp = Blueprint("events", __name__)

# The store is re-read this often even without a wake-up: a lost one delays, never loses.
REREAD_SECONDS = 2.0
# What EventSource waits before reconnecting (the `retry:` field).
RECONNECT_MS = 2000
# An id as the stream sent it: digits, within PostgreSQL's BIGINT.
EVENT_ID = re.compile(r"\A[0-9]{1,18}\Z")
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamSlots:
    """Open streams of this process, in all and per caller."""

    def __init__(self, per_process: int, per_caller: int) -> None:
        self._per_process = per_process
        self._per_caller = per_caller
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def take(self, caller: str) -> Callable[[], None]:
        """Hold a slot for `caller`; 429 if none is free. Returns its release (once only)."""
        with self._lock:
            if sum(self._open.values()) >= self._per_process:
                raise _busy("This server has as many event streams open as it serves "
                            "(EVENT_STREAMS_PER_PROCESS); retry shortly")
            if self._open.get(caller, 0) >= self._per_caller:
                raise _busy(f"You have {self._per_caller} event streams open, the most a "
                            "caller may (EVENT_STREAMS_PER_CALLER); close one first")
            self._open[caller] = self._open.get(caller, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._open[caller] -= 1
                if not self._open[caller]:
                    del self._open[caller]

        return release


@dataclass(frozen=True)
class Pacing:
    heartbeat: float
    lifetime: float
    reread: float = REREAD_SECONDS


def register(app: Flask, settings: Settings) -> None:
    app.extensions["event_slots"] = StreamSlots(settings.event_streams_per_process,
                                                settings.event_streams_per_caller)
    app.register_blueprint(events_bp)


@events_bp.get("/jobs/<job_id>/events")
@require_key()
def job_events(job_id: str) -> Response:
    """The job's events from the start (or after Last-Event-ID), until its end."""
    job = owned_job(job_id)
    scope = Scope(job_id=job.id)
    after = _last_event_id()
    events = context.runner().store.events
    if job.terminal and not events.after(scope, after or 0, 1):
        return Response(status=204, headers=_HEADERS)  # EventSource stops reconnecting
    return _stream(scope, after or 0, until_job_end=True)


@events_bp.get("/events")
@require_key()
def all_events() -> Response:
    """Events of every job the caller may see, from now (or after Last-Event-ID)."""
    scope = _scope_of(g.caller)
    after = _last_event_id()
    if after is None:
        after = context.runner().store.events.last_id(scope)
    return _stream(scope, after, until_job_end=False)


def _scope_of(caller: Caller) -> Scope:
    """GET /jobs's rule: the admin sees every job, a key its own, a token its account's."""
    if caller.admin:
        return Scope()
    if caller.key is not None:
        return Scope(key_id=caller.key.id)
    if caller.account is None:
        raise ApiError(401, "No valid API key provided")
    return Scope(account=caller.account)


def _slot_name(caller: Caller) -> str:
    if caller.admin:
        return "admin"
    if caller.key is not None:
        return f"key:{caller.key.id}"
    return f"account:{caller.account}"


def _last_event_id() -> int | None:
    """Last-Event-ID (EventSource sends it when it reconnects), else ?last_event_id=; each
    checked when given."""
    header = _event_id("Last-Event-ID", request.headers.get("Last-Event-ID"))
    query = _event_id("last_event_id", request.args.get("last_event_id"))
    return header if header is not None else query


def _event_id(field: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    if not EVENT_ID.match(raw):
        raise InvalidRequest(field, f"{field} must be the id of an event this service sent "
                             "(1 to 18 digits)")
    return int(raw)


def _stream(scope: Scope, after: int, *, until_job_end: bool) -> Response:
    settings = context.settings()
    runner = context.runner()
    slots: StreamSlots = current_app.extensions["event_slots"]
    release = slots.take(_slot_name(g.caller))
    pacing = Pacing(heartbeat=settings.event_heartbeat_seconds,
                    lifetime=settings.event_stream_max_seconds)
    frames = event_frames(runner.store.events, runner.stream_wakeups, scope, after, pacing,
                          until_job_end=until_job_end)
    response = Response(frames, mimetype="text/event-stream", headers=_HEADERS)
    response.call_on_close(release)  # the server closes it when the client goes, or at its end
    return response


def event_frames(events: EventLog, wakeups: StreamWakeups, scope: Scope, after: int,
                 pacing: Pacing, *, until_job_end: bool,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[str]:
    """The stream's text: the events after `after`, as they are stored; a comment line when
    nothing was sent for a heartbeat."""
    wakeups.listen()  # before the first read: nothing written after it goes unheard
    yield f"retry: {RECONNECT_MS}\n\n"
    cursor = after
    give_up = clock() + pacing.lifetime
    next_beat = clock() + pacing.heartbeat
    while not wakeups.closed:
        seen = wakeups.generation()  # before the read: a wake-up during it is not lost
        try:
            batch = events.after(scope, cursor)
        except (StoreUnavailable, StoreBusy) as exc:
            log.info("event stream ends: the job store is %s", type(exc).__name__)
            return  # the client reconnects with its Last-Event-ID
        for event in batch:
            cursor = event.id
            yield _frame(event)
            if until_job_end and event.kind == "job.finished":
                return
        now = clock()
        if batch:
            next_beat = now + pacing.heartbeat
            if len(batch) == READ_BATCH:
                continue
        if now >= give_up:
            return
        if now >= next_beat:
            yield ": keep-alive\n\n"
            next_beat = now + pacing.heartbeat
        wakeups.wait(seen, min(pacing.reread, next_beat - now, give_up - now))


def _frame(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.data}\n\n"


def _busy(message: str) -> ApiError:
    return ApiError(429, message, headers={"Retry-After": "5"}, error_type="too_many_streams")
