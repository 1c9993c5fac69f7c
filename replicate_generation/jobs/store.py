"""Durable jobs: every job, item, prediction id and attempt, in the SQLite state file or PostgreSQL
(one code path, SQLAlchemy Core); a dead owner's unfinished jobs are claimed and resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Executable,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exc,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from replicate_generation.errors import IdempotencyConflict, StoreBusy, StoreUnavailable
from replicate_generation.jobs.migrations import migrate as migrate
from replicate_generation.jobs.migrations import upgrade
from replicate_generation.jobs.schema import (
    Backend,
    backend_of,
    job_files,
    job_items,
    job_values,
    job_workers,
    jobs,
    open_engine,
    reachable,
    ready_probe,
)
from replicate_generation.sqlite_db import (
    WRITE_PATIENCE_S,
    is_busy,
    probe_file_write,
    sqlite_transaction,
    writes_are_patient,
)

log = logging.getLogger(__name__)

ITEM_STATES = ("queued", "running", "succeeded", "failed", "canceled")
ITEM_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_TERMINAL = frozenset({"succeeded", "partially_failed", "failed", "canceled"})
# A job asked to cancel whose items have not all ended (a prediction may still run).
CANCEL_REQUESTED = "cancel_requested"
# An item whose prediction was canceled but never seen to stop on Replicate.
CANCEL_UNCONFIRMED = "cancel_unconfirmed"
# Input strings at least this long are stored once per job and referenced from each item's spec.
SHARED_VALUE_MIN_CHARS = 1024
_SHARED_REF = "$shared"


@dataclass(frozen=True)
class NewItem:
    """What an item will run: the serialised plan (models, input, names); opaque to the store."""

    spec: dict[str, Any]


@dataclass(frozen=True)
class NewJob:
    id: str
    account: str
    kind: str
    request_id: str
    items: Sequence[NewItem]
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_private: bool = False
    origin: str = "service"


@dataclass
class ItemRow:
    job_id: str
    index: int
    spec: dict[str, Any]
    state: str
    prediction_id: str | None
    prediction_model: str | None
    model_used: str | None
    attempts: list[dict[str, Any]]
    files: list[str]
    error: str | None
    error_type: str | None
    cost_usd: float | None
    placeholder: bool
    notes: list[str]
    queued_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def terminal(self) -> bool:
        return self.state in ITEM_TERMINAL


@dataclass
class JobRow:
    id: str
    account: str
    kind: str
    state: str
    request_id: str
    item_count: int
    owner: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None
    idempotency_key: str | None
    request_hash: str | None
    webhook_url: str | None
    webhook_private: bool
    webhook_state: str | None
    webhook_attempts: int
    webhook_next_at: float | None
    webhook_error: str | None
    counts: dict[str, int] = field(default_factory=dict)
    # The fencing number an owner's writes carry (see JobStore.fence_of).
    fence: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in JOB_TERMINAL


@dataclass(frozen=True)
class ItemOutcome:
    """How an item ended."""

    state: str
    model_used: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    cost_usd: float | None = None
    placeholder: bool = False
    notes: list[str] = field(default_factory=list)


_JOB = [jobs.c[name] for name in (
    "id", "account", "kind", "state", "request_id", "item_count", "owner", "created_at",
    "started_at", "finished_at", "cancel_requested_at", "idempotency_key", "request_hash",
    "webhook_url", "webhook_private", "webhook_state", "webhook_attempts", "webhook_next_at",
    "webhook_error", "fence")]
_ITEM = [job_items.c[name] for name in (
    "job_id", "idx", "spec", "state", "prediction_id", "prediction_model", "model_used",
    "attempts", "files", "error", "error_type", "cost_usd", "placeholder", "notes", "queued_at",
    "started_at", "finished_at")]
_OPEN_STATES = ("queued", "running")
# The fence of the job an item belongs to, correlated with the item a statement touches.
_ITEM_FENCE = select(jobs.c.fence).where(jobs.c.id == job_items.c.job_id).scalar_subquery()
_ITEM_AND_FENCE: list[ColumnElement[Any]] = [*_ITEM, _ITEM_FENCE.label("job_fence")]
_ITEM_OWNER = select(jobs.c.owner).where(jobs.c.id == job_items.c.job_id).scalar_subquery()
_ITEM_CANCELED = (select(jobs.c.cancel_requested_at).where(jobs.c.id == job_items.c.job_id)
                  .scalar_subquery())
# What became of an intent: stored, or not (the job was canceled, the item ended meanwhile, or
# the job is no longer this owner's).
IntentOutcome = Literal["stored", "canceled", "ended", "not_ours"]
_RECONNECT_PAUSE_MAX_S = 2.0


class JobStore:
    """The jobs tables, on SQLite (a path or `sqlite:///path`) or PostgreSQL
    (`postgresql://...`). Times are wall-clock seconds given by the caller.

    Start-up upgrades the tables to the newest migration. On PostgreSQL, a refused or lost
    connection raises StoreUnavailable; the same store works again once the server is back.
    """

    def __init__(self, target: str) -> None:
        self._engine = open_engine(target)
        try:
            upgrade(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def backend(self) -> Backend:
        return backend_of(self._engine)

    def close(self) -> None:
        """Close the pooled connections (the store opens new ones if used again)."""
        self._engine.dispose()

    # -- connections and transactions ------------------------------------------------------

    @contextmanager
    def _write(self, *, patient: bool = False) -> Iterator[Connection]:
        """A short write transaction. SQLite: BEGIN IMMEDIATE, busy waits retried up to
        WRITE_PATIENCE_S then StoreBusy. Patient (or inside `patient_writes()`): retried without
        limit, and on PostgreSQL a refused connection is retried too."""
        patience = None if patient or writes_are_patient() else WRITE_PATIENCE_S
        with self._session(patience, write=True) as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction (SQLite: a snapshot; PostgreSQL: READ COMMITTED). Inside
        `patient_writes()` (an item holding a slot) it waits for PostgreSQL to come back."""
        patience = None if writes_are_patient() else WRITE_PATIENCE_S
        with self._session(patience, write=False) as conn, _busy_is_store_busy():
            yield conn

    @contextmanager
    def _session(self, patience: float | None, *, write: bool) -> Iterator[Connection]:
        conn = self._connect(patience)
        with reachable(self._engine), conn:
            if self.backend == "sqlite":
                with sqlite_transaction(conn, immediate=write, patience=patience):
                    yield conn
            else:
                with conn.begin():
                    yield conn

    def _connect(self, patience: float | None) -> Connection:
        """A pooled connection; a patient caller waits for PostgreSQL to be reachable."""
        tries = 0
        while True:
            try:
                with reachable(self._engine, connecting=True):
                    return self._engine.connect()
            except StoreUnavailable:
                if patience is not None:
                    raise
            except exc.TimeoutError as error:
                if patience is not None:
                    raise StoreBusy("every connection to the job store is in use") from error
            tries += 1
            if tries % 20 == 0:
                log.warning("the job store has been unreachable for %d tries", tries)
            pause = min(_RECONNECT_PAUSE_MAX_S, 0.01 * 2**min(tries, 16))
            time.sleep(random.uniform(0, pause))  # noqa: S311 - jitter only

    def _insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """INSERT with the dialect's ON CONFLICT clauses."""
        return sqlite.insert(table) if self.backend == "sqlite" else postgresql.insert(table)

    # -- health ----------------------------------------------------------------------------

    def check(self) -> None:
        """A cheap round trip (SELECT 1); StoreUnavailable when the database cannot answer."""
        try:
            with self._read() as conn:
                conn.execute(select(1))
        except (sqlite3.Error, exc.DBAPIError) as error:
            raise StoreUnavailable(self.backend, f"{type(error).__name__}") from error

    def probe_write(self) -> None:
        """Raise unless the store can be written afresh (readiness): SQLite opens the file anew."""
        database = self._engine.url.database
        if self.backend == "sqlite" and database:
            probe_file_write(database)
            return
        with self._write() as conn:
            stmt = postgresql.insert(ready_probe).values(id=1, at=time.time())
            conn.execute(stmt.on_conflict_do_update(index_elements=[ready_probe.c.id],
                                                    set_={"at": stmt.excluded.at}))

    # -- submitting ------------------------------------------------------------------------

    def create(self, job: NewJob, owner: str, now: float) -> tuple[JobRow, bool]:
        """Insert a job and its items at once; with a known Idempotency-Key return that job.

        Returns (job, created). Raises IdempotencyConflict when the key was used with another
        body. The rows are built before the write lock is taken, so the transaction stays short.
        """
        items, values = _pack_items(job.id, job.items)
        with self._write() as conn:
            existing = _keyed_job(conn, job)
            if existing is not None:
                return existing, False
            if conn.execute(self._new_job(job, owner, now)).first() is None:
                # Another process created the key's job meanwhile (PostgreSQL only).
                raced = _keyed_job(conn, job)
                assert raced is not None  # noqa: S101 - the conflict was on that key
                return raced, False
            if values:
                conn.execute(self._insert(job_values).on_conflict_do_nothing(
                    index_elements=[job_values.c.job_id, job_values.c.digest]), values)
            if items:
                conn.execute(insert(job_items).values(state="queued", queued_at=now), items)
            created = _load_job(conn, job.id)
        assert created is not None  # noqa: S101 - inserted in this transaction
        return created, True

    def _new_job(self, job: NewJob, owner: str, now: float) -> Executable:
        return self._insert(jobs).values(
            id=job.id, account=job.account, kind=job.kind, origin=job.origin, state="queued",
            request_id=job.request_id, item_count=len(job.items), owner=owner, created_at=now,
            idempotency_key=job.idempotency_key, request_hash=job.request_hash,
            webhook_url=job.webhook_url, webhook_private=int(job.webhook_private), fence=1,
        ).on_conflict_do_nothing(index_elements=[jobs.c.account, jobs.c.idempotency_key],
                                 index_where=jobs.c.idempotency_key.is_not(None),
                                 ).returning(jobs.c.id)

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        with self._read() as conn:
            return _load_job(conn, job_id)

    def items(self, job_id: str, *, only_open: bool = False) -> list[ItemRow]:
        query = select(*_ITEM).where(job_items.c.job_id == job_id).order_by(job_items.c.idx)
        if only_open:
            query = query.where(job_items.c.state.in_(_OPEN_STATES))
        with self._read() as conn:
            rows = conn.execute(query).all()
            # One copy of each shared value for all the items, however many there are.
            values = {str(r.digest): str(r.value) for r in conn.execute(
                select(job_values.c.digest, job_values.c.value)
                .where(job_values.c.job_id == job_id))}
        return [_item(r, values) for r in rows]

    def open_indexes(self, job_id: str) -> list[int]:
        """The items not yet ended, in input order (without loading their specs)."""
        with self._read() as conn:
            rows = conn.execute(select(job_items.c.idx).where(
                job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_STATES))
                .order_by(job_items.c.idx)).all()
        return [int(r.idx) for r in rows]

    def item(self, job_id: str, index: int) -> ItemRow | None:
        with self._read() as conn:
            row = conn.execute(select(*_ITEM).where(job_items.c.job_id == job_id,
                                                    job_items.c.idx == index)).first()
            return _item(row, _values_of(conn, job_id, row)) if row is not None else None

    def list_jobs(self, account: str | None, limit: int,
                  after: tuple[float, str] | None = None) -> list[JobRow]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        query = select(*_JOB).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if account is not None:
            query = query.where(jobs.c.account == account)
        if after is not None:
            query = query.where(or_(jobs.c.created_at < after[0], and_(
                jobs.c.created_at == after[0], jobs.c.id < after[1])))
        with self._read() as conn:
            found = [_job(r) for r in conn.execute(query)]
            for job in found:
                job.counts = _counts(conn, job.id)
        return found

    def _scalar(self, query: Select[Any]) -> Any:
        with self._read() as conn:
            return conn.execute(query).scalar()

    def owner(self, job_id: str) -> str | None:
        owner = self._scalar(select(jobs.c.owner).where(jobs.c.id == job_id))
        return str(owner) if owner is not None else None

    def fence_of(self, job_id: str) -> int:
        """The job's fencing number (0 for a job that is not there, or untouched since before
        fencing): a claim carries it to the owner's writes."""
        return int(self._scalar(select(jobs.c.fence).where(jobs.c.id == job_id)) or 0)

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute(select(jobs.c.cancel_requested_at)
                               .where(jobs.c.id == job_id)).first()
        return row is None or row.cancel_requested_at is not None

    def file_job(self, path: str) -> str | None:
        """The job that wrote this output (relative to the output root), if any."""
        job_id = self._scalar(select(job_files.c.job_id).where(job_files.c.path == path))
        return str(job_id) if job_id is not None else None

    # -- running ---------------------------------------------------------------------------
    # An owner's writes take `fence`: given, they apply only while the job's fence is still
    # that number, so an owner that lost the job to a claim changes nothing.

    def start_item(self, job_id: str, index: int, now: float, *,
                   fence: int | None = None) -> ItemRow | None:
        """Mark an item running (its job too); None if it already ended (e.g. canceled) or the
        job was fenced off."""
        with self._write() as conn:
            # The job's row first: every writer locks a job before its items (no deadlock).
            if not _fence_holds(conn, job_id, fence):
                return None
            row = conn.execute(select(*_ITEM).where(job_items.c.job_id == job_id,
                                                    job_items.c.idx == index)
                               .with_for_update(key_share=True)).first()
            if row is None or row.state in ITEM_TERMINAL:
                return None
            conn.execute(update(job_items).where(job_items.c.job_id == job_id,
                                                 job_items.c.idx == index)
                         .values(state="running",
                                 started_at=func.coalesce(job_items.c.started_at, now)))
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued")
                         .values(state="running", started_at=func.coalesce(jobs.c.started_at,
                                                                           now)))
        with self._read() as conn:
            item = _item(row, _values_of(conn, job_id, row))
        item.state = "running"
        item.started_at = item.started_at or now
        return item

    def record_attempts(self, job_id: str, index: int, attempts: list[dict[str, Any]],
                        prediction: tuple[str, str] | None, *, fence: int | None = None) -> bool:
        """Write the attempts so far, and the prediction now in flight (id, model) or none;
        False if the item is not there or the job was fenced off.

        Retried until it is stored, however busy the file: the create it records is paid for.
        """
        stmt = update(job_items).where(job_items.c.job_id == job_id, job_items.c.idx == index,
                                       *_item_fenced(fence)).values(
            attempts=json.dumps(attempts), prediction_id=prediction[0] if prediction else None,
            prediction_model=prediction[1] if prediction else None)
        with self._write(patient=True) as conn:
            return bool(conn.execute(stmt).rowcount)

    def item_to_run(self, job_id: str, index: int, *, fence: int | None) -> ItemRow | None:
        """The item, unless it ended or the job was fenced off (a read: the item is marked
        running by its first intent, `record_intent`, or by `start_item`)."""
        query = select(*_ITEM_AND_FENCE).where(
            job_items.c.job_id == job_id, job_items.c.idx == index)
        with self._read() as conn:  # one read, not one for the fence and one for the item
            row = conn.execute(query).first()
            if row is None or row.state in ITEM_TERMINAL or (
                    fence is not None and row.job_fence != fence):
                return None
            return _item(row, _values_of(conn, job_id, row))

    def record_intent(self, job_id: str, index: int, attempts: list[dict[str, Any]], now: float,
                      *, owner: str, fence: int | None) -> IntentOutcome:
        """Store the attempts, the last a create about to be sent, and mark the item (and its
        job) running, in one write that also checks what the send depends on: the item still
        open, the job still this owner's (and fence's), and not canceled. Anything but "stored"
        wrote nothing, and nothing may be sent."""
        stmt = update(job_items).where(
            job_items.c.job_id == job_id, job_items.c.idx == index,
            job_items.c.state.in_(_OPEN_STATES), *_item_fenced(fence), _ITEM_OWNER == owner,
            _ITEM_CANCELED.is_(None)).values(
            attempts=json.dumps(attempts), prediction_id=None, prediction_model=None,
            state="running", started_at=func.coalesce(job_items.c.started_at, now))
        with self._write(patient=True) as conn:
            # The job's row first, as every writer locks it (PostgreSQL: no deadlock).
            if _fence_holds(conn, job_id, fence) and conn.execute(stmt).rowcount:
                conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued")
                             .values(state="running",
                                     started_at=func.coalesce(jobs.c.started_at, now)))
                return "stored"
        return self._why_no_intent(job_id, index, owner, fence)

    def _why_no_intent(self, job_id: str, index: int, owner: str,
                       fence: int | None) -> IntentOutcome:
        item = self.item(job_id, index)
        if item is not None and item.state in ITEM_TERMINAL:
            return "ended"
        mine = self.owner(job_id) == owner and (fence is None or self.fence_of(job_id) == fence)
        return "canceled" if mine and self.cancel_requested(job_id) else "not_ours"

    def prediction_ids(self, account: str, since: float) -> set[str]:
        """Prediction ids the account's items queued since then own (never adopted again)."""
        query = (select(job_items.c.prediction_id)
                 .join(jobs, jobs.c.id == job_items.c.job_id)
                 .where(jobs.c.account == account, job_items.c.prediction_id.is_not(None),
                        job_items.c.queued_at >= since))
        with self._read() as conn:
            return {str(r.prediction_id) for r in conn.execute(query)}

    def finish_item(self, job_id: str, index: int, outcome: ItemOutcome, now: float, *,
                    fence: int | None = None) -> bool:
        """Store how the item ended and own its files; False if the item is not there or the
        job was fenced off (then nothing is written)."""
        stmt = update(job_items).where(job_items.c.job_id == job_id, job_items.c.idx == index,
                                       *_item_fenced(fence)).values(
            state=outcome.state, model_used=outcome.model_used,
            attempts=json.dumps(outcome.attempts), files=json.dumps(outcome.files),
            error=outcome.error, error_type=outcome.error_type, cost_usd=outcome.cost_usd,
            placeholder=int(outcome.placeholder), notes=json.dumps(outcome.notes),
            finished_at=now)
        with self._write() as conn:
            if not conn.execute(stmt).rowcount:
                return False
            if outcome.files:
                files = self._insert(job_files)
                conn.execute(files.on_conflict_do_update(
                    index_elements=[job_files.c.path], set_={"job_id": files.excluded.job_id}),
                    [{"path": path, "job_id": job_id} for path in outcome.files])
        return True

    def finish_job_if_done(self, job_id: str, now: float, *,
                           fence: int | None = None) -> JobRow | None:
        """Close the job once every item ended; return it only to the caller that closed it
        (None as well when the job was fenced off)."""
        if self._items_open(job_id):
            # Not the last: the item still open closes it, after its own write (no lock taken).
            return None
        with self._write() as conn:
            row = conn.execute(select(*_JOB).where(jobs.c.id == job_id)
                               .with_for_update(key_share=True)).first()
            if row is None or row.state in JOB_TERMINAL or (fence is not None
                                                            and row.fence != fence):
                return None
            counts = _counts(conn, job_id)
            if counts["queued"] or counts["running"]:
                return None
            job = _job(row)
            job.state = _final_state(job, counts, _unconfirmed_cancels(conn, job_id))
            job.finished_at = now
            job.counts = counts
            webhook = "pending" if job.webhook_url else None
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=job.state, finished_at=now, owner=None, webhook_state=webhook,
                webhook_next_at=now if webhook else None))
            job.webhook_state = webhook
        return job

    def _items_open(self, job_id: str) -> bool:
        with self._read() as conn:
            return conn.execute(select(job_items.c.idx).where(
                job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_STATES))
                .limit(1)).first() is not None

    def request_cancel(self, job_id: str, now: float) -> list[int]:
        """Flag the job canceled and drop its queued items; return the items still running."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(_OPEN_STATES))
                         .values(cancel_requested_at=func.coalesce(jobs.c.cancel_requested_at,
                                                                   now)))
            conn.execute(update(job_items).where(
                job_items.c.job_id == job_id, job_items.c.state == "queued",
                job_items.c.prediction_id.is_(None)).values(
                state="canceled", finished_at=now, error="canceled before it started",
                error_type="canceled"))
            running = conn.execute(select(job_items.c.idx).where(
                job_items.c.job_id == job_id, job_items.c.state.in_(_OPEN_STATES))).all()
        return [int(r.idx) for r in running]

    # -- owners: heartbeats and recovery -----------------------------------------------------

    def heartbeat(self, worker: str, now: float) -> None:
        stmt = self._insert(job_workers).values(id=worker, heartbeat_at=now)
        with self._write() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[job_workers.c.id],
                set_={"heartbeat_at": stmt.excluded.heartbeat_at}))

    def retire(self, worker: str) -> None:
        """A worker that stops cleanly hands its open jobs over at once."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.owner == worker).values(owner=None))
            conn.execute(delete(job_workers).where(job_workers.c.id == worker))

    def claim_orphans(self, worker: str, accounts: Container[str], now: float, ttl: float,
                      origin: str = "service") -> list[str]:
        """Take over open jobs whose owner is gone, for accounts this worker can pay with; each
        claim bumps the job's fence (see `fence_of`).

        The orphans are read first and matched against `accounts` here, so the query never grows
        with the number of accounts (an `IN (...)` of them would pass SQLite's variable limit).
        Only jobs of the same origin: a script on the host never takes over the service's jobs
        (it would write them into its own output directory), nor the service a script's.
        On PostgreSQL, jobs another claimer is taking are skipped (SKIP LOCKED), not waited for.
        """
        live = select(job_workers.c.id)
        orphans = select(jobs.c.id, jobs.c.account).where(
            jobs.c.state.in_(_OPEN_STATES), jobs.c.origin == origin,
            or_(jobs.c.owner.is_(None), jobs.c.owner.not_in(live)),
        ).with_for_update(skip_locked=True, key_share=True)
        with self._write() as conn:
            conn.execute(delete(job_workers).where(job_workers.c.heartbeat_at < now - ttl))
            ids = [str(r.id) for r in conn.execute(orphans) if r.account in accounts]
            if ids:
                conn.execute(update(jobs).where(jobs.c.id == bindparam("claimed"))
                             .values(owner=worker, fence=jobs.c.fence + 1),
                             [{"claimed": job_id} for job_id in ids])
        return ids

    def fail_queued_items(self, worker: str, account: str, outcome: ItemOutcome, now: float, *,
                          fence: Mapping[str, int] | None = None) -> list[str]:
        """End every queued item of the account's open jobs this worker owns with `outcome`
        (at once, nothing is sent anywhere); return the ids of the jobs touched.

        `fence`: the fencing number this worker holds for each job; a job missing from it or
        whose fence moved on is left alone.
        """
        owned = select(jobs.c.id, jobs.c.fence).where(
            jobs.c.account == account, jobs.c.owner == worker, jobs.c.state.in_(_OPEN_STATES),
        ).with_for_update(key_share=True)
        with self._write() as conn:
            ids = [str(r.id) for r in conn.execute(owned)
                   if fence is None or fence.get(str(r.id)) == r.fence]
            if ids:
                conn.execute(update(job_items).where(
                    job_items.c.job_id == bindparam("failed"), job_items.c.state == "queued")
                    .values(state=outcome.state, error=outcome.error,
                            error_type=outcome.error_type, finished_at=now),
                    [{"failed": job_id} for job_id in ids])
        return ids

    def release_job(self, job_id: str, worker: str) -> None:
        """Give a job back to the pool of orphans (this worker could not queue it)."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.owner == worker)
                         .values(owner=None))

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(jobs by state, items by state) across every process: what /metrics shows."""
        with self._read() as conn:
            by_job = _by_state(conn, jobs.c.state)
            by_item = _by_state(conn, job_items.c.state)
        return by_job, by_item

    # -- webhooks --------------------------------------------------------------------------

    def claim_webhook(self, now: float, lease: float) -> JobRow | None:
        """Take one due delivery, pushing its next attempt out by `lease` while it runs."""
        due = (select(*_JOB).where(jobs.c.webhook_state == "pending",
                                   jobs.c.webhook_next_at <= now)
               .order_by(jobs.c.webhook_next_at).limit(1)
               .with_for_update(skip_locked=True, key_share=True))
        with self._write() as conn:
            row = conn.execute(due).first()
            if row is None:
                return None
            conn.execute(update(jobs).where(jobs.c.id == row.id)
                         .values(webhook_next_at=now + lease))
            job = _job(row)
            job.counts = _counts(conn, job.id)
        return job

    def webhook_done(self, job_id: str, state: str, attempts: int, next_at: float | None,
                     error: str | None) -> None:
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                webhook_state=state, webhook_attempts=attempts, webhook_next_at=next_at,
                webhook_error=error))

    def next_webhook_at(self) -> float | None:
        due = self._scalar(select(func.min(jobs.c.webhook_next_at))
                           .where(jobs.c.webhook_state == "pending"))
        return float(due) if due is not None else None

    # -- retention -------------------------------------------------------------------------

    def expired(self, before: float, limit: int = 500) -> list[tuple[str, str]]:
        """Finished jobs older than the retention (and not awaiting a webhook): (id, request_id)."""
        query = select(jobs.c.id, jobs.c.request_id).where(
            jobs.c.finished_at.is_not(None), jobs.c.finished_at < before,
            or_(jobs.c.webhook_state.is_(None), jobs.c.webhook_state != "pending"),
        ).limit(limit)
        with self._read() as conn:
            return [(str(r.id), str(r.request_id)) for r in conn.execute(query)]

    def delete(self, job_ids: Sequence[str]) -> None:
        """Remove jobs one transaction each, so a big purge never holds the lock for long."""
        for job_id in job_ids:
            with self._write() as conn:
                for column in (job_files.c.job_id, job_values.c.job_id, job_items.c.job_id,
                               jobs.c.id):
                    conn.execute(delete(column.table).where(column == job_id))


