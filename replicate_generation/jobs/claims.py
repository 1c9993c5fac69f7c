"""Which process runs each item: a job's items are claimed a window at a time, by its owner or by
any live process with room for its account, so a big job spreads over every worker and replica.

An item's writes are refused to any process but its runner (`store.RUNNER_MAY_WRITE`); the job's
fence still voids every write of a job re-claimed from a dead owner.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Sequence

from sqlalchemy import Select, and_, bindparam, exists, or_, select, update

from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.rows import OPEN_STATES
from replicate_generation.jobs.schema import job_items, job_workers, jobs

_LIVE = select(job_workers.c.id)
# A job with queued items nobody claimed.
_WAITING = exists().where(job_items.c.job_id == jobs.c.id, job_items.c.state == "queued",
                          job_items.c.runner.is_(None))
# Built once: the helping thread runs these twice a second in every process.
_TO_HELP = (select(jobs.c.id, jobs.c.account, jobs.c.fence).where(
    jobs.c.state.in_(OPEN_STATES), jobs.c.origin == bindparam("origin"),
    jobs.c.owner.is_not(None), jobs.c.owner != bindparam("worker"), jobs.c.owner.in_(_LIVE),
    jobs.c.cancel_requested_at.is_(None), _WAITING)
    .order_by(jobs.c.created_at).limit(bindparam("limit")))
_LEFT_BEHIND = (select(jobs.c.id, jobs.c.fence).where(
    jobs.c.owner == bindparam("worker"), jobs.c.state.in_(OPEN_STATES),
    jobs.c.id.not_in(bindparam("here", expanding=True)), _WAITING)
    .order_by(jobs.c.created_at).limit(bindparam("limit")))


def _unclaimed(job_id: str, states: Sequence[str], count: int) -> Select[tuple[int]]:
    """The first `count` unclaimed items of the job in these states, in input order."""
    return (select(job_items.c.idx).where(
        job_items.c.job_id == job_id, job_items.c.state.in_(states), job_items.c.runner.is_(None))
        .order_by(job_items.c.idx).limit(count).with_for_update(skip_locked=True))


class ItemClaims:
    """Claiming, giving back and finding items to run, on the store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db

    def claim(self, job_id: str, worker: str, count: int, *, fence: int,
              as_owner: bool = False) -> list[int]:
        """Claim up to `count` unclaimed items while the job is open with this fence; their
        indexes. A helper takes queued items of a job not canceled; the owner takes started ones
        too (it resumes them, and a canceled job's predictions must still be stopped)."""
        states = list(OPEN_STATES) if as_owner else ["queued"]
        job_open = [jobs.c.id == job_id, jobs.c.state.in_(OPEN_STATES)]
        if not as_owner:
            job_open.append(jobs.c.cancel_requested_at.is_(None))
        with self._db.write() as conn:
            held = conn.execute(select(jobs.c.fence).where(*job_open).with_for_update(
                read=True, key_share=True)).scalar()
            if held != fence or count <= 0:
                return []
            indexes = [int(r.idx) for r in conn.execute(_unclaimed(job_id, states, count))]
            if indexes:
                conn.execute(update(job_items).where(
                    job_items.c.job_id == job_id, job_items.c.idx.in_(indexes),
                    job_items.c.runner.is_(None)).values(runner=worker))
        return indexes

    def runs(self, job_id: str, index: int, worker: str, fence: int) -> bool:
        """Is the item still `worker`'s to run: its job's fence held, and claimed by it (or
        unclaimed in a job it owns)?"""
        query = select(job_items.c.runner, jobs.c.owner, jobs.c.fence).join(
            jobs, jobs.c.id == job_items.c.job_id).where(
            job_items.c.job_id == job_id, job_items.c.idx == index)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None or row.fence != fence:
            return False
        return bool(row.runner == worker if row.runner is not None else row.owner == worker)

    def give_back(self, worker: str, job_ids: Sequence[str] | None = None) -> None:
        """Unclaim this worker's items not yet started (of these jobs, or of all), for others."""
        where = [job_items.c.runner == worker, job_items.c.state == "queued"]
        if job_ids is not None:
            where.append(job_items.c.job_id.in_(list(job_ids)))
        with self._db.write() as conn:
            conn.execute(update(job_items).where(*where).values(runner=None))

    def free_dead_runners(self, owner: str) -> list[str]:
        """Unclaim the open items of `owner`'s jobs held by processes no longer alive (their
        owner resumes them); the jobs touched."""
        dead = and_(job_items.c.runner.is_not(None), job_items.c.runner != owner,
                    job_items.c.runner.not_in(_LIVE))
        touched = (select(job_items.c.job_id).distinct().join(jobs, jobs.c.id == job_items.c.job_id)
                   .where(jobs.c.owner == owner, jobs.c.state.in_(OPEN_STATES),
                          job_items.c.state.in_(OPEN_STATES), dead))
        with self._db.write() as conn:
            ids = [str(r.job_id) for r in conn.execute(touched)]
            if ids:
                conn.execute(update(job_items).where(
                    job_items.c.job_id.in_(ids), job_items.c.state.in_(OPEN_STATES), dead)
                    .values(runner=None))
        return ids

    def to_help(self, worker: str, accounts: Container[str], origin: str,
                limit: int = 20) -> list[tuple[str, int]]:
        """Open jobs of other live processes, of `accounts`, with queued items nobody claimed:
        (job id, fence), oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(_TO_HELP, {"worker": worker, "origin": origin, "limit": limit})
            return [(str(r.id), int(r.fence)) for r in rows if r.account in accounts]

    def left_behind(self, worker: str, running_here: Collection[str],
                    limit: int = 20) -> list[tuple[str, int]]:
        """Open jobs `worker` owns with queued items nobody claimed and none of its windows open,
        because a helper gave them back or took them before the owner could: (job id, fence)."""
        with self._db.read() as conn:
            rows = conn.execute(_LEFT_BEHIND, {"worker": worker, "here": list(running_here),
                                               "limit": limit})
            return [(str(r.id), int(r.fence)) for r in rows]


# An item's write holds only while it is unclaimed or claimed by the writer (`w_runner`).
RUNNER_MAY_WRITE = or_(job_items.c.runner.is_(None),
                       job_items.c.runner == bindparam("w_runner"))
