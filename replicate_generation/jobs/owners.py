"""Who runs each job: workers' heartbeats, a dead owner's open jobs claimed by a live one (each
claim bumps the job's fencing number), jobs handed back, and an account's queued items failed at
once when Replicate refuses its token."""

from __future__ import annotations

from collections.abc import Container, Mapping

from sqlalchemy import bindparam, delete, or_, select, update

from replicate_generation.jobs.counts import end_queued_items
from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.events import EventLog
from replicate_generation.jobs.rows import OPEN_STATES, ItemOutcome
from replicate_generation.jobs.schema import job_items, job_workers, jobs


class Owners:
    """The ownership of jobs, on the store's database."""

    def __init__(self, db: JobDatabase, events: EventLog) -> None:
        self._db = db
        self._events = events

    def heartbeat(self, worker: str, now: float) -> None:
        stmt = self._db.insert(job_workers).values(id=worker, heartbeat_at=now)
        with self._db.write() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[job_workers.c.id],
                set_={"heartbeat_at": stmt.excluded.heartbeat_at}))

    def retire(self, worker: str) -> None:
        """A worker that stops cleanly hands its open jobs and unstarted items over at once."""
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.owner == worker).values(owner=None))
            conn.execute(update(job_items).where(job_items.c.runner == worker,
                                                 job_items.c.state == "queued").values(runner=None))
            conn.execute(delete(job_workers).where(job_workers.c.id == worker))

    def owner(self, job_id: str) -> str | None:
        owner = self._db.scalar(select(jobs.c.owner).where(jobs.c.id == job_id))
        return str(owner) if owner is not None else None

    def fence_of(self, job_id: str) -> int:
        """The job's fencing number (0 for a job that is not there, or untouched since before
        fencing): a claim carries it to the owner's writes."""
        return int(self._db.scalar(select(jobs.c.fence).where(jobs.c.id == job_id)) or 0)

    def claim_orphans(self, worker: str, accounts: Container[str], now: float, ttl: float,
                      origin: str = "service") -> list[str]:
        """Take over ownerless open jobs of `origin` that `accounts` can pay for; bump each fence.

        Accounts match here, not in SQL (an IN list can pass SQLite's limit); PG skips locked rows.
        """
        live = select(job_workers.c.id)
        orphans = select(jobs.c.id, jobs.c.account).where(
            jobs.c.state.in_(OPEN_STATES), jobs.c.origin == origin,
            or_(jobs.c.owner.is_(None), jobs.c.owner.not_in(live)),
        ).with_for_update(skip_locked=True, key_share=True)
        with self._db.write() as conn:
            conn.execute(delete(job_workers).where(job_workers.c.heartbeat_at < now - ttl))
            ids = [str(r.id) for r in conn.execute(orphans) if r.account in accounts]
            if ids:
                conn.execute(update(jobs).where(jobs.c.id == bindparam("claimed"))
                             .values(owner=worker, fence=jobs.c.fence + 1),
                             [{"claimed": job_id} for job_id in ids])
                # Under the new fence every open item is the new owner's to claim again.
                conn.execute(update(job_items).where(
                    job_items.c.job_id == bindparam("claimed"),
                    or_(*(job_items.c.state == state for state in OPEN_STATES)))
                    .values(runner=None),
                    [{"claimed": job_id} for job_id in ids])
        return ids

    def release_job(self, job_id: str, worker: str) -> None:
        """Give a job back to the pool of orphans (this worker could not queue it)."""
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.owner == worker)
                         .values(owner=None))

    def fail_queued_items(self, worker: str, account: str, outcome: ItemOutcome, now: float, *,
                          fence: Mapping[str, int] | None = None) -> list[str]:
        """End the queued items of the account's jobs this worker owns (sending nothing); job ids.

        Given `fence` (job id -> fence held), a job missing from it or fenced off is left alone.
        """
        # FOR UPDATE: item writers hold a job's row (FOR KEY SHARE) first, so they end first.
        owned = select(jobs.c.id, jobs.c.fence).where(
            jobs.c.account == account, jobs.c.owner == worker, jobs.c.state.in_(OPEN_STATES),
        ).with_for_update()
        with self._events.write() as conn:
            ids = [str(r.id) for r in conn.execute(owned)
                   if fence is None or fence.get(str(r.id)) == r.fence]
            if ids:
                conn.execute(update(job_items).where(
                    job_items.c.job_id == bindparam("failed"), job_items.c.state == "queued")
                    .values(state=outcome.state, error=outcome.error,
                            error_type=outcome.error_type, finished_at=now),
                    [{"failed": job_id} for job_id in ids])
                end_queued_items(conn, ids, outcome.state)
            for job_id in ids:
                self._events.items_failed(conn, job_id, outcome.error_type, now)
        return ids
