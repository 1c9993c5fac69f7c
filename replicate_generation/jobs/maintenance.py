"""A process's upkeep of the job store, run by a background thread: its heartbeat, taking over
the open jobs of processes whose heartbeat stopped (for accounts whose token it holds), removing
jobs (and their files) past their retention as fast as they can be made, and giving the space
they took in the state file back to the disk."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from replicate_generation.jobs.accounts import AccountMemory
from replicate_generation.jobs.rows import JobRow
from replicate_generation.jobs.store import JobStore
from replicate_generation.outputs import OutputStorage, OutputStoreUnavailable
from replicate_generation.settings import Settings
from replicate_generation.sqlite_db import reclaim_space

log = logging.getLogger(__name__)

RETENTION_SWEEP_SECONDS = 60.0
# Jobs looked up per round of a purge; a backlog is purged in rounds until it is gone.
PURGE_ROUND = 500
# What one pass may take of the thread the heartbeat shares (a backlog continues next pass).
PURGE_BUDGET_MAX_S = 2.0
BACKLOG_PAUSE_S = 0.05


class Maintenance:
    """Heartbeat, recovery and retention for one runner (`run` is its thread's loop)."""

    def __init__(self, store: JobStore, settings: Settings, accounts: AccountMemory, *,
                 worker_id: str, origin: str, outputs: OutputStorage, clock: Callable[[], float],
                 resume: Callable[[JobRow, str], None], stopping: Callable[[], bool],
                 wake: threading.Event, stop: threading.Event) -> None:
        self._store = store
        self._settings = settings
        self._accounts = accounts
        self._worker_id = worker_id
        self._origin = origin
        self._outputs = outputs
        self._clock = clock
        # The runner queues a claimed job's items; it refuses new work once stopping.
        self._resume = resume
        self._stopping = stopping
        self._wake = wake
        self._stop = stop
        self._last_sweep = 0.0
        self._backlog = False  # the last purge stopped at its budget: purge again next pass

    def run(self) -> None:
        interval = max(0.05, self._settings.lease_ttl_seconds / 3)
        while not self._stop.is_set():
            try:
                self._maintain_once()
            except Exception:  # noqa: BLE001 - the loop must survive a busy database
                log.exception("job maintenance failed; retrying")
            # A backlog of expired jobs is purged pass after pass, a breath apart.
            self._wake.wait(BACKLOG_PAUSE_S if self._backlog else interval)
            self._wake.clear()

    def _maintain_once(self) -> None:
        now = self._clock()
        self._store.owners.heartbeat(self._worker_id, now)
        if not self._stopping():
            self._resume_orphans(now)
        if self._backlog or now - self._last_sweep >= RETENTION_SWEEP_SECONDS:
            self._last_sweep = now
            budget = min(PURGE_BUDGET_MAX_S, self._settings.lease_ttl_seconds / 6)
            self.purge_expired(now, budget=budget)

    def _resume_orphans(self, now: float) -> None:
        tokens, checked = self._accounts.to_check()
        for job_id in self._store.owners.claim_orphans(
                self._worker_id, tokens, now, self._settings.lease_ttl_seconds, self._origin):
            job = self._store.get(job_id)
            if job is not None:
                log.info("resuming job %s (%s)", job.id, job.counts)
                self._resume(job, tokens[job.account])
        # Items of this process's jobs that a dead process had claimed: resumed here.
        for job_id in self._store.claims.free_dead_runners(self._worker_id):
            job = self._store.get(job_id)
            if job is not None and job.account in tokens:
                log.info("resuming the items of job %s a stopped process held", job.id)
                self._resume(job, tokens[job.account])
        self._accounts.checked(checked)

    def purge_expired(self, now: float, *, budget: float | None = None) -> int:
        """Delete jobs (and their files) that finished longer ago than the retention, in rounds
        until none is left or `budget` seconds passed; then give their space back to the disk."""
        give_up = None if budget is None else time.monotonic() + budget
        removed = 0
        while True:
            found = self._purge_round(now - self._settings.job_retention_seconds)
            removed += found
            self._backlog = found == PURGE_ROUND
            if not self._backlog or (give_up is not None and time.monotonic() >= give_up):
                break
        pages = reclaim_space(str(self._settings.state_file),
                              budget=PURGE_BUDGET_MAX_S if budget is None else budget)
        if removed or pages:
            log.info("removed %d jobs past their retention; %d pages given back to the disk",
                     removed, pages)
        return removed

    def _purge_round(self, before: float) -> int:
        expired = self._store.retention.expired(before, limit=PURGE_ROUND)
        removed = []
        for job_id, request_id in expired:
            try:
                self._outputs.remove_group(request_id)
            except OutputStoreUnavailable as exc:
                # Kept for the next sweep (its rows are how its objects are found again); one
                # failure is enough: the heartbeat shares this thread.
                log.warning("jobs kept past their retention: their files could not be "
                            "deleted (%s)", exc)
                break
            removed.append(job_id)
        self._store.retention.delete(removed)
        return len(removed)