@contextmanager
def _busy_is_store_busy() -> Iterator[None]:
    try:
        yield
    except exc.OperationalError as error:
        # Rare in WAL (recovery, a checkpoint); the caller may try again.
        if isinstance(error.orig, sqlite3.OperationalError) and is_busy(error.orig):
            raise StoreBusy("the state file is busy; try again shortly") from error
        raise


def _item_fenced(fence: int | None) -> list[ColumnElement[bool]]:
    return [] if fence is None else [_ITEM_FENCE == fence]


def _fence_holds(conn: Connection, job_id: str, fence: int | None) -> bool:
    """Share-lock the job's row (PostgreSQL: FOR KEY SHARE, so a claim waits but the job's other
    items do not); True if it is there with this fence (or any, if None)."""
    current = conn.execute(select(jobs.c.fence).where(jobs.c.id == job_id)
                           .with_for_update(read=True, key_share=True)).scalar()
    return current is not None and (fence is None or current == fence)


def _keyed_job(conn: Connection, job: NewJob) -> JobRow | None:
    """The job created before with this job's Idempotency-Key, if any."""
    if job.idempotency_key is None:
        return None
    row = conn.execute(select(*_JOB).where(jobs.c.account == job.account,
                                           jobs.c.idempotency_key == job.idempotency_key)).first()
    if row is None:
        return None
    existing = _job(row)
    if existing.request_hash != job.request_hash:
        raise IdempotencyConflict(job.idempotency_key)
    existing.counts = _counts(conn, existing.id)
    return existing


