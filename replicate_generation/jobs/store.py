"""Durable jobs: every job, item, prediction id and attempt in the shared SQLite state file.

A job belongs to the process that runs it (`owner`, a worker id with a heartbeat). When an owner's
heartbeat stops, another process claims its unfinished jobs and resumes them: an item with a
prediction id is polled, never created again. Nothing here calls Replicate.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicate_generation.sqlite_db import Database

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

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        kind TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'service',
        state TEXT NOT NULL,
        request_id TEXT NOT NULL,
        item_count INTEGER NOT NULL,
        owner TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        cancel_requested_at REAL,
        idempotency_key TEXT,
        request_hash TEXT,
        webhook_url TEXT,
        webhook_private INTEGER NOT NULL DEFAULT 0,
        webhook_state TEXT,
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        webhook_next_at REAL,
        webhook_error TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(account, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs(account, created_at DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_open ON jobs(state) WHERE state IN ('queued', 'running')",
    "CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs(webhook_next_at)"
    " WHERE webhook_state = 'pending'",
    """CREATE TABLE IF NOT EXISTS job_items (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        prediction_id TEXT,
        prediction_model TEXT,
        model_used TEXT,
        attempts TEXT NOT NULL DEFAULT '[]',
        files TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        error_type TEXT,
        cost_usd REAL,
        placeholder INTEGER NOT NULL DEFAULT 0,
        notes TEXT NOT NULL DEFAULT '[]',
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (job_id, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS job_files (
        path TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS job_files_by_job ON job_files(job_id)",
    # Values the items of a job share (a reference image...), once each, by sha256 digest.
    """CREATE TABLE IF NOT EXISTS job_values (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (job_id, digest)
    )""",
    """CREATE TABLE IF NOT EXISTS job_workers (
        id TEXT PRIMARY KEY,
        heartbeat_at REAL NOT NULL
    )""",
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another request body."""


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


_JOB_COLUMNS = ("id, account, kind, state, request_id, item_count, owner, created_at, started_at,"
                " finished_at, cancel_requested_at, idempotency_key, request_hash, webhook_url,"
                " webhook_private, webhook_state, webhook_attempts, webhook_next_at, webhook_error")
_ITEM_COLUMNS = ("job_id, idx, spec, state, prediction_id, prediction_model, model_used, attempts,"
                 " files, error, error_type, cost_usd, placeholder, notes, queued_at, started_at,"
                 " finished_at")


class JobStore:
    """The jobs tables of the state file. Times are wall-clock seconds given by the caller."""

    def __init__(self, path: str) -> None:
        self._db = Database(path)
        with self._db.write(patient=True) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- submitting ------------------------------------------------------------------------

    def create(self, job: NewJob, owner: str, now: float) -> tuple[JobRow, bool]:
        """Insert a job and its items at once; with a known Idempotency-Key return that job.

        Returns (job, created). Raises IdempotencyConflict when the key was used with another
        body. The rows are built before the write lock is taken, so the transaction stays short.
        """
        rows, values = _pack_items(job.id, job.items)
        with self._db.write() as conn:
            if job.idempotency_key is not None:
                existing = conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE account = ? AND idempotency_key = ?",
                    (job.account, job.idempotency_key)).fetchone()
                if existing is not None:
                    row = _job(existing)
                    if row.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    row.counts = _counts(conn, row.id)
                    return row, False
            conn.execute(
                "INSERT INTO jobs (id, account, kind, origin, state, request_id, item_count,"
                " owner, created_at, idempotency_key, request_hash, webhook_url,"
                " webhook_private) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.account, job.kind, job.origin, job.request_id, len(job.items),
                 owner, now, job.idempotency_key, job.request_hash, job.webhook_url,
                 int(job.webhook_private)))
            conn.executemany("INSERT OR IGNORE INTO job_values (job_id, digest, value)"
                             " VALUES (?, ?, ?)", values)
            conn.executemany(
                "INSERT INTO job_items (job_id, idx, spec, state, queued_at)"
                " VALUES (?, ?, ?, 'queued', ?)", [(*row, now) for row in rows])
            created = _job(conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                                        (job.id,)).fetchone())
            created.counts = _counts(conn, job.id)
        return created, True

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        with self._db.read() as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            job.counts = _counts(conn, job_id)
            return job

    def items(self, job_id: str, *, only_open: bool = False) -> list[ItemRow]:
        where = " AND state IN ('queued', 'running')" if only_open else ""
        with self._db.read() as conn:
            rows = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM job_items WHERE job_id = ?{where}"
                                " ORDER BY idx", (job_id,)).fetchall()
            # One copy of each shared value for all the items, however many there are.
            values = dict(conn.execute("SELECT digest, value FROM job_values WHERE job_id = ?",
                                       (job_id,)).fetchall())
        return [_item(r, values) for r in rows]

    def open_indexes(self, job_id: str) -> list[int]:
        """The items not yet ended, in input order (without loading their specs)."""
        with self._db.read() as conn:
            rows = conn.execute("SELECT idx FROM job_items WHERE job_id = ? AND state IN"
                                " ('queued', 'running') ORDER BY idx", (job_id,)).fetchall()
        return [int(r[0]) for r in rows]

    def item(self, job_id: str, index: int) -> ItemRow | None:
        with self._db.read() as conn:
            row = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM job_items WHERE job_id = ? AND"
                               " idx = ?", (job_id, index)).fetchone()
            return _item(row, _values_of(conn, job_id, row)) if row is not None else None

    def list_jobs(self, account: str | None, limit: int,
                  after: tuple[float, str] | None = None) -> list[JobRow]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        clauses, params = [], []  # type: tuple[list[str], list[object]]
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        if after is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([after[0], after[0], after[1]])
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._db.read() as conn:
            rows = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs{where}"
                                " ORDER BY created_at DESC, id DESC LIMIT ?",
                                (*params, limit)).fetchall()
            jobs = [_job(r) for r in rows]
            for job in jobs:
                job.counts = _counts(conn, job.id)
        return jobs

    def owner(self, job_id: str) -> str | None:
        row = self._db.connection().execute("SELECT owner FROM jobs WHERE id = ?",
                                            (job_id,)).fetchone()
        return str(row[0]) if row and row[0] is not None else None

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db.connection().execute(
            "SELECT cancel_requested_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or row[0] is not None

    def file_job(self, path: str) -> str | None:
        """The job that wrote this output (relative to the output root), if any."""
        row = self._db.connection().execute(
            "SELECT job_id FROM job_files WHERE path = ?", (path,)).fetchone()
        return str(row[0]) if row else None

    # -- running ---------------------------------------------------------------------------

    def start_item(self, job_id: str, index: int, now: float) -> ItemRow | None:
        """Mark an item running (its job too); None if it already ended (e.g. canceled)."""
        with self._db.write() as conn:
            row = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM job_items WHERE job_id = ? AND"
                               " idx = ?", (job_id, index)).fetchone()
            if row is None or row[3] in ITEM_TERMINAL:
                return None
            conn.execute("UPDATE job_items SET state = 'running', started_at ="
                         " COALESCE(started_at, ?) WHERE job_id = ? AND idx = ?",
                         (now, job_id, index))
            conn.execute("UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?)"
                         " WHERE id = ? AND state = 'queued'", (now, job_id))
        with self._db.read() as conn:
            item = _item(row, _values_of(conn, job_id, row))
        item.state = "running"
        item.started_at = item.started_at or now
        return item

    def record_attempts(self, job_id: str, index: int, attempts: list[dict[str, Any]],
                        prediction: tuple[str, str] | None) -> None:
        """Write the attempts so far, and the prediction now in flight (id, model) or none.

        Retried until it is stored, however busy the file: the create it records is paid for.
        """
        with self._db.write(patient=True) as conn:
            conn.execute("UPDATE job_items SET attempts = ?, prediction_id = ?,"
                         " prediction_model = ? WHERE job_id = ? AND idx = ?",
                         (json.dumps(attempts), prediction[0] if prediction else None,
                          prediction[1] if prediction else None, job_id, index))

    def prediction_ids(self, account: str, since: float) -> set[str]:
        """Prediction ids the account's items queued since then own (never adopted again)."""
        rows = self._db.connection().execute(
            "SELECT i.prediction_id FROM job_items i JOIN jobs j ON j.id = i.job_id"
            " WHERE j.account = ? AND i.prediction_id IS NOT NULL AND i.queued_at >= ?",
            (account, since))
        return {str(row[0]) for row in rows}

    def finish_item(self, job_id: str, index: int, outcome: ItemOutcome, now: float) -> None:
        with self._db.write() as conn:
            conn.execute(
                "UPDATE job_items SET state = ?, model_used = ?, attempts = ?, files = ?,"
                " error = ?, error_type = ?, cost_usd = ?, placeholder = ?, notes = ?,"
                " finished_at = ? WHERE job_id = ? AND idx = ?",
                (outcome.state, outcome.model_used, json.dumps(outcome.attempts),
                 json.dumps(outcome.files), outcome.error, outcome.error_type, outcome.cost_usd,
                 int(outcome.placeholder), json.dumps(outcome.notes), now, job_id, index))
            conn.executemany("INSERT OR REPLACE INTO job_files (path, job_id) VALUES (?, ?)",
                             [(path, job_id) for path in outcome.files])

    def finish_job_if_done(self, job_id: str, now: float) -> JobRow | None:
        """Close the job once every item ended; return it only to the caller that closed it."""
        with self._db.write() as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None or row[3] in JOB_TERMINAL:
                return None
            counts = _counts(conn, job_id)
            if counts["queued"] or counts["running"]:
                return None
            job = _job(row)
            job.state = _final_state(job, counts, _unconfirmed_cancels(conn, job_id))
            job.finished_at = now
            job.counts = counts
            webhook = "pending" if job.webhook_url else None
            conn.execute("UPDATE jobs SET state = ?, finished_at = ?, owner = NULL,"
                         " webhook_state = ?, webhook_next_at = ? WHERE id = ?",
                         (job.state, now, webhook, now if webhook else None, job_id))
            job.webhook_state = webhook
        return job

    def request_cancel(self, job_id: str, now: float) -> list[int]:
        """Flag the job canceled and drop its queued items; return the items still running."""
        with self._db.write() as conn:
            conn.execute("UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, ?)"
                         " WHERE id = ? AND state IN ('queued', 'running')", (now, job_id))
            conn.execute("UPDATE job_items SET state = 'canceled', finished_at = ?,"
                         " error = 'canceled before it started', error_type = 'canceled'"
                         " WHERE job_id = ? AND state = 'queued' AND prediction_id IS NULL",
                         (now, job_id))
            running = conn.execute("SELECT idx FROM job_items WHERE job_id = ? AND state IN"
                                   " ('queued', 'running')", (job_id,)).fetchall()
        return [int(r[0]) for r in running]

    # -- owners: heartbeats and recovery -----------------------------------------------------

    def heartbeat(self, worker: str, now: float) -> None:
        with self._db.write() as conn:
            conn.execute("INSERT INTO job_workers (id, heartbeat_at) VALUES (?, ?)"
                         " ON CONFLICT(id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                         (worker, now))

    def retire(self, worker: str) -> None:
        """A worker that stops cleanly hands its open jobs over at once."""
        with self._db.write() as conn:
            conn.execute("UPDATE jobs SET owner = NULL WHERE owner = ?", (worker,))
            conn.execute("DELETE FROM job_workers WHERE id = ?", (worker,))

    def claim_orphans(self, worker: str, accounts: Container[str], now: float, ttl: float,
                      origin: str = "service") -> list[str]:
        """Take over open jobs whose owner is gone, for accounts this worker can pay with.

        The orphans are read first and matched against `accounts` here, so the query never grows
        with the number of accounts (an `IN (...)` of them would pass SQLite's variable limit).
        Only jobs of the same origin: a script on the host never takes over the service's jobs
        (it would write them into its own output directory), nor the service a script's.
        """
        with self._db.write() as conn:
            conn.execute("DELETE FROM job_workers WHERE heartbeat_at < ?", (now - ttl,))
            rows = conn.execute(
                "SELECT id, account FROM jobs WHERE state IN ('queued', 'running')"
                " AND origin = ? AND (owner IS NULL OR owner NOT IN (SELECT id FROM job_workers))",
                (origin,)).fetchall()
            ids = [str(r[0]) for r in rows if r[1] in accounts]
            conn.executemany("UPDATE jobs SET owner = ? WHERE id = ?", [(worker, i) for i in ids])
        return ids

    def fail_queued_items(self, worker: str, account: str, outcome: ItemOutcome,
                          now: float) -> list[str]:
        """End every queued item of the account's open jobs this worker owns with `outcome`
        (at once, nothing is sent anywhere); return the ids of the jobs touched."""
        with self._db.write() as conn:
            jobs = [str(r[0]) for r in conn.execute(
                "SELECT id FROM jobs WHERE account = ? AND owner = ?"
                " AND state IN ('queued', 'running')", (account, worker))]
            conn.executemany(
                "UPDATE job_items SET state = ?, error = ?, error_type = ?, finished_at = ?"
                " WHERE job_id = ? AND state = 'queued'",
                [(outcome.state, outcome.error, outcome.error_type, now, job_id)
                 for job_id in jobs])
        return jobs

    def release_job(self, job_id: str, worker: str) -> None:
        """Give a job back to the pool of orphans (this worker could not queue it)."""
        with self._db.write() as conn:
            conn.execute("UPDATE jobs SET owner = NULL WHERE id = ? AND owner = ?",
                         (job_id, worker))

    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(jobs by state, items by state) across every process: what /metrics shows."""
        with self._db.read() as conn:
            jobs = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            items = dict(conn.execute("SELECT state, COUNT(*) FROM job_items GROUP BY state"))
        return jobs, items

    def probe_write(self) -> None:
        """Raise unless the state file can be opened and written afresh (readiness)."""
        self._db.probe_write()

    # -- webhooks --------------------------------------------------------------------------

    def claim_webhook(self, now: float, lease: float) -> JobRow | None:
        """Take one due delivery, pushing its next attempt out by `lease` while it runs."""
        with self._db.write() as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE webhook_state = 'pending'"
                               " AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT 1",
                               (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET webhook_next_at = ? WHERE id = ?",
                         (now + lease, row[0]))
            job = _job(row)
            job.counts = _counts(conn, job.id)
        return job

    def webhook_done(self, job_id: str, state: str, attempts: int, next_at: float | None,
                     error: str | None) -> None:
        with self._db.write() as conn:
            conn.execute("UPDATE jobs SET webhook_state = ?, webhook_attempts = ?,"
                         " webhook_next_at = ?, webhook_error = ? WHERE id = ?",
                         (state, attempts, next_at, error, job_id))

    def next_webhook_at(self) -> float | None:
        row = self._db.connection().execute(
            "SELECT MIN(webhook_next_at) FROM jobs WHERE webhook_state = 'pending'").fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # -- retention -------------------------------------------------------------------------

    def expired(self, before: float, limit: int = 500) -> list[tuple[str, str]]:
        """Finished jobs older than the retention (and not awaiting a webhook): (id, request_id)."""
        rows = self._db.connection().execute(
            "SELECT id, request_id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
            " AND (webhook_state IS NULL OR webhook_state != 'pending') LIMIT ?",
            (before, limit)).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def delete(self, job_ids: Sequence[str]) -> None:
        """Remove jobs one transaction each, so a big purge never holds the lock for long."""
        for job_id in job_ids:
            with self._db.write() as conn:
                for table, column in (("job_files", "job_id"), ("job_values", "job_id"),
                                      ("job_items", "job_id"), ("jobs", "id")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} = ?",  # noqa: S608
                                 (job_id,))


def _final_state(job: JobRow, counts: dict[str, int], unconfirmed: int = 0) -> str:
    # "canceled" only when no prediction of the job may still be running on Replicate.
    if job.cancel_requested_at is not None and not unconfirmed:
        return "canceled"
    if counts["succeeded"] == job.item_count:
        return "succeeded"
    if counts["succeeded"] == 0:
        return "failed"
    return "partially_failed"


def _unconfirmed_cancels(conn: sqlite3.Connection, job_id: str) -> int:
    row = conn.execute("SELECT COUNT(*) FROM job_items WHERE job_id = ? AND error_type = ?",
                       (job_id, CANCEL_UNCONFIRMED)).fetchone()
    return int(row[0])


def _counts(conn: sqlite3.Connection, job_id: str) -> dict[str, int]:
    counts = dict.fromkeys(ITEM_STATES, 0)
    for state, count in conn.execute("SELECT state, COUNT(*) FROM job_items WHERE job_id = ?"
                                     " GROUP BY state", (job_id,)):
        counts[str(state)] = int(count)
    return counts


def _job(row: Sequence[Any]) -> JobRow:
    # Stored as queued/running (so recovery still finds it); shown as what it is.
    state = CANCEL_REQUESTED if row[10] is not None and row[3] not in JOB_TERMINAL else row[3]
    return JobRow(
        id=row[0], account=row[1], kind=row[2], state=state, request_id=row[4],
        item_count=int(row[5]), owner=row[6], created_at=float(row[7]), started_at=row[8],
        finished_at=row[9], cancel_requested_at=row[10], idempotency_key=row[11],
        request_hash=row[12], webhook_url=row[13], webhook_private=bool(row[14]),
        webhook_state=row[15], webhook_attempts=int(row[16]), webhook_next_at=row[17],
        webhook_error=row[18])


def _item(row: Sequence[Any], values: dict[str, str]) -> ItemRow:
    return ItemRow(
        job_id=row[0], index=int(row[1]), spec=_unpack(json.loads(row[2]), values), state=row[3],
        prediction_id=row[4], prediction_model=row[5], model_used=row[6],
        attempts=json.loads(row[7]), files=json.loads(row[8]), error=row[9], error_type=row[10],
        cost_usd=row[11], placeholder=bool(row[12]), notes=json.loads(row[13]),
        queued_at=float(row[14]), started_at=row[15], finished_at=row[16])


# -- shared values: stored once per job, referenced by digest from each item's spec -----------


def _pack_items(job_id: str, items: Sequence[NewItem]) -> tuple[list[tuple[str, int, str]],
                                                                  list[tuple[str, str, str]]]:
    """Item rows (job, index, spec JSON) with long input strings replaced by references, and
    the (job, digest, value) rows those references name, each value once."""
    digests: dict[int, str] = {}  # by id(): 1,000 items sharing one string hash it once
    values: dict[str, str] = {}
    rows = [(job_id, index, json.dumps(_pack(item.spec, digests, values)))
            for index, item in enumerate(items)]
    return rows, [(job_id, digest, value) for digest, value in values.items()]


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


def _values_of(conn: sqlite3.Connection, job_id: str, row: Sequence[Any]) -> dict[str, str]:
    """Only the shared values one item's spec refers to."""
    wanted = sorted(_references(json.loads(row[2])))
    if not wanted:
        return {}
    marks = ", ".join("?" for _ in wanted)
    return dict(conn.execute(f"SELECT digest, value FROM job_values WHERE job_id = ?"  # noqa: S608
                             f" AND digest IN ({marks})", [job_id, *wanted]).fetchall())
