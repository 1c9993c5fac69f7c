"""Each job's event log (job_events), appended by the store in the transaction of the change it
describes and read by the event streams after a Last-Event-ID.

Ids are in commit order, so a reader that has seen id N never meets a smaller one later: SQLite has
one writer at a time, and on PostgreSQL an append takes one transaction-scoped advisory lock as its
transaction's last step (taken last, it waits on nothing while held: no deadlock).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import quote

from sqlalchemy import ColumnElement, Connection, Row, bindparam, func, insert, select

from replicate_generation.jobs.counts import JOB_FACTS
from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.event_order import APPEND_ORDER, took_append_order
from replicate_generation.jobs.rows import JobRow, count_items, job_cost, kept_counts
from replicate_generation.jobs.schema import job_events, job_items, jobs

log = logging.getLogger(__name__)

# conn.info key: whether this transaction appended, so its commit wakes the streams.
_APPENDED = "rg_job_events_appended"
# Events one read returns at most (a stream reads again at once while there are more).
READ_BATCH = 200

# Built once: rebuilding a statement per append cost more than running it.
_OWNER = select(jobs.c.account, jobs.c.key_id).where(jobs.c.id == bindparam("job_id"))
_INSERT = insert(job_events)
# An item's columns its events show; the store's intent reads them too, locking the row.
ITEM_ROW = select(job_items.c.state, job_items.c.model_used, job_items.c.cost_usd,
                  job_items.c.error, job_items.c.error_type, job_items.c.files).where(
    job_items.c.job_id == bindparam("job_id"), job_items.c.idx == bindparam("idx"))
_JOB_FACTS = select(*JOB_FACTS).where(jobs.c.id == bindparam("job_id"))

FileSize = Callable[[str], "int | None"]


class StoredItem(NamedTuple):
    """An item's columns its events show (ITEM_ROW's), as the writer just stored them."""

    state: str
    model_used: str | None
    cost_usd: float | None
    error: str | None
    error_type: str | None
    files: str  # the JSON list stored


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    kind: str
    data: str  # JSON, one line


@dataclass(frozen=True)
class Scope:
    """Whose events a stream sends: one job's, or every job a caller may see (GET /jobs's rule:
    everything for the admin, an issued key's own jobs, a token's account's jobs)."""

    job_id: str | None = None
    account: str | None = None
    key_id: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        if self.job_id is not None:
            found.append(job_events.c.job_id == self.job_id)
        if self.key_id is not None:
            found.append(job_events.c.key_id == self.key_id)
        elif self.account is not None:
            found.append(job_events.c.account == self.account)
        return found


