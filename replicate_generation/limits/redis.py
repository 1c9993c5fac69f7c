"""LimitStore on Redis: the SQLite store's leases, FIFO tickets, GCRA and limits, across hosts.

Each operation is one Lua script (lua/) on Redis's own clock, safe to run twice (a resent command
spends nothing more), on one server or a Redis Cluster (every script's keys share one hash slot).
An unreachable, loading or read-only Redis raises StoreUnavailable.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from replicate_generation.limits.base import (
    ANYONE,
    EPISODE_S,
    LIMIT_RANGES,
    MAX_BACKOFF_S,
    MIN_RATE_STEP,
    RATE_CUT,
    RATE_STEP,
    WINDOW_S,
    AccountStats,
    Kind,
    Limits,
    LimitSource,
    Turn,
    check_known_limit,
    fold_own_defaults,
    resolve_limit_sources,
    validate_limit,
)
from replicate_generation.limits.redis_client import RedisConnection, ReleaseListener
from replicate_generation.limits.redis_client import fail_closed as _fail_closed

__all__ = ["RedisLimitStore"]

# Tombstones outlive a purge by this many ttls: a holder paused that long may not come back.
_TOMBSTONE_TTLS = 10
# How long a reserve/create_accepted result is kept for a resent command.
_OP_TTL_MS = 30_000
# An idle account's fair-queueing state (virtual time, callers' finishes) is dropped after a day.
FAIR_KEEP_S = 86_400

_SCRIPT_NAMES = ("limits", "declare", "override", "acquire", "renew", "release", "leave", "reserve",
                 "backoff", "accepted", "backoff_left", "stats", "mark", "prune", "settle")


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


# Every script starts with the shared prelude: the clock and full-precision numbers.
_SCRIPTS = {name: _lua("prelude") + _lua(name) for name in _SCRIPT_NAMES}


def _check_account(account: str) -> None:
    # "|" splits lease ids; braces would break the account's hash tag.
    if not account or any(char in account for char in "|{}"):
        raise ValueError("an account must be a non-empty string without '|', '{' or '}'")


def _lease_account(lease_id: str) -> str | None:
    account, sep, _ = lease_id.partition("|")
    return account if sep and account else None


def _declaration(limits: Limits) -> str:
    return " ".join(str(getattr(limits, name)) for name in LIMIT_RANGES)


def _declared_ranges(values: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(min, max) per field over declarations "mc rpm burst ppm expires"."""
    ranges: dict[str, tuple[int, int]] = {}
    for value in values:
        for name, field in zip(LIMIT_RANGES, value.split()[:len(LIMIT_RANGES)], strict=True):
            low, high = ranges.get(name, (int(field), int(field)))
            ranges[name] = (min(low, int(field)), max(high, int(field)))
    return ranges


def _overrides(flat: Sequence[str]) -> dict[str, tuple[int, float]]:
    overrides: dict[str, tuple[int, float]] = {}
    for name, stored in zip(flat[::2], flat[1::2], strict=True):
        if name in LIMIT_RANGES:
            value, set_at = stored.split()
            overrides[name] = (int(value), float(set_at))
    return overrides


