"""Keeps one process's leases, tickets and limits declaration alive in the limit store.

A holder that dies stops beating, so its slots come back after the lease ttl; a beat that fails
is retried, never fatal. While the store is unreachable the outage is logged once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from replicate_generation.errors import StoreUnavailable
from replicate_generation.limits.base import LimitStore

# While the store is unavailable, the heartbeat beats at most this far apart.
OUTAGE_PAUSE_MAX_S = 1.0


class Outage:
    """Whether the store is unreachable, logged once per outage however many callers see it."""

    def __init__(self, logger: logging.Logger, on_recovery: Callable[[], None]) -> None:
        self._logger = logger
        self._on_recovery = on_recovery
        self._lock = threading.Lock()
        self.active = False

    def down(self, what: str, exc: StoreUnavailable) -> None:
        with self._lock:
            if self.active:
                return
            self.active = True
        self._logger.error("limit store unavailable (seen by %s): %s; retrying until it is back",
                           what, exc)

    def up(self, *, renew: bool) -> None:
        if not self.active:  # the common case: no lock
            return
        with self._lock:
            if not self.active:
                return
            self.active = False
        self._logger.warning("limit store reachable again")
        if renew:
            # Re-register this process's leases at once: the store may have lost them.
            self._on_recovery()


class Heartbeat:
    """One thread renewing what this process holds, every `interval` seconds or when woken."""

    def __init__(self, store: LimitStore, instance: str, interval: float,
                 logger: logging.Logger) -> None:
        self._store = store
        self._instance = instance
        self._interval = interval
        self._logger = logger
        self._lock = threading.Lock()
        self._leases: set[str] = set()
        self._tickets: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # renew now: the store is back after an outage
        self._thread: threading.Thread | None = None
        self.outage = Outage(logger, self._wake.set)

    def hold(self, *, lease: str | None = None, ticket: str | None = None) -> None:
        with self._lock:
            if lease is not None:
                self._leases.add(lease)
            if ticket is not None:
                self._tickets.add(ticket)

    def drop(self, *, lease: str | None = None, ticket: str | None = None) -> None:
        with self._lock:
            if lease is not None:
                self._leases.discard(lease)
            if ticket is not None:
                self._tickets.discard(ticket)

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            # Also restarted in a forked child: threads do not survive fork.
            self._thread = threading.Thread(target=self._loop, name="concurrency-heartbeat",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> tuple[list[str], list[str]]:
        """Stop beating; hand back the leases and tickets still held, for the caller to return."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            held = list(self._leases), list(self._tickets)
            self._leases.clear()
            self._tickets.clear()
        return held

    def _loop(self) -> None:
        stop, wake = self._stop, self._wake
        while not stop.is_set():
            # Faster during an outage, so leases are re-registered soon after it ends.
            outage_beat = min(self._interval, OUTAGE_PAUSE_MAX_S)
            wake.wait(outage_beat if self.outage.active else self._interval)
            wake.clear()
            if stop.is_set():
                return
            self._renew_once()

    def _renew_once(self) -> None:
        with self._lock:
            leases, tickets = list(self._leases), list(self._tickets)
        # Separate steps: a failed declaration must not cost this beat's lease renewals.
        self._beat("lease heartbeat", lambda: self._store.renew(leases, tickets))
        self._beat("limits declaration", lambda: self._store.declare(self._instance))

    def _beat(self, what: str, step: Callable[[], None]) -> None:
        # Beat on through failures: a missed renewal is survivable, a dead heartbeat loses leases.
        try:
            step()
        except StoreUnavailable as exc:
            self.outage.down(what, exc)
            return
        except Exception:
            self._logger.error("%s failed; retrying", what, exc_info=True)
            return
        self.outage.up(renew=False)