class EventLog:
    """Appends (inside the store's write transactions) and reads of job_events.

    `file_size` gives an output's bytes from its path in the output store (None: unknown);
    callbacks given to `on_commit` run after each commit that appended, in the writer's thread.
    """

    def __init__(self, db: JobDatabase, *, file_size: FileSize | None = None) -> None:
        self._db = db
        self._file_size = file_size
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_commit(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    @contextmanager
    def write(self, *, patient: bool = False) -> Iterator[Connection]:
        """The store's write transaction; once it commits, if it appended, wake the streams."""
        appended: list[bool] = []
        with self._db.write(patient=patient) as conn:
            conn.info[_APPENDED] = appended  # the connection goes back to its pool at the end
            try:
                yield conn
            finally:
                if not conn.invalidated:  # a lost server's connection has no info left to read
                    conn.info.pop(_APPENDED, None)
        if appended:
            self._announce()

    def _announce(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a wake-up is a hint: streams re-read anyway
                log.exception("an event wake-up failed")

    # -- appends (each the last statements of its transaction) ----------------------------

    def job_created(self, conn: Connection, job_id: str, now: float) -> None:
        self._append(conn, job_id, "job.created", now, lambda: {
            "state": "queued", "counts": count_items(conn, job_id)})

    def file_sizes(self, paths: Sequence[str], *,
                   known: Mapping[str, int] | None = None) -> dict[str, int | None]:
        """Each output's bytes (None: unknown): `known`, else looked up (before a write)."""
        known = known or {}
        return {path: known[path] if path in known else self._size_of(path) for path in paths}

    def _size_of(self, path: str) -> int | None:
        return self._file_size(path) if self._file_size is not None else None

    def item_changed(self, conn: Connection, job_id: str, index: int, now: float,
                     sizes: Mapping[str, int | None] | None = None, *,
                     stored: StoredItem | None = None, facts: Row[Any] | None = None,
                     ) -> int | None:
        """The item's state as stored now (`stored`: what this write just stored, not read
        again); a finished item's files follow, one event each (`sizes`: their bytes). Returns
        the job's open items as this write leaves them (None: no such item or job). `facts`:
        the job's JOB_FACTS as this write's update of its row returned them (its row stays
        locked to the commit, so no later write of the job can come between), with the append
        order's lock when that update took it (event_order)."""
        row = stored if stored is not None else conn.execute(
            ITEM_ROW, {"job_id": job_id, "idx": index}).first()
        if row is None:
            return None
        if self._db.backend == "postgresql" and not took_append_order(facts):
            conn.execute(APPEND_ORDER)
        # Read after the lock, as _append does: the owner, counts and cost in one statement.
        job = facts if facts is not None else conn.execute(
            _JOB_FACTS, {"job_id": job_id}).first()
        if job is None:
            return None
        bodies = [("item.state", _item_state(job, index, row))]
        bodies += [("item.file", _file(index, path, (sizes or {}).get(path)))
                   for path in json.loads(row.files)]
        conn.execute(_INSERT, [
            {"job_id": job_id, "account": job.account, "key_id": job.key_id, "at": now,
             "kind": kind, "data": json.dumps({"job_id": job_id, **data}, separators=(",", ":"))}
            for kind, data in bodies])  # one row at a time, in this order: ids follow it
        conn.info.get(_APPENDED, []).append(True)
        return int(job.queued_items) + int(job.running_items)

    def cancel_requested(self, conn: Connection, job_id: str, now: float) -> None:
        """The job asked to cancel, with the queued items this very write canceled."""
        if conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar() not in (
                "queued", "running"):
            return  # ended already: a cancel changes nothing a stream shows
        self._append(conn, job_id, "job.cancel_requested", now, lambda: {
            "state": "cancel_requested", "canceled": _ended_at(conn, job_id, now, "canceled"),
            "counts": count_items(conn, job_id)})

    def items_failed(self, conn: Connection, job_id: str, error_type: str | None,
                     now: float) -> None:
        """Queued items this write failed at once (their account's token was refused)."""
        self._append(conn, job_id, "items.failed", now, lambda: {
            "indexes": _ended_at(conn, job_id, now, "failed"), "error_type": error_type,
            "counts": count_items(conn, job_id)})

    def job_finished(self, conn: Connection, job: JobRow, now: float) -> None:
        self._append(conn, job.id, "job.finished", now, lambda: {
            "state": job.state, "counts": job.counts, "cost_usd": job_cost(conn, job.id)})

    def _append(self, conn: Connection, job_id: str, kind: str, now: float,
                data: Callable[[], dict[str, Any]]) -> None:
        """Lock first, then read what the event says: it matches the order of the ids."""
        owner = conn.execute(_OWNER, {"job_id": job_id}).first()
        if owner is None:
            return
        if self._db.backend == "postgresql":
            conn.execute(APPEND_ORDER)
        body = json.dumps({"job_id": job_id, **data()}, separators=(",", ":"))
        conn.execute(_INSERT, {"job_id": job_id, "account": owner.account,
                               "key_id": owner.key_id, "at": now, "kind": kind, "data": body})
        conn.info.get(_APPENDED, []).append(True)

    # -- reads -------------------------------------------------------------------------------

    def after(self, scope: Scope, after_id: int, limit: int = READ_BATCH) -> list[Event]:
        """The scope's events with ids above `after_id`, oldest first."""
        query = (select(job_events.c.id, job_events.c.job_id, job_events.c.kind,
                        job_events.c.data)
                 .where(job_events.c.id > after_id, *scope.where())
                 .order_by(job_events.c.id).limit(limit))
        with self._db.read() as conn:
            return [Event(int(r.id), str(r.job_id), str(r.kind), str(r.data))
                    for r in conn.execute(query)]

    def last_id(self, scope: Scope) -> int:
        """The newest id in the scope (0 when none): where a stream with no Last-Event-ID
        starts."""
        newest = self._db.scalar(select(func.max(job_events.c.id)).where(*scope.where()))
        return int(newest or 0)


def _file(index: int, path: str, size: int | None) -> dict[str, Any]:
    return {"index": index, "name": PurePosixPath(path).name, "url": f"/files/{quote(path)}",
            "size": size}


def _ended_at(conn: Connection, job_id: str, now: float, state: str) -> list[int]:
    """The job's items that ended in `state` at `now`: those the current write ended."""
    return [int(i) for (i,) in conn.execute(select(job_items.c.idx).where(
        job_items.c.job_id == job_id, job_items.c.state == state,
        job_items.c.finished_at == now).order_by(job_items.c.idx))]


def _item_state(job: Any, index: int, row: Any) -> dict[str, Any]:
    """An item.state event's data, from the item's row and its job's (_JOB_FACTS)."""
    body: dict[str, Any] = {"index": index, "state": row.state, "counts": kept_counts(job)}
    if row.state not in ("queued", "running"):
        body.update(model_used=row.model_used, cost_usd=row.cost_usd, error=row.error,
                    error_type=row.error_type, job_cost_usd=round(float(job.cost_usd or 0.0), 6))
    return body
