"""Jobs past their retention: found (once no webhook waits on them) and deleted with their items,
shared values and file records, one job per transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, or_, select

from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.schema import job_files, job_items, job_values, jobs


class Retention:
    """Finding and removing old jobs, on the store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db

    def expired(self, before: float, limit: int = 500) -> list[tuple[str, str]]:
        """Finished jobs older than the retention (and not awaiting a webhook): (id, request_id)."""
        query = select(jobs.c.id, jobs.c.request_id).where(
            jobs.c.finished_at.is_not(None), jobs.c.finished_at < before,
            or_(jobs.c.webhook_state.is_(None), jobs.c.webhook_state != "pending"),
        ).limit(limit)
        with self._db.read() as conn:
            return [(str(r.id), str(r.request_id)) for r in conn.execute(query)]

    def delete(self, job_ids: Sequence[str]) -> None:
        """Remove jobs one transaction each, so a big purge never holds the lock for long."""
        for job_id in job_ids:
            with self._db.write() as conn:
                for column in (job_files.c.job_id, job_values.c.job_id, job_items.c.job_id,
                               jobs.c.id):
                    conn.execute(delete(column.table).where(column == job_id))
