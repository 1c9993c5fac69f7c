"""Durable jobs, recorded as they run: a crash or restart loses nothing and pays for nothing twice.

A resumed item with a prediction id is polled, never created again. Users' tokens live only in
memory (`AccountMemory`): an orphaned user job resumes at its owner's next authenticated request.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from replicate_generation import metrics
from replicate_generation.backends import job_store_target, jobs_backend, limits_backend
from replicate_generation.clients import account_key, read_prediction
from replicate_generation.errors import (
    GenerationError,
    InvalidRequest,
    QueueFull,
    ShuttingDown,
    StoreBusy,
    StoreUnavailable,
    Suspended,
    TokenRejected,
)
from replicate_generation.generation import Generator, Resume, Task, TaskResult, execute
from replicate_generation.jobs.accounts import AccountMemory
from replicate_generation.jobs.helping import Helping
from replicate_generation.jobs.maintenance import Maintenance
from replicate_generation.jobs.notifier import WebhookNotifier
from replicate_generation.jobs.retention import bounds_for
from replicate_generation.jobs.rows import (
    CANCEL_UNCONFIRMED,
    ItemOutcome,
    ItemRow,
    JobRow,
    NewJob,
)
from replicate_generation.jobs.spend import Budget
from replicate_generation.jobs.store import JobStore
from replicate_generation.jobs.stream_wakeups import StreamWakeups
from replicate_generation.jobs.task_items import TaskItems
from replicate_generation.jobs.windows import ItemWindows, window_size
from replicate_generation.limits.base import Turn
from replicate_generation.model_functions import TERMINAL, Attempt, Hooks
from replicate_generation.models.validation import resolve_model
from replicate_generation.observability import (
    bind_request_id,
    current_request_id,
    unbind_request_id,
)
from replicate_generation.outputs.storage import OutputStorage
from replicate_generation.reconcile import INPUT_RETENTION_SECONDS
from replicate_generation.request_parsing import check_expanded_size
from replicate_generation.settings import Settings
from replicate_generation.sqlite_db import patient_writes
from replicate_generation.token_checks import open_token_checks

log = logging.getLogger(__name__)

# How long a canceled item keeps asking Replicate until its prediction is seen to stop.
CANCEL_CONFIRM_SECONDS = 30.0
# A synchronous request re-reads its job at least this often (wake-ups are hints), and no
# more often than the second, though every item of every job wakes it.
WAIT_REREAD_S = 0.5
WAIT_MIN_REREAD_S = 0.05


@dataclass(frozen=True)
class Submission:
    """A request turned into tasks, with what the job record needs besides them."""

    kind: str
    tasks: list[Task]
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_private: bool = False
    # The issued key submitting it: its jobs and Idempotency-Keys are its own.
    key_id: str | None = None
    # Who submits it, as the ledger names callers; the budgets it must fit (key, account).
    caller: str | None = None
    budgets: tuple[Budget, ...] = ()
    # Interactive work enters before batch work of the same account, in every process.
    interactive: bool = False
    # Wall-clock seconds after which none of its items is created (deadline_seconds).
    start_deadline: float | None = None


class JobRunner:
    """Runs and resumes jobs for this process; one per process, built by `create_app`."""

    def __init__(self, settings: Settings, generator: Generator | None = None, *,
                 origin: str = "service", clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.origin = origin
        self.generator = generator or Generator(settings)
        self.store = JobStore(job_store_target(settings), file_size=partial(
            _file_size, self.generator.storage))
        # Streams in every process hear of this process's events (and it of theirs).
        self.stream_wakeups = StreamWakeups(settings)
        self.store.events.on_commit(self.stream_wakeups.announce)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._clock = clock
        self._done: dict[str, threading.Event] = {}
        self._windows = ItemWindows()
        self._lock = threading.Lock()
        self._running = 0
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._suspending = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.accounts = AccountMemory(self.generator, settings.replicate_api_token, self._lock,
                                      self._wake)
        self.maintenance = Maintenance(
            self.store, settings, self.accounts, worker_id=self.worker_id, origin=origin,
            outputs=self.generator.storage, clock=clock, resume=self._resume,
            stopping=lambda: self._stopping, wake=self._wake, stop=self._stop)
        notifier = WebhookNotifier(self.store, settings, clock=clock, stop=self._stop)
        self.token_checks = open_token_checks(settings)
        self._watch_accounts()
        if settings.replicate_api_token:
            self.accounts.remember(settings.replicate_api_token)
            # Built now rather than by the first batch, whose items would all wait on it.
            self.generator.runtime.clients.get(settings.replicate_api_token)
        self.store.owners.heartbeat(self.worker_id, clock())
        self.helping = Helping(self.store, self.accounts, worker_id=self.worker_id,
                               origin=origin, has_room=self._has_room, help_job=self.help,
                               running_here=self._windows.job_ids,
                               stopping=lambda: self._stopping or self._suspending,
                               stop=self._stop)
        self._threads = [
            threading.Thread(target=self.maintenance.run, name="jobs-maintain", daemon=True),
            threading.Thread(target=notifier.run, name="jobs-webhooks", daemon=True),
            threading.Thread(target=self.helping.run, name="jobs-help", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- submitting --------------------------------------------------------------------------

    def _watch_accounts(self) -> None:
        """The hooks that free an account's memory or its queue."""
        self.generator.dispatcher.on_idle(self.accounts.idle)
        self.generator.runtime.clients.on_rejected(self._fail_rejected_account)
        # Every process and replica refuses the token from now on, not only this one.
        self.generator.runtime.clients.on_rejected(self.token_checks.refuse)

    def _fail_rejected_account(self, account: str) -> None:
        """Replicate answered 401 for this account: its queued items fail now, unsent."""
        dropped = self.generator.dispatcher.discard(account)
        outcome = ItemOutcome(state="failed", error="Replicate rejected this API token (401); "
                              "not sent", error_type="replicate_unauthorized")
        jobs = self.store.owners.fail_queued_items(self.worker_id, account, outcome,
                                                   self._clock())
        log.info("account=%s rejected: %d queued items of %d jobs failed unsent", account,
                 dropped, len(jobs))
        helped = self._windows.drop_account(account)
        # Items claimed from other processes' jobs go back: their owners fail them.
        self.store.claims.give_back(self.worker_id, helped)
        for job_id in jobs:
            self._windows.drop(job_id)
            self._close_if_done(job_id)

    def submit(self, token: str, submission: Submission) -> tuple[JobRow, bool]:
        """Record the job durably, then start it; returns (job, created)."""
        if self._stopping:
            raise ShuttingDown
        check_expanded_size(submission.tasks, self.settings.max_expanded_request_bytes)
        refused_for = self.generator.runtime.clients.rejected_for(account_key(token))
        if refused_for is not None:
            raise TokenRejected(refused_for)
        # Fail closed: the job store needs no look first, its own write below refuses.
        self.generator.limit_store.check()
        self.accounts.remember(token)
        request_id, _ = self.generator.new_request_dir()
        prices = self.generator.runtime.prices
        new = NewJob(id="job_" + secrets.token_urlsafe(16), account=account_key(token),
                     kind=submission.kind, request_id=request_id,
                     items=TaskItems(submission.tasks, current_request_id(), prices),
                     idempotency_key=_scoped(submission.idempotency_key, submission.key_id),
                     request_hash=submission.request_hash, webhook_url=submission.webhook_url,
                     webhook_private=submission.webhook_private, origin=self.origin,
                     key_id=submission.key_id, caller=submission.caller,
                     priority="interactive" if submission.interactive else "batch",
                     start_deadline=submission.start_deadline)
        size = window_size(self.generator.manager.limits().max_concurrent)
        job, created = self.store.create(new, self.worker_id, self._clock(),
                                         bounds=bounds_for(self.settings, token),
                                         budgets=submission.budgets, first_window=size)
        first = list(range(min(size, len(new.items))))
        if created and not first:
            self._close_if_done(job.id)
        elif created:
            try:
                self._start_window(job, token, first, size)
            except (QueueFull, ShuttingDown):
                # Refused as a whole (429/503): the caller retries; nothing was run or paid.
                self.store.retention.delete([job.id])
                raise
        return job, created

    def backends(self) -> dict[str, str]:
        return {"limits": limits_backend(self.settings), "jobs": jobs_backend(self.settings)}

    def dependencies(self) -> dict[str, dict[str, str]]:
        """Per role, the backend in use and "ok" or why it cannot be reached now."""
        statuses = {"limits": self.limits_status(), "jobs": _status_of(self.store.db.check)}
        return {role: {"backend": backend, "status": statuses[role]}
                for role, backend in self.backends().items()}

    def limits_status(self) -> str:
        return _status_of(self.generator.limit_store.check)

    def _queue(self, job: JobRow, token: str) -> None:
        """As the job's owner, claim and queue a first window of its open items (in input order),
        all or none; the rest wait in the store, for this or any process with room."""
        if not self._open_window(job, token, as_owner=True):
            self._close_if_done(job.id)

    def _has_room(self, account: str) -> bool:
        """Fewer of the account's items wait here than one window: room to take on more."""
        limit = self.generator.manager.limits().max_concurrent
        return self.generator.dispatcher.queued(account) < window_size(limit)

    def help(self, job: JobRow, token: str) -> bool:
        """Claim and queue a window of a job: another process's, or one of this process's own
        that no window here runs; False if nothing was left."""
        try:
            return self._open_window(job, token, as_owner=job.owner == self.worker_id)
        except (QueueFull, ShuttingDown):
            return False

    def _open_window(self, job: JobRow, token: str, *, as_owner: bool) -> bool:
        size = window_size(self.generator.manager.limits().max_concurrent)
        claimed = self.store.claims.claim(job.id, self.worker_id, size, fence=job.fence,
                                          as_owner=as_owner)
        if not claimed:
            return False
        self._start_window(job, token, claimed, size)
        return True

    def _start_window(self, job: JobRow, token: str, claimed: list[int], size: int) -> None:
        """Queue the first of these claimed items; the rest wait in the job's window here (of
        `size`, as the caller claimed them: the limits are not read again)."""
        turn = self._turn_of(job)
        first = self._windows.open((job.id, job.fence), job.account, claimed, size)
        try:
            self._push(job, first, token, turn)
        except (QueueFull, ShuttingDown):
            self._windows.drop(job.id)
            self.store.claims.give_back(self.worker_id, [job.id])
            raise

    def _push(self, job: JobRow, indexes: list[int], token: str, turn: Turn) -> None:
        if indexes:
            self.generator.dispatcher.submit_many(job.account, [
                partial(self._run_item, job, index, token, turn) for index in indexes], turn)

    def _hand_over(self, job: JobRow, token: str, turn: Turn) -> None:
        """An item of the job ended here: the next ones in its window take its place, claimed
        from the store a window at a time."""
        key = (job.id, job.fence)
        indexes, wanted = self._windows.next(key)
        if self._stopping or self._suspending:
            self._windows.drop(job.id)  # the rest resumes from the store at the next start
            return
        if wanted:
            claimed = self.store.claims.claim(job.id, self.worker_id, wanted, fence=job.fence,
                                              as_owner=job.owner == self.worker_id)
            indexes += self._windows.refilled(key, claimed)
        try:
            self._push(job, indexes, token, turn)
        except (QueueFull, ShuttingDown):
            self._windows.give_back(key, indexes)
            if self._windows.idle(key):
                # Nothing of it runs here to hand over again: a sweep resumes it from the store.
                self._windows.drop(job.id)
                log.warning("job %s waits in the store: this process is full", job.id)
                self.store.claims.give_back(self.worker_id, [job.id])
                self.store.owners.release_job(job.id, self.worker_id)

    def _turn_of(self, job: JobRow) -> Turn:
        """The job's place among its account's work: its priority, its caller and weight."""
        key = self.store.keys.get(job.key_id) if job.key_id is not None else None
        return Turn(interactive=job.priority == "interactive",
                    caller=job.key_id or job.caller or "", weight=key.weight if key else 1.0,
                    cap=key.max_concurrent if key else None)

    def _resume(self, job: JobRow, token: str) -> None:
        try:
            self._queue(job, token)
        except (QueueFull, ShuttingDown):
            # Safe in the store: handed back, a sweep in any process resumes it once there is room.
            log.warning("job %s waits in the store: this process is full or stopping", job.id)
            self.store.owners.release_job(job.id, self.worker_id)

    # -- running -----------------------------------------------------------------------------

    def _run_item(self, job: JobRow, index: int, token: str, turn: Turn) -> None:
        with self._lock:
            self._running += 1
        try:
            # No caller waits on an item: its writes wait out a busy file, never fail it.
            with patient_writes():
                self._run_item_inner(job, index, token, turn)
        finally:
            unbind_request_id()  # pool threads are reused by other jobs
            self._hand_over(job, token, turn)
            with self._lock:
                self._running -= 1
                self._idle.notify_all()

    def _run_item_inner(self, job: JobRow, index: int, token: str, turn: Turn) -> None:
        if self._stopping:
            return
        item = self._open_item(job, index)
        if item is None:
            self._close_if_done(job.id)
            return
        bind_request_id(item.spec.get("http_request_id"))  # the job's log lines carry its id
        task = Task.from_record(index, item.spec)
        result = TaskResult(task=task, attempts=[Attempt(**a) for a in item.attempts])
        resume = _resume_point(item, result.attempts)
        hooks = Hooks(on_intent=lambda _attempt: self._record_intent(job, index, result),
                      on_created=lambda attempt: self._record(job, index, result, attempt),
                      known_predictions=lambda: self.store.prediction_ids(
                          job.account, self._clock() - 2 * INPUT_RETENTION_SECONDS),
                      should_cancel=lambda: self.store.cancel_requested(job.id),
                      should_suspend=lambda: self._suspending or not self._runs(job, index))
        dest = self.generator.runtime.output_root / job.request_id
        try:
            execute(task, token, self.generator.runtime, dest, result, hooks=hooks,
                    resume=resume, turn=turn, start_by=job.start_deadline)
        except Suspended:
            log.info("job %s item %d left for the next start", job.id, index)
            return
        except StoreUnavailable as exc:
            self._hand_back(job, index, exc)
            return
        except Exception as exc:  # noqa: BLE001 - one broken item must not sink its job
            if self._stopping:
                # The limiter closes under a stopping process; the item resumes next start.
                return
            log.exception("job %s item %d failed unexpectedly", job.id, index)
            result.error = GenerationError("internal_error", f"internal error: "
                                           f"{type(exc).__name__}")
        self._confirm_cancel(job, token, result)
        finished = self.store.finish_item(job.id, index, _outcome(result), self._clock(),
                                          fence=job.fence, runner=self.worker_id)
        if finished is not None:
            _count_spend(job, result)
            if not finished.open_items:  # the last item closes its job
                self._close_if_done(job.id, fence=job.fence)

    def _open_item(self, job: JobRow, index: int) -> ItemRow | None:
        """The item to run, None if it ended or the job was fenced off. A fresh item stays
        queued until its first intent marks it running, so waiting for a slot writes nothing;
        one that ran before (a prediction to poll, a create to look up) is marked running now."""
        item = self.store.item_to_run(job.id, index, fence=job.fence, runner=self.worker_id)
        if item is None or (item.prediction_id is None and not item.attempts):
            return item
        return self.store.start_item(job.id, index, self._clock(), fence=job.fence,
                                     runner=self.worker_id)

    def _hand_back(self, job: JobRow, index: int, exc: StoreUnavailable) -> None:
        """A backend went away under the item: nothing more is created for it here; the job
        goes back to the pool, to be claimed (here or by another replica) once it returns."""
        log.warning("job %s item %d waits for %s to come back", job.id, index, exc.dependency)
        self.store.owners.release_job(job.id, self.worker_id)

    def _confirm_cancel(self, job: JobRow, token: str, result: TaskResult) -> None:
        """A canceled item is "canceled" only once its prediction is seen to stop on Replicate;
        otherwise it says the prediction may still run."""
        error = result.error
        if error is None or error.kind != "canceled" or error.prediction_id is None:
            return
        if self._prediction_stopped(job.account, token, error.prediction_id):
            return
        result.error = GenerationError(
            CANCEL_UNCONFIRMED, f"prediction {error.prediction_id} was asked to cancel but was "
            f"not seen to stop within {CANCEL_CONFIRM_SECONDS:g} s; it may still be running on "
            "Replicate", prediction_id=error.prediction_id)

    def _prediction_stopped(self, account: str, token: str, prediction_id: str) -> bool:
        """Poll the prediction (canceling it again while it runs) until it is terminal."""
        client = self.generator.runtime.clients.get(token)
        give_up = time.monotonic() + CANCEL_CONFIRM_SECONDS
        pause = 0.2
        while True:
            try:
                self.generator.manager.wait_for_poll(account, self._clock() + pause + 5.0)
                if read_prediction(client, prediction_id).status in TERMINAL:
                    return True
                client.predictions.cancel(prediction_id)
            except Exception as exc:  # noqa: BLE001 - asked again until the deadline
                log.warning("confirming the cancel of %s: %s", prediction_id, type(exc).__name__)
            if time.monotonic() + pause > give_up:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _runs(self, job: JobRow, index: int) -> bool:
        """Still this process's item? A process whose heartbeat stalled past the TTL may have
        lost it to another: it must then neither create nor keep polling."""
        return self.store.claims.runs(job.id, index, self.worker_id, job.fence)

    def _record_intent(self, job: JobRow, index: int, result: TaskResult) -> None:
        """Store the create about to be sent, so a lost answer is looked up, never re-sent.
        Stopping, canceled, or no longer this process's job (another claimed it, or it was
        handed back): nothing is sent from here."""
        if self._stopping:
            raise Suspended
        outcome = self.store.record_intent(job.id, index,
                                           [a.as_dict() for a in result.attempts],
                                           self._clock(), owner=self.worker_id, fence=job.fence)
        if outcome == "canceled":
            raise GenerationError("canceled", "the job was canceled before this item started")
        if outcome != "stored":
            # "ended": whoever ended it (a cancel, a rejected token) closes it; nothing to add.
            raise Suspended

    def _record(self, job: JobRow, index: int, result: TaskResult, attempt: Attempt) -> None:
        """Store a new prediction's id before anything else happens to it."""
        assert attempt.prediction_id is not None  # noqa: S101 - called only after a create
        if not self.store.record_attempts(job.id, index, [a.as_dict() for a in result.attempts],
                                          (attempt.prediction_id, _model_id(attempt.model)),
                                          fence=job.fence, runner=self.worker_id):
            raise Suspended  # the new owner finds it by its stored intent

    def _close_if_done(self, job_id: str, fence: int | None = None) -> None:
        job = self.store.finish_job_if_done(job_id, self._clock(), fence=fence)
        if job is None:
            return
        log.info("job %s %s: %s", job.id, job.state, job.counts)
        with self._lock:
            event = self._done.pop(job_id, None)
        if event is not None:
            event.set()
        if job.webhook_state == "pending":
            self._wake.set()

    # -- reading and steering ----------------------------------------------------------------

    def wait(self, job_id: str, timeout: float | None = None, *,
             reread: float = WAIT_REREAD_S) -> JobRow | None:
        """Block until the job ends (here or in another process); None on timeout. An end
        elsewhere wakes it; if that hint is lost, the store is re-read every `reread` s."""
        give_up = None if timeout is None else time.monotonic() + timeout
        self.stream_wakeups.listen()  # an end in another process arrives as an event wake-up
        with self._lock:
            ended_here = self._done.setdefault(job_id, threading.Event())
        try:
            while True:
                seen = self.stream_wakeups.generation()
                job = self.store.get(job_id)
                if job is None or job.terminal:
                    return job
                if give_up is not None and time.monotonic() >= give_up:
                    return None
                self._await_change(seen, ended_here, reread)
        finally:
            with self._lock:
                self._done.pop(job_id, None)

    def _await_change(self, seen: int, ended_here: threading.Event, reread: float) -> None:
        """Until any process appends events or `reread` passes; every item's events wake it, so
        it re-reads no sooner than WAIT_MIN_REREAD_S, unless the job ended here."""
        started = time.monotonic()
        self.stream_wakeups.wait(seen, reread)
        ended_here.wait(max(0.0, started + WAIT_MIN_REREAD_S - time.monotonic()))

    def cancel(self, job_id: str) -> JobRow | None:
        """Drop queued items now; running ones are canceled on Replicate by their runner (also
        those whose create is held or whose id is being stored: they look before polling)."""
        self.store.request_cancel(job_id, self._clock())
        self._windows.drop(job_id)  # its queued items are canceled in the store
        try:
            self._close_if_done(job_id)
        except StoreBusy:
            pass  # the cancel is stored; the job's last item closes it
        return self.store.get(job_id)

    # -- stopping ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking items, let running ones finish within the grace period, leave the rest
        (and any prediction still running) for the next start; then stop the engine."""
        if self._stopping:
            return
        self._stopping = True
        self.generator.dispatcher.shutdown(wait=False)
        give_up = time.monotonic() + self.settings.shutdown_grace_seconds
        with self._lock:
            while self._running and time.monotonic() < give_up:
                self._idle.wait(max(0.0, min(0.2, give_up - time.monotonic())))
            self._suspending = True
            # Suspended items notice at their next poll.
            while self._running and time.monotonic() < give_up + 5.0:
                self._idle.wait(0.2)
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self.store.owners.retire(self.worker_id)
        self.stream_wakeups.close()  # open streams end now, their clients reconnect elsewhere
        # Limiter first: it wakes items waiting for a slot, so joining the dispatcher cannot hang.
        self.generator.manager.shutdown()
        self.generator.close()
        self.token_checks.close()
        self.store.close()


def _resume_point(item: ItemRow, attempts: list[Attempt]) -> Resume | None:
    """A stored prediction to poll, or a create sent before a crash whose answer was lost."""
    if item.prediction_id and item.prediction_model:
        return Resume(item.prediction_model, prediction_id=item.prediction_id)
    last = attempts[-1] if attempts else None
    if last is not None and last.status == "creating" and last.intent() is not None:
        return Resume(_model_id(last.model), pending=last)
    return None


def _model_id(ref: str) -> str:
    """The catalogue id of a curated model's ref; a non-curated model keeps its ref."""
    try:
        return resolve_model(ref).id
    except InvalidRequest:
        return ref