class KeyNames:
    """Key names: one hash tag per account, so every script touches one Cluster slot.

    The scripts' KEYS lines name the keys; {limits} holds what all accounts share.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.releases = f"{prefix}:releases"

    def shared(self, name: str) -> str:
        return f"{self._prefix}:{{limits}}:{name}"

    def one(self, account: str, name: str) -> str:
        return f"{self._prefix}:{{{account}}}:{name}"

    def of(self, account: str, *names: str) -> list[str]:
        return [self.one(account, name) for name in names]


class RedisLimitStore:
    """LimitStore on one Redis, or a Redis Cluster (``cluster``), shared by every host.

    ``default_limits`` bind others only once declared; ``clock`` is for tests (None: Redis's).
    """

    def __init__(
        self,
        url: str,
        default_limits: Limits,
        *,
        lease_ttl: float = 30.0,
        clock: Callable[[], float] | None = None,
        key_prefix: str = "rg",
        socket_timeout: float = 5.0,
        cluster: bool = False,
    ) -> None:
        default_limits.validate()
        if not (math.isfinite(lease_ttl) and lease_ttl > 0):
            raise ValueError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and contain no '{' or '}'")
        self._connection = RedisConnection(url, cluster=cluster, socket_timeout=socket_timeout,
                                           scripts=_SCRIPTS)
        self._defaults = default_limits
        self._ttl = float(lease_ttl)
        self._clock = clock
        self._names = KeyNames(key_prefix)
        self._own: tuple[str, int] | None = None  # see SQLiteLimitStore._own
        # Tickets this process enqueued: renew and leave_queue get only the ticket.
        self._tickets: dict[str, str] = {}
        self._tickets_lock = threading.Lock()
        self._listener: ReleaseListener | None = None

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    # -- keys, clock -------------------------------------------------------------

    def _now(self) -> str:
        """The scripts' clock argument: '' means Redis's own TIME."""
        return "" if self._clock is None else repr(float(self._clock()))

    def _run(self, script: str, *, keys: list[str], args: list[Any]) -> Any:
        """One Lua script: EVALSHA, loading it again if the server lost it (a restart)."""
        return self._connection.script(script)(keys=keys, args=args)

    def _keep(self) -> float:
        return _TOMBSTONE_TTLS * self._ttl

    # -- health ----------------------------------------------------------------

    @_fail_closed
    def check(self) -> None:
        """Raise StoreUnavailable unless Redis answers (a cluster: with every slot served)."""
        self._connection.check()

    def close(self) -> None:
        """Stop listening for releases; release the connection pool."""
        if self._listener is not None:
            self._listener.close()
        self._connection.close()

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever any process releases a slot or leaves a queue."""
        if self._listener is None or not self._listener.alive_here():
            # Threads do not survive fork: a child listens on its own.
            self._listener = ReleaseListener(self._connection, self._names.releases)
        self._listener.add(callback)

    # -- limits: overrides and declarations ------------------------------------------

    def _own_instance(self) -> str | None:
        if self._own is None or self._own[1] != os.getpid():
            return None
        return self._own[0]

    def _sources(self, mark: str | None = None) -> dict[str, LimitSource]:
        """The effective limits; ``mark`` records that account as active (stats(None))."""
        own = self._own_instance()
        keys = [self._names.shared(name) for name in ("overrides", "declarations", "accounts")]
        overrides, declared = self._run("limits", keys=keys,
                                        args=[self._now(), own or "", mark or ""])
        ranges, count = _declared_ranges(declared), len(declared)
        if own is not None:
            ranges, count = fold_own_defaults(ranges, count, self._defaults)
        return resolve_limit_sources(_overrides(overrides), ranges, count, self._defaults)

    def _limits(self, mark: str | None = None) -> Limits:
        return Limits(**{name: source.value for name, source in self._sources(mark).items()})

    @_fail_closed
    def get_limits(self) -> Limits:
        return self._limits()

    @_fail_closed
    def describe_limits(self) -> dict[str, LimitSource]:
        return self._sources()

    def set_limits(self, limits: Limits) -> None:
        limits.validate()
        self.set_overrides({name: getattr(limits, name) for name in LIMIT_RANGES})

    @_fail_closed
    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        for name, value in changes.items():  # all checked before anything is stored
            check_known_limit(name)
            if value is not None:
                validate_limit(name, value)
        pairs = [part for name, value in changes.items()
                 for part in (name, "" if value is None else str(value))]
        if pairs:
            self._run("override", keys=[self._names.shared("overrides")],
                      args=[self._now(), *pairs])

    @_fail_closed
    def clear_overrides(self) -> None:
        self._connection.client().delete(self._names.shared("overrides"))

    @_fail_closed
    def declare(self, instance: str) -> None:
        self._own = (instance, os.getpid())  # counts locally even if this write fails
        self._run("declare", keys=[self._names.shared("declarations")],
                  args=[self._now(), self._ttl, instance, _declaration(self._defaults)])

    @_fail_closed
    def withdraw(self, instance: str) -> None:
        if self._own is not None and self._own[0] == instance:
            self._own = None
        self._connection.client().hdel(self._names.shared("declarations"), instance)

    # -- leases and tickets ------------------------------------------------------

    def try_acquire(self, account: str, ticket: str, turn: Turn = ANYONE,
                    limit: int | None = None) -> str | None:
        return self.try_acquire_ranked(account, ticket, turn, limit)[0]

    @_fail_closed
    def try_acquire_ranked(self, account: str, ticket: str, turn: Turn = ANYONE,
                           limit: int | None = None) -> tuple[str | None, int]:
        _check_account(account)
        with self._tickets_lock:  # before the call: a lost answer must still be left
            self._tickets[ticket] = account
        shared = self._limits(mark=account).max_concurrent
        granted = self._run(
            "acquire",
            keys=self._names.of(account, "leases", "released", "queue", "tickets", "vtime",
                                "fair"),
            args=[self._now(), self._ttl, shared if limit is None else min(shared, limit), ticket,
                  f"{account}|{ticket}", self._keep(),
                  turn.band, turn.caller, turn.step, FAIR_KEEP_S])
        if isinstance(granted, int):
            return None, granted
        lease, score = (str(part) for part in granted)
        if score and not self._settle(account, ticket, lease, score, shared, limit):
            return None, 1
        with self._tickets_lock:
            self._tickets.pop(ticket, None)
        return lease, 0

    def _settle(self, account: str, ticket: str, lease: str, score: str, used: int,
                limit: int | None) -> bool:
        """Keep a grant only under the limit in force now: it was read before the grant."""
        fresh = self._limits().max_concurrent
        if fresh >= used:
            return True
        ceiling = fresh if limit is None else min(fresh, limit)
        kept = self._run("settle", keys=self._names.of(account, "leases", "queue", "tickets"),
                         args=[self._now(), self._ttl, ceiling, lease, ticket, score])
        return bool(kept)

    @_fail_closed
    def renew(self, lease_ids: Sequence[str], ticket_ids: Sequence[str]) -> None:
        work: dict[str, tuple[list[str], list[str]]] = {}
        for lease_id in lease_ids:
            account = _lease_account(lease_id)
            if account is not None:
                work.setdefault(account, ([], []))[0].append(lease_id)
        with self._tickets_lock:
            for ticket in ticket_ids:
                if (account := self._tickets.get(ticket)) is not None:
                    work.setdefault(account, ([], []))[1].append(ticket)
        if not work:
            return
        # After a data loss the holders' accounts must be listed by stats(None) again.
        self._run("mark", keys=[self._names.shared("accounts")], args=[self._now(), *work])
        for account, (leases, tickets) in work.items():
            self._run("renew", keys=self._names.of(account, "leases", "released", "tickets"),
                      args=[self._now(), self._ttl, len(leases), *leases, *tickets])

    @_fail_closed
    def release(self, lease_id: str) -> None:
        account = _lease_account(lease_id)
        if account is None:
            return  # not one of ours: nothing holds it
        self._run("release", keys=self._names.of(account, "leases", "released"),
                  args=[self._now(), lease_id, self._keep(), self._names.releases])

    @_fail_closed
    def leave_queue(self, ticket: str) -> None:
        with self._tickets_lock:
            account = self._tickets.pop(ticket, None)
        if account is None:
            return  # never enqueued here, or already granted
        self._run("leave", keys=self._names.of(account, "queue", "tickets", "leases", "released"),
                  args=[self._now(), ticket, f"{account}|{ticket}", self._keep(),
                        self._names.releases])

    # -- rate (GCRA) and back-off --------------------------------------------------

    @_fail_closed
    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        if kind not in ("create", "poll"):
            raise ValueError(f"kind must be 'create' or 'poll', got {kind!r}")
        _check_account(account)
        limits = self._limits(mark=account)
        op = uuid.uuid4().hex
        wait = self._run(
            "reserve", keys=self._names.of(account, "rate", "creates", f"op:{op}"),
            args=[self._now(), kind, limits.requests_per_minute, limits.burst,
                  limits.polls_per_minute, repr(min(max_wait, 1e300)), op, _OP_TTL_MS])
        return float(wait)

    @_fail_closed
    def back_off(self, account: str, seconds: float) -> None:
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"back-off seconds must be >= 0, got {seconds!r}")
        _check_account(account)
        limit = self._limits(mark=account).requests_per_minute
        self._run("backoff", keys=self._names.of(account, "rate"),
                  args=[self._now(), min(seconds, MAX_BACKOFF_S), limit, EPISODE_S, RATE_CUT])

    @_fail_closed
    def create_accepted(self, account: str) -> None:
        _check_account(account)
        limit = self._limits(mark=account).requests_per_minute
        op = uuid.uuid4().hex
        self._run("accepted", keys=self._names.of(account, "rate", f"op:{op}"),
                  args=[limit, RATE_STEP, MIN_RATE_STEP, _OP_TTL_MS])

    @_fail_closed
    def last_cut(self, account: str) -> float:
        cut_at = self._connection.client().hget(self._names.one(account, "rate"), "cut_at")
        return float(cut_at) if cut_at is not None else 0.0

    @_fail_closed
    def backoff_remaining(self, account: str) -> float:
        left = self._run("backoff_left", keys=self._names.of(account, "rate"), args=[self._now()])
        return float(left)

    # -- observability ---------------------------------------------------------

    @_fail_closed
    def stats(self, account: str | None = None) -> list[AccountStats]:
        if account is not None:
            return [self._account_stats(account)[0]]
        listed = self._connection.client().zrange(self._names.shared("accounts"), 0, -1)
        accounts = sorted(str(name) for name in listed)
        found = [self._account_stats(name) for name in accounts]
        idle = [stats.account for stats, active in found if not active]
        if idle:
            self._run("prune", keys=[self._names.shared("accounts")],
                      args=[self._now(), max(self._ttl, WINDOW_S), *idle])
        return [stats for stats, active in found if active]

    def _account_stats(self, account: str) -> tuple[AccountStats, bool]:
        in_flight, waiting, creates, backoff, active = self._run(
            "stats", keys=self._names.of(account, "leases", "tickets", "creates", "rate"),
            args=[self._now()])
        stats = AccountStats(account, int(in_flight), int(waiting), int(creates), float(backoff))
        return stats, bool(int(active))

