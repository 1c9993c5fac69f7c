"""The ConcurrencyManager: one per process, it waits for leases and tokens outside every lock.

Slots are heartbeat-kept leases, rates are store-computed waits slept outside any transaction;
while the store is down callers keep their place until their deadline (then StoreUnavailable).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

from replicate_generation import metrics
from replicate_generation.errors import DeadlineExceeded, StoreUnavailable
from replicate_generation.limits.base import (
    ANYONE,
    AccountStats,
    Kind,
    Limits,
    LimitSource,
    LimitStore,
    Turn,
    caller_account,
)
from replicate_generation.limits.heartbeat import OUTAGE_PAUSE_MAX_S, Heartbeat
from replicate_generation.limits.release_count import Heard, ReleaseCount

logger = logging.getLogger(__name__)

# Sleeps run on another clock than time.time(): a wake-up a hair early is not a new back-off.
_BACKOFF_EPSILON_S = 0.01
# Waiters this near the head wake on local releases; the rest only poll, at most this far apart.
_NEAR_RANK = 3
_FAR_POLL_MAX_S = 1.0

T = TypeVar("T")


class ConcurrencyManager:
    """Per-process front end: waits for leases and tokens outside every lock, keeps leases alive."""

    def __init__(
        self,
        store: LimitStore,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.05,
        heartbeat_interval: float | None = None,
    ) -> None:
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(f"poll_interval must be a positive number, got {poll_interval!r}")
        if heartbeat_interval is None:
            # Three beats per ttl: one missed beat (a busy database) is survivable.
            heartbeat_interval = store.lease_ttl / 3
        if not (math.isfinite(heartbeat_interval) and heartbeat_interval > 0):
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval!r}")
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self._poll_interval = poll_interval
        self._heartbeat_interval = heartbeat_interval
        self._reset_process_state()
        self._open()

    def _reset_process_state(self) -> None:
        """Fresh per-process state; also run in a forked child (gunicorn
        --preload), where the parent's threads and registrations do not exist."""
        self._pid = os.getpid()
        # Names this process's declaration of its limits; not a secret.
        self._instance = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # Local and store-relayed releases wake waiters; polls catch the releases nobody relays.
        self._releases = ReleaseCount()
        self._heartbeat = Heartbeat(self._store, self._instance, self._heartbeat_interval, logger)
        self._outage = self._heartbeat.outage
        self._closed = False

    # -- concurrency ------------------------------------------------------------

    @contextmanager
    def slot(self, account: str, deadline: float,
             turn: Turn = ANYONE) -> Iterator[Callable[[], None]]:
        """Hold one of the account's in-flight slots for the body of the block; `turn` places
        the wait among the account's others (interactive first, then fair shares). The block
        gets a function that frees the slot early, once its prediction is seen to end."""
        started = time.monotonic()
        with self._caller_slot(account, deadline, turn) as free_own:
            lease_id = self._acquire(account, deadline, turn)
            metrics.limiter_waited("slot", started)
            free = _once(partial(self._release_both, lease_id, free_own))
            try:
                yield free
            finally:
                free()

    def _release_both(self, lease_id: str, free_own: Callable[[], None]) -> None:
        self._release(lease_id)
        free_own()

    @contextmanager
    def _caller_slot(self, account: str, deadline: float,
                     turn: Turn) -> Iterator[Callable[[], None]]:
        """A capped caller first takes one of its own slots, counted beside the account's, so
        its waiters never stand in the account's line while it is at its bound."""
        if turn.cap is None:
            yield _nothing
            return
        own = self._acquire(caller_account(account, turn.caller), deadline, ANYONE, turn.cap)
        free = _once(partial(self._release, own))
        try:
            yield free
        finally:
            free()

    def _acquire(self, account: str, deadline: float, turn: Turn,
                 limit: int | None = None) -> str:
        self._check_open()
        if self._clock() >= deadline:
            raise DeadlineExceeded(f"deadline passed before waiting for a slot ({account})")
        self._heartbeat.ensure_running()
        ticket = uuid.uuid4().hex
        self._heartbeat.hold(ticket=ticket)
        lease_id: str | None = None
        try:
            lease_id = self._wait_for_lease(account, ticket, deadline, turn, limit)
            self._heartbeat.hold(lease=lease_id)
            return lease_id
        finally:
            self._heartbeat.drop(ticket=ticket)
            if lease_id is None:
                # Giving up may move later waiters (here or elsewhere) to the front.
                self._best_effort(self._store.leave_queue, ticket)
                self._notify()

    def _wait_for_lease(self, account: str, ticket: str, deadline: float, turn: Turn,
                        limit: int | None) -> str:
        while True:
            heard = self._releases.heard()
            if self._closed:
                raise RuntimeError("ConcurrencyManager has been shut down")
            lease_id, rank = self._patiently(
                partial(self._store.try_acquire_ranked, account, ticket, turn, limit), deadline,
                self._pause_for_change)
            if lease_id is not None:
                return lease_id
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded(f"no concurrency slot for {account} before the deadline")
            self._wait_for_turn(heard, rank, remaining)

    def _wait_for_turn(self, heard: Heard, rank: int, remaining: float) -> None:
        """Sleep until enough releases were heard of for this waiter to be next in line, or
        its poll: the next in line polls often, those further back the less often the further
        back they are, so a long queue costs the store little."""
        if rank <= _NEAR_RANK:
            pause = self._jittered_poll() * (0.5 if rank <= 1 else 1.0)
        else:
            pause = min(_FAR_POLL_MAX_S, self._jittered_poll() * rank / 2)
        self._releases.wait(heard, max(1, rank - 1), min(remaining, pause))

    def _pause_for_change(self, timeout: float) -> None:
        self._releases.wait(self._releases.heard(), 1, timeout)

    def _patiently(self, step: Callable[[], T], deadline: float,
                   pause: Callable[[float], None]) -> T:
        """Run one store step, retrying while the store is unavailable; once the deadline has
        passed the StoreUnavailable is raised (a 503), not DeadlineExceeded."""
        delay = self._poll_interval
        while True:
            try:
                result = step()
            except StoreUnavailable as exc:
                self._outage.down("a waiting caller", exc)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise
                pause(min(remaining, OUTAGE_PAUSE_MAX_S, delay * random.uniform(0.5, 1.5)))  # noqa: S311
                if self._closed:
                    raise RuntimeError("ConcurrencyManager has been shut down") from exc
                if self._clock() >= deadline:
                    raise
                delay = min(2 * delay, OUTAGE_PAUSE_MAX_S)
                continue
            self._outage.up(renew=True)
            return result

    def _jittered_poll(self) -> float:
        # Jitter keeps many waiters' polls out of lock-step (not security-relevant randomness).
        return self._poll_interval * random.uniform(0.5, 1.5)  # noqa: S311

    def _notify(self) -> None:
        self._releases.add()

    def _release(self, lease_id: str) -> None:
        self._heartbeat.drop(lease=lease_id)
        self._best_effort(self._store.release, lease_id)
        self._notify()

    def _best_effort(self, cleanup: Callable[[str], None], item: str) -> None:
        """Run a cleanup whose failure must not mask the caller's result or
        exception: an unrenewed lease or ticket expires by itself within lease_ttl."""
        try:
            cleanup(item)
        except StoreUnavailable as exc:
            self._outage.down(f"the cleanup of {item}", exc)
        except Exception:
            logger.error("cleanup of %s failed; it will expire", item, exc_info=True)

    # -- rate -------------------------------------------------------------------

    def wait_for_create(self, account: str, deadline: float) -> None:
        """Take one create token and sleep until it may be used."""
        started = time.monotonic()
        self._wait_for_token(account, "create", deadline)
        metrics.limiter_waited("create", started)

    def wait_for_poll(self, account: str, deadline: float) -> None:
        """Take one non-create (poll, cancel) token and sleep until it may be used."""
        started = time.monotonic()
        self._wait_for_token(account, "poll", deadline)
        metrics.limiter_waited("poll", started)

    def _wait_for_token(self, account: str, kind: Kind, deadline: float) -> None:
        self._check_open()
        while True:
            # A step that failed spent nothing we rely on: it is taken again, whole.
            cut, wait, budget = self._patiently(
                partial(self._reserve, account, kind, deadline), deadline, self._sleep)
            if wait > budget:
                raise DeadlineExceeded(
                    f"{kind} token for {account} needs {wait:.3f}s, only {budget:.3f}s left"
                )
            if wait <= 0:
                return  # usable now: no back-off or cut could have begun while we slept
            self._sleep(wait)  # outside every lock and transaction
            if self._patiently(partial(self._token_holds, account, kind, cut), deadline,
                               self._sleep):
                return
            # A back-off or rate cut began while we slept: this token was spaced for a refused rate.

    def _reserve(self, account: str, kind: Kind, deadline: float) -> tuple[float, float, float]:
        """(last cut, wait, budget): one token reserved within what is left of the deadline."""
        budget = deadline - self._clock()
        if budget < 0:
            raise DeadlineExceeded(f"deadline passed before a {kind} token ({account})")
        cut = self._store.last_cut(account) if kind == "create" else 0.0
        return cut, self._store.reserve(account, kind, max_wait=budget), budget

    def _token_holds(self, account: str, kind: Kind, cut: float) -> bool:
        """No back-off began and the create rate was not cut since the token was reserved."""
        return self._store.backoff_remaining(account) <= _BACKOFF_EPSILON_S and \
            (kind != "create" or self._store.last_cut(account) == cut)

    def throttled(self, account: str, retry_after: float) -> None:
        """A 429 was seen: every worker of the account, in every process, backs off."""
        # Store down: the back-off is lost, but no create goes out until it is back anyway.
        self._unless_down("recording a back-off",
                          partial(self._store.back_off, account, retry_after))
        metrics.backoff_started(retry_after)

    def create_accepted(self, account: str) -> None:
        """Replicate accepted a create: the learned rate may grow back."""
        # Store down: the learned rate only grows back a step later; the create stands.
        self._unless_down("recording an accepted create",
                          partial(self._store.create_accepted, account))

    def _unless_down(self, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except StoreUnavailable as exc:
            self._outage.down(what, exc)
            return
        self._outage.up(renew=True)

    # -- configuration and status -------------------------------------------------

    def limits(self) -> Limits:
        return self._store.get_limits()

    def limit_sources(self) -> dict[str, LimitSource]:
        """Per ``Limits`` field: the value in force, set by /configure or the environment."""
        return self._store.describe_limits()

    def configure(self, limits: Limits) -> None:
        """Store new limits for every process. A lower limit admits nobody
        new until in-flight work has drained below it."""
        limits.validate()
        self._store.set_limits(limits)
        self._releases.wake_everyone()  # a raised limit may admit waiters now

    def configure_fields(self, changes: Mapping[str, int | None]) -> None:
        """Override only the given ``Limits`` fields for every process; None clears one."""
        self._store.set_overrides(changes)
        self._releases.wake_everyone()  # a raised limit may admit waiters now

    def clear_configuration(self) -> None:
        """Drop every override: the live processes' environments decide again."""
        self._store.clear_overrides()
        self._releases.wake_everyone()

    def stats(self, account: str | None = None) -> list[AccountStats]:
        return self._store.stats(account)

    def shutdown(self) -> None:
        """Stop the heartbeat and give back this process's leases, tickets and declaration."""
        if self._pid != os.getpid():
            self._reset_process_state()  # a forked child: the parent's declaration is not ours
        self._closed = True
        self._releases.wake_everyone()  # waiters see _closed at once
        leases, tickets = self._heartbeat.stop()
        for lease_id in leases:
            self._best_effort(self._store.release, lease_id)
        for ticket in tickets:
            self._best_effort(self._store.leave_queue, ticket)
        self._best_effort(self._store.withdraw, self._instance)
        self._releases.wake_everyone()

    def _open(self) -> None:
        """Declare this process's limits and keep the declaration alive while open,
        idle or not: a smaller limit must bind the others as long as it lives."""
        # Store down at start-up: open anyway (callers get 503s); the heartbeat declares later.
        self._unless_down("the limits declaration", partial(self._store.declare, self._instance))
        self._unless_down("listening for releases", partial(self._store.on_release, self._notify))
        self._heartbeat.ensure_running()

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            self._reset_process_state()
            self._open()
        if self._closed:
            raise RuntimeError("ConcurrencyManager has been shut down")


def _nothing() -> None:
    return None


def _once(step: Callable[[], object]) -> Callable[[], None]:
    """`step`, run at its first call only."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            step()
    return run