def _count_spend(job: JobRow, result: TaskResult) -> None:
    """/metrics by caller and model, for an item that made a prediction."""
    made = [a for a in result.attempts if a.prediction_id]
    if made:
        caller = job.caller if job.key_id is not None or job.caller == "admin" else "user"
        model = result.model_used.id if result.model_used else made[-1].model
        metrics.spend(caller or "unknown", model, result.cost_usd)


# Error kinds that end an item in a state of their own; every other error is "failed".
_STATE_OF_KIND = {"canceled": "canceled", "expired": "expired"}


def _outcome(result: TaskResult) -> ItemOutcome:
    error = result.error
    state = "succeeded" if error is None else _STATE_OF_KIND.get(error.kind, "failed")
    return ItemOutcome(
        state=state, model_used=result.model_used.id if result.model_used else None,
        attempts=[a.as_dict() for a in result.attempts], files=result.files,
        error=str(error) if error else None, error_type=error.kind if error else None,
        cost_usd=result.cost_usd, placeholder=result.placeholder, notes=result.notes,
        billed_seconds=result.billed_seconds, sizes=result.sizes)


def _file_size(storage: OutputStorage, relative: str) -> int | None:
    """An output's bytes, as its event tells them (None if the store cannot say now)."""
    try:
        info = storage.stat(relative)
    except Exception:  # noqa: BLE001 - a bucket that does not answer only costs the size
        log.warning("no size for %s: the output store did not answer", relative)
        return None
    return info.size if info is not None else None


def _status_of(check: Callable[[], None]) -> str:
    try:
        check()
    except StoreUnavailable as exc:
        return f"unavailable: {exc}"
    return "ok"


def _scoped(idempotency_key: str | None, key_id: str | None) -> str | None:
    """An issued key's Idempotency-Keys never meet another caller's on the same account."""
    if idempotency_key is None or key_id is None:
        return idempotency_key
    return f"{key_id}/{idempotency_key}"
