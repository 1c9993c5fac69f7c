"""The webhook outbox: a finished job with a webhook waits in its row ("pending") until one
deliverer at a time, across every process, has leased it and recorded how the delivery went."""

from __future__ import annotations

from sqlalchemy import func, select, update

from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.rows import JOB_COLUMNS, JobRow, job_row
from replicate_generation.jobs.schema import jobs


class WebhookOutbox:
    """Due webhook deliveries, on the store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db

    def claim_webhook(self, now: float, lease: float) -> JobRow | None:
        """Take one due delivery, pushing its next attempt out by `lease` while it runs."""
        due = (select(*JOB_COLUMNS).where(jobs.c.webhook_state == "pending",
                                          jobs.c.webhook_next_at <= now)
               .order_by(jobs.c.webhook_next_at).limit(1)
               .with_for_update(skip_locked=True, key_share=True))
        with self._db.write() as conn:
            row = conn.execute(due).first()
            if row is None:
                return None
            conn.execute(update(jobs).where(jobs.c.id == row.id)
                         .values(webhook_next_at=now + lease))
        return job_row(row)

    def webhook_done(self, job_id: str, state: str, attempts: int, next_at: float | None,
                     error: str | None) -> None:
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                webhook_state=state, webhook_attempts=attempts, webhook_next_at=next_at,
                webhook_error=error))

    def next_webhook_at(self) -> float | None:
        due = self._db.scalar(select(func.min(jobs.c.webhook_next_at))
                              .where(jobs.c.webhook_state == "pending"))
        return float(due) if due is not None else None