def _load_job(conn: Connection, job_id: str) -> JobRow | None:
    row = conn.execute(select(*_JOB).where(jobs.c.id == job_id)).first()
    if row is None:
        return None
    job = _job(row)
    job.counts = _counts(conn, job_id)
    return job


def _by_state(conn: Connection, state: Column[Any]) -> dict[str, int]:
    rows = conn.execute(select(state, func.count()).group_by(state))
    return {str(name): int(count) for name, count in rows}

def _final_state(job: JobRow, counts: dict[str, int], unconfirmed: int = 0) -> str:
    # "canceled" only when no prediction of the job may still be running on Replicate.
    if job.cancel_requested_at is not None and not unconfirmed:
        return "canceled"
    if counts["succeeded"] == job.item_count:
        return "succeeded"
    if counts["succeeded"] == 0:
        return "failed"
    return "partially_failed"


def _unconfirmed_cancels(conn: Connection, job_id: str) -> int:
    count = conn.execute(select(func.count()).select_from(job_items).where(
        job_items.c.job_id == job_id, job_items.c.error_type == CANCEL_UNCONFIRMED)).scalar()
    return int(count or 0)


def _counts(conn: Connection, job_id: str) -> dict[str, int]:
    counts = dict.fromkeys(ITEM_STATES, 0)
    for state, count in conn.execute(select(job_items.c.state, func.count())
                                     .where(job_items.c.job_id == job_id)
                                     .group_by(job_items.c.state)):
        counts[str(state)] = int(count)
    return counts


