"""Durable jobs: every job, item, prediction id and attempt, in the SQLite state file or PostgreSQL
(one code path, SQLAlchemy Core). `JobStore` creates, reads, runs and cancels jobs and their items;
its parts keep who owns each job (`owners`), the webhook outbox (`outbox`), and what an account
may keep and old jobs' removal (`retention`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)

from replicate_generation.errors import IdempotencyConflict
from replicate_generation.jobs.audit import AuditLog
from replicate_generation.jobs.claims import RUNNER_MAY_WRITE, ItemClaims
from replicate_generation.jobs.counts import (
    JOB_FACTS,
    add_finished,
    counts_moved,
    move_items,
    state_counts,
)
from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.event_order import taking_append_order
from replicate_generation.jobs.events import ITEM_ROW, EventLog, FileSize, StoredItem
from replicate_generation.jobs.keys import IssuedKeys
from replicate_generation.jobs.outbox import WebhookOutbox
from replicate_generation.jobs.owners import Owners
from replicate_generation.jobs.retention import AccountBounds, Retention, check_room, record_size
from replicate_generation.jobs.rows import (
    CANCEL_UNCONFIRMED,
    ITEM_COLUMNS,
    ITEM_TERMINAL,
    JOB_COLUMNS,
    JOB_TERMINAL,
    OPEN_STATES,
    ItemOutcome,
    ItemRow,
    JobRow,
    NewItem,
    NewJob,
    item_row,
    job_row,
    load_job,
)
from replicate_generation.jobs.schema import job_files, job_items, job_values, jobs
from replicate_generation.jobs.shared_values import (
    ITEM_TEMPLATE,
    all_values,
    pack_specs,
    values_of,
)
from replicate_generation.jobs.spend import Budget, SpendLedger, check_budget

# The fence of the job an item belongs to, correlated with the item a statement touches.
_ITEM_FENCE = select(jobs.c.fence).where(jobs.c.id == job_items.c.job_id).scalar_subquery()
_ITEM_AND_RUNNER: list[ColumnElement[Any]] = [*ITEM_COLUMNS, job_items.c.runner]
_ITEM_AND_FENCE: list[ColumnElement[Any]] = [*_ITEM_AND_RUNNER, _ITEM_FENCE.label("job_fence")]
# Beside an item's columns: its job's template, so loading the item is one statement.
_TEMPLATE: list[ColumnElement[Any]] = [ITEM_TEMPLATE]
_ITEM_OWNER = select(jobs.c.owner).where(jobs.c.id == job_items.c.job_id).scalar_subquery()
_ITEM_CANCELED = (select(jobs.c.cancel_requested_at).where(jobs.c.id == job_items.c.job_id)
                  .scalar_subquery())
# Item rows per insert: a big job's parameters are built a chunk at a time.
INSERT_CHUNK = 500
# What became of an intent; "not_ours": the job is no longer this owner's.
IntentOutcome = Literal["stored", "canceled", "ended", "not_ours"]


@dataclass(frozen=True)
class ItemFinished:
    """A finished item's write: how many of its job's items were still open after it (0: the
    job may close now; read in the same transaction, so the last writer sees 0)."""

    open_items: int


class JobStore:
    """Jobs and their items, on SQLite or PostgreSQL; times are wall-clock seconds from the caller.

    `owners`, `outbox`, `retention`, `keys`, `spend` and `audit` share its connections
    (`JobDatabase`).
    """

    def __init__(self, target: str, *, file_size: FileSize | None = None) -> None:
        self.db = JobDatabase(target)
        # Every change a stream shows is appended in the transaction that makes it.
        self.events = EventLog(self.db, file_size=file_size)
        self.owners = Owners(self.db, self.events)
        self.claims = ItemClaims(self.db)
        self.outbox = WebhookOutbox(self.db)
        self.retention = Retention(self.db)
        self.keys = IssuedKeys(self.db)
        self.spend = SpendLedger(self.db)
        self.audit = AuditLog(self.db)
        # Built once: a job's insert, rebuilt per create, cost more than running it.
        self._insert_job = self.db.insert(jobs).on_conflict_do_nothing(
            index_elements=[jobs.c.account, jobs.c.idempotency_key],
            index_where=jobs.c.idempotency_key.is_not(None)).returning(jobs.c.id)
        files = self.db.insert(job_files)
        self._own_files = files.on_conflict_do_update(
            index_elements=[job_files.c.path], set_={"job_id": files.excluded.job_id})

    def close(self) -> None:
        """Close the pooled connections (the store opens new ones if used again)."""
        self.db.close()

    # -- submitting ------------------------------------------------------------------------

    def create(self, job: NewJob, owner: str, now: float, *,
               bounds: AccountBounds | None = None, budgets: Sequence[Budget] = (),
               first_window: int = 0) -> tuple[JobRow, bool]:
        """Insert a job and its items, its first `first_window` items claimed by `owner`; return
        (job, created), or a known Idempotency-Key's job.

        IdempotencyConflict for another body; AccountStoreFull past the account's `bounds` and
        BudgetExceeded past any of `budgets` (nothing stored); rows are built before the lock
        to keep it short.
        """
        reserved: list[float | None] = []
        specs, values = pack_specs(_noting_cost(job.items, reserved))
        size = record_size(specs, values.values())
        with self.events.write() as conn:
            existing = _keyed_job(conn, job)
            if existing is not None:
                return existing, False
            if bounds is not None:
                check_room(conn, job.account, size, bounds, now)
            for budget in budgets:
                check_budget(conn, budget, reserved, now)
            if conn.execute(self._insert_job, _new_job(job, owner, now, size)).first() is None:
                # Another process created the key's job meanwhile (PostgreSQL only).
                raced = _keyed_job(conn, job)
                assert raced is not None  # noqa: S101 - the conflict was on that key
                return raced, False
            if values:
                conn.execute(self.db.insert(job_values).on_conflict_do_nothing(
                    index_elements=[job_values.c.job_id, job_values.c.digest]),
                    [{"job_id": job.id, "digest": d, "value": v} for d, v in values.items()])
            self._insert_items(conn, job.id, specs, reserved, (owner, first_window), now)
            self.events.job_created(conn, job.id, now)
            created = load_job(conn, job.id)
        assert created is not None  # noqa: S101 - inserted in this transaction
        created.cost_usd = 0.0  # nothing has run yet
        return created, True

    def _insert_items(self, conn: Connection, job_id: str, specs: Sequence[str],
                      reserved: Sequence[float | None], window: tuple[str, int],
                      now: float) -> None:
        """The job's items, queued, the first `window[1]` claimed by `window[0]`; a chunk of
        rows at a time, so their parameters never exist for the whole job at once."""
        owner, first_window = window
        statement = insert(job_items).values(state="queued", queued_at=now)
        for start in range(0, len(specs), INSERT_CHUNK):
            conn.execute(statement, [
                {"job_id": job_id, "idx": idx, "spec": specs[idx], "reserved_usd": reserved[idx],
                 "runner": owner if idx < first_window else None}
                for idx in range(start, min(start + INSERT_CHUNK, len(specs)))])

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        with self.db.read() as conn:
            return load_job(conn, job_id)

    def items(self, job_id: str, *, only_open: bool = False) -> list[ItemRow]:
        query = select(*ITEM_COLUMNS).where(job_items.c.job_id == job_id).order_by(job_items.c.idx)
        if only_open:
            query = query.where(job_items.c.state.in_(OPEN_STATES))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
            values = all_values(conn, job_id)
        return [item_row(r, values) for r in rows]

    def items_page(self, job_id: str, *, after: int = -1, limit: int,
                   state: str | None = None) -> list[ItemRow]:
        """Up to `limit` items past index `after`, in input order, of one state if given: an
        index range read, so a page costs the same whatever the job's size."""
        query = select(*ITEM_COLUMNS).where(job_items.c.job_id == job_id, job_items.c.idx > after)
        if state is not None:
            query = query.where(job_items.c.state == state)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(job_items.c.idx).limit(limit)).all()
            values = all_values(conn, job_id) if rows else {}
        return [item_row(r, values) for r in rows]

    def open_indexes(self, job_id: str) -> list[int]:
        """The items not yet ended, in input order (without loading their specs)."""
        with self.db.read() as conn:
            rows = conn.execute(select(job_items.c.idx).where(
                job_items.c.job_id == job_id, job_items.c.state.in_(OPEN_STATES))
                .order_by(job_items.c.idx)).all()
        return [int(r.idx) for r in rows]

    def item(self, job_id: str, index: int) -> ItemRow | None:
        with self.db.read() as conn:
            row = conn.execute(select(*ITEM_COLUMNS, *_TEMPLATE).where(
                job_items.c.job_id == job_id, job_items.c.idx == index)).first()
            return item_row(row, values_of(conn, job_id, row)) if row is not None else None

    def list_jobs(self, account: str | None, limit: int,
                  after: tuple[float, str] | None = None, *,
                  key_id: str | None = None) -> list[JobRow]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page;
        with `key_id`, only that issued key's jobs."""
        query = (select(*JOB_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                 .limit(limit))
        if account is not None:
            query = query.where(jobs.c.account == account)
        if key_id is not None:
            query = query.where(jobs.c.key_id == key_id)
        if after is not None:
            # A row value: an index range on (created_at, id), not a filter over every job.
            query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(*after))
        with self.db.read() as conn:
            return [job_row(r) for r in conn.execute(query)]

    def cancel_requested(self, job_id: str) -> bool:
        with self.db.read() as conn:
            row = conn.execute(select(jobs.c.cancel_requested_at)
                               .where(jobs.c.id == job_id)).first()
        return row is None or row.cancel_requested_at is not None

    def file_job(self, path: str) -> str | None:
        """The job that wrote this output (relative to the output root), if any."""
        job_id = self.db.scalar(select(job_files.c.job_id).where(job_files.c.path == path))
        return str(job_id) if job_id is not None else None

    # -- running (a write given `fence` is void once a claim moved it: a lost owner changes nothing)

    def start_item(self, job_id: str, index: int, now: float, *, fence: int | None = None,
                   runner: str | None = None) -> ItemRow | None:
        """Mark an item running (its job too); None if it already ended (e.g. canceled), the
        job was fenced off, or another process claimed it."""
        with self.events.write() as conn:
            # The job's row first: every writer locks a job before its items (no deadlock).
            if not _fence_holds(conn, job_id, fence):
                return None
            row = conn.execute(select(*_ITEM_AND_RUNNER, *_TEMPLATE).where(
                job_items.c.job_id == job_id, job_items.c.idx == index)
                .with_for_update(key_share=True, of=job_items)).first()
            if row is None or row.state in ITEM_TERMINAL or row.runner not in (None, runner):
                return None
            conn.execute(update(job_items).where(job_items.c.job_id == job_id,
                                                 job_items.c.idx == index)
                         .values(state="running",
                                 started_at=func.coalesce(job_items.c.started_at, now)))
            move_items(conn, job_id, row.state, "running")
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued")
                         .values(state="running", started_at=func.coalesce(jobs.c.started_at,
                                                                           now)))
            if row.state != "running":
                self.events.item_changed(conn, job_id, index, now)
        with self.db.read() as conn:
            item = item_row(row, values_of(conn, job_id, row))
        item.state = "running"
        item.started_at = item.started_at or now
        return item

    def record_attempts(self, job_id: str, index: int, attempts: list[dict[str, Any]],
                        prediction: tuple[str, str] | None, *, fence: int | None = None,
                        runner: str | None = None) -> bool:
        """Write the attempts and the prediction in flight; False if the item is gone, fenced off
        or claimed by another process.

        Retried however busy the file: the create it records is paid for.
        """
        params = {"w_job": job_id, "w_idx": index, "w_fence": fence, "w_runner": runner,
                  "v_attempts": json.dumps(attempts),
                  "v_prediction_id": prediction[0] if prediction else None,
                  "v_prediction_model": prediction[1] if prediction else None}
        stmt = _ATTEMPTS if fence is None else _ATTEMPTS_FENCED
        with self.db.write(patient=True) as conn:
            return bool(conn.execute(stmt, params).rowcount)

    def item_to_run(self, job_id: str, index: int, *, fence: int | None,
                    runner: str | None = None) -> ItemRow | None:
        """The item, unless it ended, the job was fenced off or another process claimed the item
        (a read: the item is marked running by its first intent, `record_intent`, or by
        `start_item`)."""
        with self.db.read() as conn:  # one read, not one for the fence and one for the item
            row = conn.execute(_ITEM_TO_RUN, {"job_id": job_id, "idx": index}).first()
            if row is None or row.state in ITEM_TERMINAL or row.runner not in (None, runner) or (
                    fence is not None and row.job_fence != fence):
                return None
            return item_row(row, values_of(conn, job_id, row))

    def record_intent(self, job_id: str, index: int, attempts: list[dict[str, Any]], now: float,
                      *, owner: str, fence: int | None) -> IntentOutcome:
        """Store the attempts, the last a create about to be sent, and mark the item (and its
        job) running, in one write that also checks what the send depends on: the item still
        open, claimed by `owner` (or unclaimed in `owner`'s job), the job's fence held, and not
        canceled. Anything but "stored" wrote nothing, and nothing may be sent."""
        params = {"w_job": job_id, "w_idx": index, "w_owner": owner, "w_fence": fence,
                  "v_attempts": json.dumps(attempts), "v_now": now}
        with self.events.write(patient=True) as conn:
            # The job's row first, as every writer locks it (PostgreSQL: no deadlock).
            before = conn.execute(_ITEM_LOCKED, {"job_id": job_id, "idx": index}).first() \
                if self._job_locked(conn, job_id, fence) else None
            intent = _INTENT if fence is None else _INTENT_FENCED
            if before is not None and conn.execute(intent, params).rowcount:
                if before.state == "running":  # a retry's intent changes nothing a stream shows
                    conn.execute(_JOB_STARTED, {"w_job": job_id, "v_now": now})
                    return "stored"
                started = _ITEM_STARTED if self.db.backend == "sqlite" else _ITEM_STARTED_ORDERED
                facts = conn.execute(started, {"w_job": job_id, "v_count": 1,
                                               "v_now": now}).first()
                # The intent changes only the state of what the event shows: not read again.
                stored = StoredItem("running", *before[1:])
                self.events.item_changed(conn, job_id, index, now, stored=stored, facts=facts)
                return "stored"
        return self._why_no_intent(job_id, index, owner, fence)

    def _job_locked(self, conn: Connection, job_id: str, fence: int | None) -> bool:
        """For a write whose own statements check the fence: PostgreSQL share-locks the job's
        row first (every writer's lock order); SQLite's one writer holds the whole file."""
        return self.db.backend != "postgresql" or _fence_holds(conn, job_id, fence)

    def _why_no_intent(self, job_id: str, index: int, owner: str,
                       fence: int | None) -> IntentOutcome:
        with self.db.read() as conn:
            item = conn.execute(select(job_items.c.state, job_items.c.runner).where(
                job_items.c.job_id == job_id, job_items.c.idx == index)).first()
        if item is not None and item.state in ITEM_TERMINAL:
            return "ended"
        owners = self.owners
        runs_it = (owners.owner(job_id) == owner if item is None or item.runner is None
                   else item.runner == owner)
        mine = runs_it and (fence is None or owners.fence_of(job_id) == fence)
        return "canceled" if mine and self.cancel_requested(job_id) else "not_ours"

    def prediction_ids(self, account: str, since: float) -> set[str]:
        """Prediction ids the account's items queued since then own (never adopted again)."""
        query = (select(job_items.c.prediction_id)
                 .join(jobs, jobs.c.id == job_items.c.job_id)
                 .where(jobs.c.account == account, job_items.c.prediction_id.is_not(None),
                        job_items.c.queued_at >= since))
        with self.db.read() as conn:
            return {str(r.prediction_id) for r in conn.execute(query)}

    def finish_item(self, job_id: str, index: int, outcome: ItemOutcome, now: float, *,
                    fence: int | None = None, runner: str | None = None) -> ItemFinished | None:
        """Store how the item ended and own its files; None if the item is not there, the job
        was fenced off or another process claimed the item (then nothing is written)."""
        params = {"w_job": job_id, "w_idx": index, "w_fence": fence, "w_runner": runner,
                  **_finished(outcome, now)}
        # Asked before the write (a bucket is slow), and only of files not just written.
        sizes = self.events.file_sizes(outcome.files, known=outcome.sizes)
        with self.events.write() as conn:
            # The job's row first, as every writer locks it (PostgreSQL: no deadlock).
            before = conn.execute(_ITEM_BEFORE, {"job_id": job_id, "idx": index}).first() \
                if self._job_locked(conn, job_id, fence) else None
            finish = _FINISH if fence is None else _FINISH_FENCED
            if before is None or not conn.execute(finish, params).rowcount:
                return None
            self.spend.record(conn, job_id, index, outcome.billed_seconds, now)
            if outcome.files:
                conn.execute(self._own_files,
                             [{"path": path, "job_id": job_id} for path in outcome.files])
            # Last but the event: the job's row stays locked from here to the commit, and every
            # item of the job waits on it (PostgreSQL).
            facts = move_items(conn, job_id, before.state, outcome.state,
                               cost=(outcome.cost_usd or 0.0) - (before.cost_usd or 0.0),
                               then_append=True)
            # As _FINISH stored it (a Double reads back as a float): no need to read it again.
            stored = StoredItem(outcome.state, outcome.model_used,
                                None if outcome.cost_usd is None else float(outcome.cost_usd),
                                outcome.error, outcome.error_type, params["v_files"])
            still_open = self.events.item_changed(conn, job_id, index, now, sizes, stored=stored,
                                                  facts=facts)
            if still_open is None:
                still_open = conn.execute(_OPEN_ITEMS, {"job_id": job_id}).scalar()
        return ItemFinished(open_items=int(still_open or 0))

    def finish_job_if_done(self, job_id: str, now: float, *,
                           fence: int | None = None) -> JobRow | None:
        """Close the job once every item ended; return it only to the caller that closed it
        (None as well when the job was fenced off)."""
        if self._items_open(job_id):
            # Not the last: the item still open closes it, after its own write (no lock taken).
            return None
        with self.events.write() as conn:
            row = conn.execute(select(*JOB_COLUMNS).where(jobs.c.id == job_id)
                               .with_for_update(key_share=True)).first()
            if row is None or row.state in JOB_TERMINAL or (fence is not None
                                                            and row.fence != fence):
                return None
            job = job_row(row)
            counts = job.counts
            if counts["queued"] or counts["running"]:
                return None
            job.state = _final_state(job, counts, _unconfirmed_cancels(conn, job_id))
            job.finished_at = now
            job.counts = counts
            webhook = "pending" if job.webhook_url else None
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=job.state, finished_at=now, owner=None, webhook_state=webhook,
                webhook_next_at=now if webhook else None))
            add_finished(conn, job.state, counts)
            job.webhook_state = webhook
            self.events.job_finished(conn, job, now)
        return job

    def _items_open(self, job_id: str) -> bool:
        """From the job's kept counts: one row, however many items it has."""
        with self.db.read() as conn:
            return bool(conn.execute(_OPEN_ITEMS, {"job_id": job_id}).scalar())

    def request_cancel(self, job_id: str, now: float) -> list[int]:
        """Flag the job canceled and drop its queued items; return the items still running."""
        with self.events.write() as conn:
            # FOR UPDATE: item writers hold the job's row (FOR KEY SHARE) first, so they end first.
            conn.execute(select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(OPEN_STATES))
                         .values(cancel_requested_at=func.coalesce(jobs.c.cancel_requested_at,
                                                                   now)))
            dropped = conn.execute(update(job_items).where(
                job_items.c.job_id == job_id, job_items.c.state == "queued",
                job_items.c.prediction_id.is_(None)).values(
                state="canceled", finished_at=now, error="canceled before it started",
                error_type="canceled")).rowcount
            move_items(conn, job_id, "queued", "canceled", dropped)
            running = conn.execute(select(job_items.c.idx).where(
                job_items.c.job_id == job_id, job_items.c.state.in_(OPEN_STATES))).all()
            self.events.cancel_requested(conn, job_id, now)
        return [int(r.idx) for r in running]

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(jobs by state, items by state) across every process: what /metrics shows."""
        with self.db.read() as conn:
            return state_counts(conn)


# Built once: every item write runs these, and rebuilding them cost more than running them.
_FINISH_WHERE = (job_items.c.job_id == bindparam("w_job"),
                 job_items.c.idx == bindparam("w_idx"), RUNNER_MAY_WRITE)
_FINISH_VALUES: dict[str, Any] = {name: bindparam(f"v_{name}") for name in (
    "state", "model_used", "attempts", "files", "error", "error_type", "cost_usd", "placeholder",
    "notes", "finished_at")}
_FINISH = update(job_items).where(*_FINISH_WHERE).values(_FINISH_VALUES)
_FINISH_FENCED = update(job_items).where(
    *_FINISH_WHERE, _ITEM_FENCE == bindparam("w_fence")).values(_FINISH_VALUES)
_ATTEMPTS_VALUES: dict[str, Any] = {name: bindparam(f"v_{name}") for name in (
    "attempts", "prediction_id", "prediction_model")}
_ATTEMPTS = update(job_items).where(*_FINISH_WHERE).values(_ATTEMPTS_VALUES)
_ATTEMPTS_FENCED = update(job_items).where(
    *_FINISH_WHERE, _ITEM_FENCE == bindparam("w_fence")).values(_ATTEMPTS_VALUES)
_ITEM_TO_RUN = select(*_ITEM_AND_FENCE, *_TEMPLATE).where(
    job_items.c.job_id == bindparam("job_id"), job_items.c.idx == bindparam("idx"))
_ITEM_BEFORE = select(job_items.c.state, job_items.c.cost_usd).where(
    job_items.c.job_id == bindparam("job_id"), job_items.c.idx == bindparam("idx")
).with_for_update(key_share=True)
_OPEN_ITEMS = select(jobs.c.queued_items + jobs.c.running_items).where(
    jobs.c.id == bindparam("job_id"))
_INTENT_WHERE = (job_items.c.job_id == bindparam("w_job"), job_items.c.idx == bindparam("w_idx"),
                 job_items.c.state.in_(OPEN_STATES), _ITEM_CANCELED.is_(None),
                 or_(job_items.c.runner == bindparam("w_owner"),
                     and_(job_items.c.runner.is_(None), _ITEM_OWNER == bindparam("w_owner"))))
_INTENT_VALUES: dict[str, Any] = {
    "attempts": bindparam("v_attempts"), "prediction_id": None, "prediction_model": None,
    "state": "running", "started_at": func.coalesce(job_items.c.started_at, bindparam("v_now"))}
_INTENT = update(job_items).where(*_INTENT_WHERE).values(_INTENT_VALUES)
_INTENT_FENCED = update(job_items).where(
    *_INTENT_WHERE, _ITEM_FENCE == bindparam("w_fence")).values(_INTENT_VALUES)
_JOB_STARTED = update(jobs).where(jobs.c.id == bindparam("w_job"), jobs.c.state == "queued").values(
    state="running", started_at=func.coalesce(jobs.c.started_at, bindparam("v_now")))
# A queued item's intent: its job's counts move and the job starts, in one statement.
_STARTING = jobs.c.state == "queued"
_ITEM_STARTED = counts_moved("queued", "running").values(
    state=case((_STARTING, "running"), else_=jobs.c.state),
    started_at=case((_STARTING, func.coalesce(jobs.c.started_at, bindparam("v_now"))),
                    else_=jobs.c.started_at)).returning(*JOB_FACTS)
_ITEM_STARTED_ORDERED = _ITEM_STARTED.returning(taking_append_order())
_FENCE = select(jobs.c.fence).where(jobs.c.id == bindparam("job_id")).with_for_update(
    read=True, key_share=True)
# The item's state and what its events show (events.StoredItem's order), its row locked.
_ITEM_LOCKED = ITEM_ROW.with_for_update(key_share=True)


def _fence_holds(conn: Connection, job_id: str, fence: int | None) -> bool:
    """Share-lock the job's row (PostgreSQL: FOR KEY SHARE, so a claim waits but the job's other
    items do not); True if it is there with this fence (or any, if None)."""
    current = conn.execute(_FENCE, {"job_id": job_id}).scalar()
    return current is not None and (fence is None or current == fence)


def _keyed_job(conn: Connection, job: NewJob) -> JobRow | None:
    """The job created before with this job's Idempotency-Key, if any."""
    if job.idempotency_key is None:
        return None
    row = conn.execute(select(*JOB_COLUMNS).where(
        jobs.c.account == job.account, jobs.c.idempotency_key == job.idempotency_key)).first()
    if row is None:
        return None
    existing = job_row(row)
    if existing.request_hash != job.request_hash or existing.key_id != job.key_id:
        raise IdempotencyConflict(job.idempotency_key)
    return existing


