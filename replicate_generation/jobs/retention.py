"""What the store keeps: each account held to its bounds (jobs, bytes of job records) when a job
is stored, and jobs past their retention found (once no webhook waits on them) and deleted with
their items, shared values and file records, many jobs per short transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, or_, select

from replicate_generation.clients import account_key
from replicate_generation.errors import AccountStoreFull
from replicate_generation.jobs.counts import forget_finished
from replicate_generation.jobs.database import JobDatabase, lock_for_transaction
from replicate_generation.jobs.schema import job_events, job_files, job_items, job_values, jobs
from replicate_generation.settings import Settings

# Jobs deleted per transaction: a purge keeps pace with creation, the lock is held briefly.
DELETE_BATCH = 100


@dataclass(frozen=True)
class AccountBounds:
    """What one account may keep; `retention_seconds` tells a refused caller when room frees."""

    max_jobs: int
    max_bytes: int
    retention_seconds: float


def bounds_for(settings: Settings, token: str) -> AccountBounds | None:
    """What a user's account may keep; the server token's account is the operator's own."""
    server = settings.replicate_api_token
    if server is not None and account_key(token) == account_key(server):  # hashes: no timing leak
        return None
    return AccountBounds(max_jobs=settings.max_jobs_per_account,
                         max_bytes=settings.max_job_bytes_per_account,
                         retention_seconds=settings.job_retention_seconds)


def record_size(specs: Sequence[str], values: Iterable[str]) -> int:
    """The bytes a job's rows take when stored: its items' specs and its shared values."""
    return sum(len(spec.encode()) for spec in specs) + sum(len(value.encode()) for value in values)


def check_room(conn: Connection, account: str, size: int, bounds: AccountBounds,
               now: float) -> None:
    """AccountStoreFull (413 or 429) unless one more job of `size` bytes fits the account's bounds;
    run in the write that stores the job, which holds the account's lock until it commits."""
    if size > bounds.max_bytes:
        raise AccountStoreFull(
            f"This job's records take {size} bytes, more than the {bounds.max_bytes} an "
            "account may keep (MAX_JOB_BYTES_PER_ACCOUNT): send it in smaller jobs", status=413)
    lock_for_transaction(conn, f"room:{account}")
    count, used = conn.execute(select(func.count(), func.coalesce(func.sum(
        jobs.c.record_bytes), 0)).where(jobs.c.account == account)).one()
    if count + 1 > bounds.max_jobs:
        what = f"{count} jobs, the most an account may keep (MAX_JOBS_PER_ACCOUNT)"
    elif used + size > bounds.max_bytes:
        what = (f"{used} bytes of job records; this job's {size} would pass the "
                f"{bounds.max_bytes} an account may keep (MAX_JOB_BYTES_PER_ACCOUNT)")
    else:
        return
    oldest = conn.execute(select(func.min(jobs.c.finished_at)).where(
        jobs.c.account == account, jobs.c.finished_at.is_not(None))).scalar()
    frees_at = (now if oldest is None else float(oldest)) + bounds.retention_seconds
    raise AccountStoreFull(f"This account already keeps {what}; nothing was stored. Room frees "
                           "as its finished jobs pass their retention", status=429,
                           retry_after=max(1.0, frees_at - now))


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
        """Remove jobs, DELETE_BATCH per transaction, so a big purge never holds the lock long."""
        ids = list(job_ids)
        for start in range(0, len(ids), DELETE_BATCH):
            batch = ids[start:start + DELETE_BATCH]
            with self._db.write() as conn:
                forget_finished(conn, batch)
                for column in (job_events.c.job_id, job_files.c.job_id, job_values.c.job_id,
                               job_items.c.job_id, jobs.c.id):
                    conn.execute(delete(column.table).where(column.in_(batch)))