def _job(row: Row[Any]) -> JobRow:
    r = row._mapping
    # Stored as queued/running (so recovery still finds it); shown as what it is.
    cancel_requested = r["cancel_requested_at"] is not None and r["state"] not in JOB_TERMINAL
    return JobRow(
        id=r["id"], account=r["account"], kind=r["kind"],
        state=CANCEL_REQUESTED if cancel_requested else r["state"], request_id=r["request_id"],
        item_count=int(r["item_count"]), owner=r["owner"], created_at=float(r["created_at"]),
        started_at=r["started_at"], finished_at=r["finished_at"],
        cancel_requested_at=r["cancel_requested_at"], idempotency_key=r["idempotency_key"],
        request_hash=r["request_hash"], webhook_url=r["webhook_url"],
        webhook_private=bool(r["webhook_private"]), webhook_state=r["webhook_state"],
        webhook_attempts=int(r["webhook_attempts"]), webhook_next_at=r["webhook_next_at"],
        webhook_error=r["webhook_error"], fence=int(r["fence"]))


def _item(row: Row[Any], values: dict[str, str]) -> ItemRow:
    r = row._mapping
    return ItemRow(
        job_id=r["job_id"], index=int(r["idx"]), spec=_unpack(json.loads(r["spec"]), values),
        state=r["state"], prediction_id=r["prediction_id"],
        prediction_model=r["prediction_model"], model_used=r["model_used"],
        attempts=json.loads(r["attempts"]), files=json.loads(r["files"]), error=r["error"],
        error_type=r["error_type"], cost_usd=r["cost_usd"], placeholder=bool(r["placeholder"]),
        notes=json.loads(r["notes"]), queued_at=float(r["queued_at"]),
        started_at=r["started_at"], finished_at=r["finished_at"])