def _final_state(job: JobRow, counts: dict[str, int], unconfirmed: int = 0) -> str:
    """Expired items count as failed ones: none succeeded is "failed", some "partially_failed"."""
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


def _noting_cost(items: Iterable[NewItem],
                 reserved: list[float | None]) -> Iterator[dict[str, Any]]:
    """Each item's spec, its most possible cost appended to `reserved` as it passes."""
    for item in items:
        reserved.append(item.reserved_usd)
        yield item.spec


def _new_job(job: NewJob, owner: str, now: float, size: int) -> dict[str, Any]:
    """The job row's values, for the store's prepared insert."""
    return {"id": job.id, "account": job.account, "kind": job.kind, "origin": job.origin,
            "state": "queued", "request_id": job.request_id, "item_count": len(job.items),
            "queued_items": len(job.items), "owner": owner, "created_at": now,
            "idempotency_key": job.idempotency_key, "request_hash": job.request_hash,
            "webhook_url": job.webhook_url, "webhook_private": int(job.webhook_private),
            "fence": 1, "record_bytes": size, "key_id": job.key_id, "caller": job.caller,
            "priority": job.priority, "start_deadline": job.start_deadline}


def _finished(outcome: ItemOutcome, now: float) -> dict[str, Any]:
    """The finished item's values, for the prepared update."""
    return {"v_state": outcome.state, "v_model_used": outcome.model_used,
            "v_attempts": json.dumps(outcome.attempts), "v_files": json.dumps(outcome.files),
            "v_error": outcome.error, "v_error_type": outcome.error_type,
            "v_cost_usd": outcome.cost_usd, "v_placeholder": int(outcome.placeholder),
            "v_notes": json.dumps(outcome.notes), "v_finished_at": now}
