"""A process with room for an account claims windows of that account's jobs owned by other
processes, so a big job runs on every worker and replica instead of only the one that took it;
and takes back its own jobs' items that a helper gave back or claimed before it could."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

from replicate_generation.errors import StoreBusy, StoreUnavailable
from replicate_generation.jobs.accounts import AccountMemory
from replicate_generation.jobs.rows import JobRow
from replicate_generation.jobs.store import JobStore

log = logging.getLogger(__name__)

# How often a process looks for other processes' work; a lookup is one indexed read.
HELP_POLL_SECONDS = 0.5


class Helping:
    """The loop of the thread that finds and claims other processes' queued items."""

    def __init__(self, store: JobStore, accounts: AccountMemory, *, worker_id: str, origin: str,
                 has_room: Callable[[str], bool], help_job: Callable[[JobRow, str], bool],
                 running_here: Callable[[], Collection[str]], stopping: Callable[[], bool],
                 stop: threading.Event) -> None:
        self._store = store
        self._accounts = accounts
        self._worker_id = worker_id
        self._origin = origin
        self._has_room = has_room
        self._help_job = help_job
        self._running_here = running_here
        self._stopping = stopping
        self._stop = stop

    def run(self) -> None:
        while not self._stop.wait(HELP_POLL_SECONDS):
            if self._stopping():
                continue
            try:
                self.help_once()
            except (StoreBusy, StoreUnavailable):
                continue  # the heartbeat's loop reports an outage; here it only waits
            except Exception:  # noqa: BLE001 - the loop must survive a busy database
                log.exception("looking for other processes' work failed; retrying")

    def help_once(self) -> int:
        """Claim a window of each job this process has room for, its own jobs' left-behind items
        first; how many jobs it took on."""
        tokens, _ = self._accounts.to_check()
        if not tokens:
            return 0
        claims = self._store.claims
        found = claims.left_behind(self._worker_id, self._running_here()) \
            + claims.to_help(self._worker_id, tokens, self._origin)
        taken = 0
        for job_id, fence in found:
            job = self._store.get(job_id)
            if job is None or job.fence != fence or not self._has_room(job.account):
                continue
            token = tokens.get(job.account)
            if token is not None and self._help_job(job, token):
                log.info("taking on items of job %s", job.id)
                taken += 1
        return taken