# -- shared values: stored once per job, referenced by digest from each item's spec -----------


def _pack_items(job_id: str, items: Sequence[NewItem]) -> tuple[list[dict[str, Any]],
                                                                  list[dict[str, Any]]]:
    """Item rows (job_id, idx, spec JSON) with long input strings replaced by references, and
    the (job_id, digest, value) rows those references name, each value once."""
    digests: dict[int, str] = {}  # by id(): 1,000 items sharing one string hash it once
    values: dict[str, str] = {}
    rows = [{"job_id": job_id, "idx": index,
             "spec": json.dumps(_pack(item.spec, digests, values))}
            for index, item in enumerate(items)]
    return rows, [{"job_id": job_id, "digest": digest, "value": value}
                  for digest, value in values.items()]


def _pack(spec: dict[str, Any], digests: dict[int, str], values: dict[str, str]) -> dict[str, Any]:
    model_input = spec.get("input")
    if not isinstance(model_input, dict):
        return spec
    packed = {name: _pack_value(value, digests, values) for name, value in model_input.items()}
    return {**spec, "input": packed}


def _pack_value(value: Any, digests: dict[int, str], values: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_pack_value(v, digests, values) for v in value]
    if not isinstance(value, str) or len(value) < SHARED_VALUE_MIN_CHARS:
        return value
    digest = digests.get(id(value))
    if digest is None:
        digest = hashlib.sha256(value.encode()).hexdigest()
        digests[id(value)] = digest
    values.setdefault(digest, value)
    # Validated inputs hold no objects, so a one-key object is unambiguously a reference.
    return {_SHARED_REF: digest}


def _unpack(spec: Any, values: dict[str, str]) -> Any:
    """The spec with its references replaced by their values (specs of old rows have none)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("input"), dict):
        return spec
    spec["input"] = {name: _unpack_value(v, values) for name, v in spec["input"].items()}
    return spec


def _unpack_value(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_unpack_value(v, values) for v in value]
    if isinstance(value, dict) and set(value) == {_SHARED_REF}:
        return values[value[_SHARED_REF]]
    return value


def _references(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    if isinstance(value, dict):
        if set(value) == {_SHARED_REF}:
            return {str(value[_SHARED_REF])}
        return set().union(*(_references(v) for v in value.values())) if value else set()
    return set()


def _values_of(conn: Connection, job_id: str, row: Row[Any]) -> dict[str, str]:
    """Only the shared values one item's spec refers to."""
    wanted = sorted(_references(json.loads(row.spec)))
    if not wanted:
        return {}
    rows = conn.execute(select(job_values.c.digest, job_values.c.value).where(
        job_values.c.job_id == job_id, job_values.c.digest.in_(wanted)))
    return {str(r.digest): str(r.value) for r in rows}
