"""Sends finished jobs' webhooks from the store's outbox, run by a background thread: one due
delivery at a time, retried with back-off, signed with each account's own secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable

from replicate_generation.jobs import webhooks
from replicate_generation.jobs.bodies import JOB_ITEMS_SHOWN, job_with_first_items
from replicate_generation.jobs.store import JobStore
from replicate_generation.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_LEASE_SECONDS = 120.0


class WebhookNotifier:
    """Delivers due webhooks until `stop` is set (`run` is its thread's loop)."""

    def __init__(self, store: JobStore, settings: Settings, *, clock: Callable[[], float],
                 stop: threading.Event) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._stop = stop

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._pause()
                if pause is None and self._deliver_one():
                    continue
            except Exception:  # noqa: BLE001 - the loop must survive a bad receiver or database
                log.exception("webhook delivery failed; retrying")
                pause = 1.0
            self._stop.wait(pause or 0.02)

    def _pause(self) -> float | None:
        """How long until a delivery is due (at most 1 s); None when one is due now. A read:
        only a due delivery takes the write that leases it."""
        due = self._store.outbox.next_webhook_at()
        if due is not None and due <= self._clock():
            return None
        return 1.0 if due is None else min(1.0, max(0.02, due - self._clock()))

    def _deliver_one(self) -> bool:
        settings, outbox = self._settings, self._store.outbox
        key = settings.webhook_signing_key
        job = outbox.claim_webhook(self._clock(), WEBHOOK_LEASE_SECONDS)
        if job is None or key is None or job.webhook_url is None:
            return False
        # As GET /jobs/<id> shows it: a bounded first page, whatever the job's size.
        payload = job_with_first_items(job, self._store.items_page(
            job.id, limit=JOB_ITEMS_SHOWN + 1), settings.output_dir)
        attempt = job.webhook_attempts + 1
        secret = webhook_secret(key, webhook_scope(job.account, job.key_id))
        result = webhooks.deliver(
            job.webhook_url, payload, secret=secret,
            msg_id=f"msg_{job.id}", allow_private=job.webhook_private,
            allowed=settings.egress_allow_private, timeout=settings.webhook_timeout_seconds)
        if result.ok:
            outbox.webhook_done(job.id, "delivered", attempt, None, None)
            log.info("webhook for job %s delivered (attempt %d)", job.id, attempt)
            return True
        if not result.retryable or attempt >= settings.webhook_max_attempts:
            outbox.webhook_done(job.id, "failed", attempt, None, result.error)
            log.warning("webhook for job %s given up after %d attempts: %s", job.id, attempt,
                        result.error)
            return True
        pause = max(result.retry_after or 0.0,
                    webhooks.backoff(attempt, base=settings.webhook_retry_base_seconds))
        outbox.webhook_done(job.id, "pending", attempt, self._clock() + pause, result.error)
        log.info("webhook for job %s failed (attempt %d, %s); next in %.1fs", job.id, attempt,
                 result.error, pause)
        return True


def webhook_scope(account: str, key_id: str | None) -> str:
    """Whose secret signs a job's webhooks: its issued key's own, else its account's."""
    return account if key_id is None else f"{account}/key:{key_id}"


def webhook_secret(signing_key: str, account: str) -> str:
    """Each account's own webhook secret (`whsec_...`), derived from the server's key: one
    account can never sign, and so forge, webhooks for another account's receiver."""
    digest = hmac.new(signing_key.encode(), b"webhook-secret:" + account.encode(),
                      hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()
