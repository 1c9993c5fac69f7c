"""Per-account concurrency and rate limits shared by every thread and process on a host.

Two mechanisms, both kept in one shared store (SQLite here, Redis in
``redis_limits``, behind the same ``LimitStore`` protocol):

* Concurrency = leases with an expiry. A holder keeps its lease alive through
  the manager's heartbeat thread; a process that dies simply stops renewing,
  so its slots come back after ``lease_ttl`` seconds. There is no counter to
  leak. Waiters queue as tickets ordered by an autoincrement sequence, which
  gives FIFO admission across processes.
* Rate = GCRA per (account, kind). ``reserve`` spends a token and returns how
  long the caller must wait before using it, so callers sleep outside every
  lock and transaction (the upstream limiter slept while holding its lock and
  deadlocked).
* Limits = one set for every process sharing the store. Each open manager
  declares its environment's limits (a row renewed by its heartbeat, expiring
  after ``lease_ttl``); per field, a /configure override wins, else the
  smallest live declaration, so processes started with different values never
  together exceed the smallest.

* Outages: a store that raises StoreUnavailable is waited for. Callers keep their
  place until their deadline, then get StoreUnavailable (HTTP 503), never a token
  or slot the store did not grant; the heartbeat keeps beating and re-registers
  leases as soon as the store answers again.

An "account" is an opaque string (the caller passes a hash of the token); this
module knows nothing of Flask, Replicate or models.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from replicate_generation import metrics
from replicate_generation.errors import DeadlineExceeded, StoreBusy, StoreUnavailable
from replicate_generation.host_wakeups import HostWakeups, wakeup_directory
from replicate_generation.release_count import Heard, ReleaseCount
from replicate_generation.sqlite_db import Database

__all__ = [
    "AccountStats",
    "ConcurrencyManager",
    "DeadlineExceeded",
    "Kind",
    "LimitSource",
    "LimitStore",
    "Limits",
    "SQLiteLimitStore",
    "check_known_limit",
    "fold_own_defaults",
    "resolve_limit_sources",
    "validate_limit",
]

logger = logging.getLogger(__name__)

Kind = Literal["create", "poll"]

# Inclusive bounds checked by Limits.validate(); a 0 would block forever and a
# negative rate would divide by zero or go backwards (upstream defect §3.8).
_LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "max_concurrent": (1, 10_000),
    "requests_per_minute": (1, 100_000),
    "burst": (1, 1_000),
    "polls_per_minute": (1, 100_000),
}

# A bogus Retry-After (or "inf") must not freeze an account for good.
_MAX_BACKOFF_S = 3600.0
# Sleeps are measured on another clock than time.time(); a wake-up a hair
# early must not be mistaken for a new back-off.
_BACKOFF_EPSILON_S = 0.01
_WINDOW_S = 60.0
# AIMD on the create rate: cut to 60% on a 429 (70% took one more throttled probe on the way
# down, 50% lost a sixth of the pace), then +1% (at least 0.2/min) per accepted create.
_RATE_CUT = 0.6
_RATE_STEP = 0.01
_MIN_RATE_STEP = 0.2
# 429s closer together than this (or than their back-off) are one episode: one cut.
_EPISODE_S = 1.0
# Waiters this close to the head of the queue wake on local releases; the rest only poll, at
# most this far apart.
_NEAR_RANK = 3
_FAR_POLL_MAX_S = 1.0
# While the store is unavailable, waiters retry (and the heartbeat beats) at most this far apart.
_OUTAGE_PAUSE_MAX_S = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Per-account limits; the same values apply to every account."""

    max_concurrent: int  # predictions in flight per account
    requests_per_minute: int  # prediction creates per minute per account
    burst: int = 1  # creates allowed back-to-back above the steady pace
    polls_per_minute: int = 2400  # non-create calls per account (Replicate: 3000)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is not an int in range."""
        for name in _LIMIT_RANGES:
            validate_limit(name, getattr(self, name))


def validate_limit(name: str, value: object) -> None:
    """Raise ValueError unless ``name`` is a limit field and ``value`` an int in its range."""
    check_known_limit(name)
    low, high = _LIMIT_RANGES[name]
    # bool is an int subclass; True as a limit is a caller bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def check_known_limit(name: str) -> None:
    if name not in _LIMIT_RANGES:
        raise ValueError(f"unknown limit {name!r}; known: {', '.join(_LIMIT_RANGES)}")


@dataclass(frozen=True)
class LimitSource:
    """One limit as every process sharing the store applies it, and why.

    ``source`` is "configure" when a /configure override is stored for the field, else
    "environment": the smallest value among the live processes' declarations.
    """

    value: int
    source: Literal["environment", "configure"]
    set_at: float | None  # when the override was stored (None for "environment")
    declared_min: int | None  # smallest value declared by a live process, if any
    declared_max: int | None
    declarations: int  # live processes declaring their environment's limits

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source,
                "set_at": None if self.set_at is None else iso_utc(self.set_at),
                "declared": {"min": self.declared_min, "max": self.declared_max,
                             "processes": self.declarations}}


def iso_utc(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds, as the job records use."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resolve_limit_sources(
    overrides: Mapping[str, tuple[int, float]],
    ranges: Mapping[str, tuple[int, int]],
    declarations: int,
    defaults: Limits,
) -> dict[str, LimitSource]:
    """Per field: the override (value, set_at) if any, else the smallest live declaration, else
    (an observer alone) ``defaults``. The rule every LimitStore applies."""
    sources: dict[str, LimitSource] = {}
    for name in _LIMIT_RANGES:
        low, high = ranges.get(name, (None, None))
        if name in overrides:
            value, set_at = overrides[name]
            sources[name] = LimitSource(value, "configure", set_at, low, high, declarations)
        else:
            value = low if low is not None else getattr(defaults, name)
            sources[name] = LimitSource(value, "environment", None, low, high, declarations)
    return sources


def fold_own_defaults(
    ranges: Mapping[str, tuple[int, int]], declarations: int, own: Limits
) -> tuple[dict[str, tuple[int, int]], int]:
    """Add the caller's own declaration, which always counts even if its stored row lapsed."""
    folded = dict(ranges)
    for name in _LIMIT_RANGES:
        mine = getattr(own, name)
        low, high = folded.get(name, (mine, mine))
        folded[name] = (min(low, mine), max(high, mine))
    return folded, declarations + 1


class AccountStats(NamedTuple):
    account: str
    in_flight: int  # live (unexpired) leases
    waiting: int  # callers (any process) currently waiting for a lease
    creates_last_minute: int  # create tokens whose use time fell in the last 60 s
    backoff_remaining: float  # seconds of shared 429 back-off left


class LimitStore(Protocol):
    """Shared state behind ConcurrencyManager. Every method is one short atomic step."""

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease or ticket lives without renewal."""
        ...

    def get_limits(self) -> Limits:
        """The effective limits: per field the override if set, else the live minimum."""
        ...

    def set_limits(self, limits: Limits) -> None:
        """Override all four fields (what /configure did before overrides were per field)."""
        ...

    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        """Override the given fields only; None clears that field's override."""
        ...

    def clear_overrides(self) -> None:
        """Drop every override: the environment's declarations apply again."""
        ...

    def describe_limits(self) -> dict[str, LimitSource]:
        """Per ``Limits`` field: its effective value and where it comes from."""
        ...

    def declare(self, instance: str) -> None:
        """Declare (or renew) this store's default limits for ``instance``, alive for lease_ttl."""
        ...

    def withdraw(self, instance: str) -> None:
        """Remove ``instance``'s declaration (a clean shutdown)."""
        ...

    def try_acquire(self, account: str, ticket: str) -> str | None:
        """Enqueue or refresh ``ticket``; return a lease id if it may enter now."""
        ...

    def try_acquire_ranked(self, account: str, ticket: str) -> tuple[str | None, int]:
        """As try_acquire, and when refused how many waiters enter before this one (1: next)."""
        ...

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when a slot is released in another process, where the store can
        tell (else waiters find out by polling)."""
        ...

    def renew(self, lease_ids: Sequence[str], ticket_ids: Sequence[str]) -> None: ...

    def release(self, lease_id: str) -> None: ...

    def leave_queue(self, ticket: str) -> None: ...

    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        """Spend one token now; return seconds to wait before using it.

        If the wait would exceed ``max_wait`` nothing is spent and the (too
        long) wait is returned, so callers never burn a token they cannot use.
        """
        ...

    def back_off(self, account: str, seconds: float) -> None:
        """A 429: pause the account and lower its learned create rate (once per episode)."""
        ...

    def create_accepted(self, account: str) -> None:
        """A create went through: raise a learned create rate back towards the limit."""
        ...

    def last_cut(self, account: str) -> float:
        """When the learned create rate was last cut (0: never): tokens reserved before it were
        spaced for a rate Replicate refused."""
        ...

    def backoff_remaining(self, account: str) -> float: ...

    def stats(self, account: str | None = None) -> list[AccountStats]: ...

    def check(self) -> None:
        """Raise StoreUnavailable unless the store can be reached now (for /health)."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


_SCHEMA = (
    # Legacy: one row holding all four fields, written by older versions' /configure;
    # _migrate_legacy_limits turns it into per-field overrides.
    """CREATE TABLE IF NOT EXISTS cm_limits (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        max_concurrent INTEGER NOT NULL,
        requests_per_minute INTEGER NOT NULL,
        burst INTEGER NOT NULL,
        polls_per_minute INTEGER NOT NULL)""",
    # One row per field a /configure override was given for.
    """CREATE TABLE IF NOT EXISTS cm_overrides (
        field TEXT PRIMARY KEY, value INTEGER NOT NULL, set_at REAL NOT NULL) WITHOUT ROWID""",
    # One row per live process (manager): the limits its environment asks for.
    """CREATE TABLE IF NOT EXISTS cm_declarations (
        instance TEXT PRIMARY KEY,
        max_concurrent INTEGER NOT NULL,
        requests_per_minute INTEGER NOT NULL,
        burst INTEGER NOT NULL,
        polls_per_minute INTEGER NOT NULL,
        expires REAL NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS cm_leases (
        id TEXT PRIMARY KEY, account TEXT NOT NULL, expires REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cm_leases_account ON cm_leases (account)",
    "CREATE INDEX IF NOT EXISTS cm_leases_expires ON cm_leases (expires)",
    # AUTOINCREMENT: a seq is never reused, so a new ticket can never sort
    # ahead of an older one even after the newest row was deleted.
    """CREATE TABLE IF NOT EXISTS cm_tickets (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT NOT NULL UNIQUE,
        account TEXT NOT NULL, expires REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cm_tickets_account ON cm_tickets (account, seq)",
    "CREATE INDEX IF NOT EXISTS cm_tickets_expires ON cm_tickets (expires)",
    """CREATE TABLE IF NOT EXISTS cm_pacers (
        account TEXT NOT NULL, kind TEXT NOT NULL, tat REAL NOT NULL,
        PRIMARY KEY (account, kind)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS cm_backoffs (
        account TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID""",
    # The create rate Replicate really accepts, while it is below the configured one (AIMD).
    """CREATE TABLE IF NOT EXISTS cm_learned_rates (
        account TEXT PRIMARY KEY, per_minute REAL NOT NULL, cut_at REAL NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS cm_create_log (
        account TEXT NOT NULL, at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cm_create_log_account ON cm_create_log (account, at)",
    "CREATE INDEX IF NOT EXISTS cm_create_log_at ON cm_create_log (at)",
)


class SQLiteLimitStore:
    """LimitStore on one SQLite file (WAL) shared by every process on the host.

    Each thread gets its own connection, so a writer waiting on SQLite's busy
    timeout never holds a Python lock that other threads (or /health) need.
    Times stored are ``clock()`` values, wall-clock by default so that all
    processes agree.

    ``default_limits`` are what this process's environment asks for. They bind
    other processes only once declared (``declare``, which the manager does
    while it is open); a store that never declares is a read-only observer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        default_limits: Limits,
        *,
        lease_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        default_limits.validate()
        if not (math.isfinite(lease_ttl) and lease_ttl > 0):
            raise ValueError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        self._db = Database(path)
        self._defaults = default_limits
        self._ttl = float(lease_ttl)
        self._clock = clock
        # The instance this store declared for, in the process that declared it: its own
        # defaults then always count, even if its row lapsed (a slow heartbeat).
        self._own: tuple[str, int] | None = None
        self._wakeups = HostWakeups(wakeup_directory(path))
        self._create_schema()

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    def check(self) -> None:
        """Raise StoreUnavailable unless the state file can be read now (a cheap read)."""
        try:
            with self._read() as conn:
                conn.execute("SELECT COUNT(*) FROM cm_overrides").fetchone()
        except (sqlite3.Error, OSError, StoreBusy) as exc:
            raise StoreUnavailable("sqlite", f"the state file cannot be read "
                                             f"({type(exc).__name__})") from exc

    def close(self) -> None:
        """Stop listening for wake-ups; each thread's connection closes with its thread."""
        self._wakeups.close()

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when another store on this file releases a slot or leaves a queue
        (a datagram between the processes of this host; see host_wakeups)."""
        self._wakeups.listen(callback)

    # -- connections and transactions (one per thread, see sqlite_db) -----

    def _connection(self) -> sqlite3.Connection:
        return self._db.connection()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.write()

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.read()

    def _create_schema(self) -> None:
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            self._migrate_legacy_limits(conn)

    def _migrate_legacy_limits(self, conn: sqlite3.Connection) -> None:
        """An older version's all-fields override becomes four visible, clearable overrides."""
        row = conn.execute(
            "SELECT max_concurrent, requests_per_minute, burst, polls_per_minute"
            " FROM cm_limits WHERE id = 1"
        ).fetchone()
        if row is None:
            return
        now = self._clock()
        conn.executemany(
            "INSERT OR IGNORE INTO cm_overrides (field, value, set_at) VALUES (?, ?, ?)",
            [(name, int(value), now) for name, value in zip(_LIMIT_RANGES, row, strict=True)],
        )
        conn.execute("DELETE FROM cm_limits")

    # -- limits: overrides and declarations ---------------------------------

    def _limits(self, conn: sqlite3.Connection) -> Limits:
        sources = self._sources(conn, self._clock())
        return Limits(**{name: source.value for name, source in sources.items()})

    def _sources(self, conn: sqlite3.Connection, now: float) -> dict[str, LimitSource]:
        ranges, declarations = self._declared_ranges(conn, now)
        return resolve_limit_sources(_overrides(conn), ranges, declarations, self._defaults)

    def _declared_ranges(
        self, conn: sqlite3.Connection, now: float
    ) -> tuple[dict[str, tuple[int, int]], int]:
        """(min, max) per field over live declarations, own defaults included; and their count."""
        own = self._own_instance()
        row = conn.execute(_DECLARED_RANGES_SQL, (now, own or "")).fetchone()
        count = int(row[0])
        ranges: dict[str, tuple[int, int]] = {}
        for position, name in enumerate(_LIMIT_RANGES):
            low, high = row[1 + 2 * position], row[2 + 2 * position]
            if low is not None:
                ranges[name] = (int(low), int(high))
        if own is None:
            return ranges, count
        return fold_own_defaults(ranges, count, self._defaults)

    def _own_instance(self) -> str | None:
        # A forked child has not declared anything itself (yet).
        if self._own is None or self._own[1] != os.getpid():
            return None
        return self._own[0]

    def get_limits(self) -> Limits:
        with self._read() as conn:
            return self._limits(conn)

    def describe_limits(self) -> dict[str, LimitSource]:
        with self._read() as conn:
            return self._sources(conn, self._clock())

    def set_limits(self, limits: Limits) -> None:
        limits.validate()
        self.set_overrides({name: getattr(limits, name) for name in _LIMIT_RANGES})

    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        for name, value in changes.items():  # all checked before anything is stored
            check_known_limit(name)
            if value is not None:
                validate_limit(name, value)
        with self._write() as conn:
            now = self._clock()
            for name, value in changes.items():
                if value is None:
                    conn.execute("DELETE FROM cm_overrides WHERE field = ?", (name,))
                else:
                    conn.execute(
                        "INSERT OR REPLACE INTO cm_overrides (field, value, set_at)"
                        " VALUES (?, ?, ?)",
                        (name, value, now),
                    )

    def clear_overrides(self) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cm_overrides")

    def declare(self, instance: str) -> None:
        self._own = (instance, os.getpid())
        defaults = self._defaults
        with self._write() as conn:
            now = self._clock()
            # Purged here, by the living processes' heartbeats: no separate reaper to fail.
            conn.execute("DELETE FROM cm_declarations WHERE expires <= ?", (now,))
            conn.execute(
                "INSERT OR REPLACE INTO cm_declarations (instance, max_concurrent,"
                " requests_per_minute, burst, polls_per_minute, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (instance, defaults.max_concurrent, defaults.requests_per_minute,
                 defaults.burst, defaults.polls_per_minute, now + self._ttl),
            )

    def withdraw(self, instance: str) -> None:
        if self._own is not None and self._own[0] == instance:
            self._own = None
        with self._write() as conn:
            conn.execute("DELETE FROM cm_declarations WHERE instance = ?", (instance,))

    # -- leases and tickets -----------------------------------------------

    def try_acquire(self, account: str, ticket: str) -> str | None:
        return self.try_acquire_ranked(account, ticket)[0]

    def try_acquire_ranked(self, account: str, ticket: str) -> tuple[str | None, int]:
        with self._write() as conn:
            now = self._clock()
            # Purging here, inside the granting transaction, is what frees
            # the slots of dead holders: no separate reaper to fail.
            conn.execute("DELETE FROM cm_leases WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM cm_tickets WHERE expires <= ?", (now,))
            seq = self._upsert_ticket(conn, account, ticket, now)
            free = self._limits(conn).max_concurrent - _count(
                conn, "SELECT COUNT(*) FROM cm_leases WHERE account = ?", (account,)
            )
            ahead = _count(
                conn,
                "SELECT COUNT(*) FROM cm_tickets WHERE account = ? AND seq < ?",
                (account, seq),
            )
            # FIFO: only the first `free` waiters may enter; free <= 0 also covers a lowered
            # limit (in-flight work finishes first).
            if ahead >= free:
                return None, ahead - free + 1
            conn.execute("DELETE FROM cm_tickets WHERE seq = ?", (seq,))
            lease_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO cm_leases (id, account, expires) VALUES (?, ?, ?)",
                (lease_id, account, now + self._ttl),
            )
            return lease_id, 0

    def _upsert_ticket(
        self, conn: sqlite3.Connection, account: str, ticket: str, now: float
    ) -> int:
        """Refresh the ticket, or enqueue it at the back (if new, or expired
        and purged)."""
        expires = now + self._ttl
        row = conn.execute("SELECT seq FROM cm_tickets WHERE ticket = ?", (ticket,)).fetchone()
        if row is not None:
            conn.execute("UPDATE cm_tickets SET expires = ? WHERE seq = ?", (expires, row[0]))
            return int(row[0])
        cursor = conn.execute(
            "INSERT INTO cm_tickets (ticket, account, expires) VALUES (?, ?, ?)",
            (ticket, account, expires),
        )
        if cursor.lastrowid is None:  # pragma: no cover - sqlite always sets it
            raise RuntimeError("SQLite returned no rowid for a new ticket")
        return cursor.lastrowid

    def renew(self, lease_ids: Sequence[str], ticket_ids: Sequence[str]) -> None:
        if not lease_ids and not ticket_ids:
            return
        with self._write() as conn:
            expires = self._clock() + self._ttl
            # A lease that expired but was not purged yet is revived: nobody
            # was granted its slot (grants purge first), so this stays safe and
            # a holder paused past its ttl is still counted while it works.
            conn.executemany(
                "UPDATE cm_leases SET expires = ? WHERE id = ?",
                [(expires, lease_id) for lease_id in lease_ids],
            )
            conn.executemany(
                "UPDATE cm_tickets SET expires = ? WHERE ticket = ?",
                [(expires, ticket) for ticket in ticket_ids],
            )

    def release(self, lease_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cm_leases WHERE id = ?", (lease_id,))
        self._wakeups.publish()

    def leave_queue(self, ticket: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM cm_tickets WHERE ticket = ?", (ticket,))
        self._wakeups.publish()

    # -- rate (GCRA) and back-off --------------------------------------------

    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        if kind not in ("create", "poll"):
            raise ValueError(f"kind must be 'create' or 'poll', got {kind!r}")
        with self._write() as conn:
            now = self._clock()
            limits = self._limits(conn)
            rate, burst = float(limits.polls_per_minute), limits.burst
            if kind == "create":
                rate, burst = _create_pace(conn, account, limits)
            interval = _WINDOW_S / rate  # emission interval T
            tolerance = (burst - 1) * interval  # tau
            # During a shared back-off the account behaves as if "now" were
            # the end of the back-off, so every kind waits it out and tokens
            # taken during it are still spaced by GCRA afterwards.
            arrival = max(now, _backoff_until(conn, account))
            tat = _tat(conn, account, kind, default=arrival)
            use_at = max(arrival, tat - tolerance)
            if use_at - now > max_wait:
                return use_at - now  # spend nothing: the caller cannot use it
            conn.execute(
                "INSERT OR REPLACE INTO cm_pacers (account, kind, tat) VALUES (?, ?, ?)",
                (account, kind, max(tat, arrival) + interval),
            )
            if kind == "create":
                self._log_create(conn, account, use_at, now)
            return use_at - now

    @staticmethod
    def _log_create(conn: sqlite3.Connection, account: str, use_at: float, now: float) -> None:
        # Logged at the time the token may be used, so creates_last_minute
        # approximates what Replicate sees rather than how many are queued.
        conn.execute("DELETE FROM cm_create_log WHERE at <= ?", (now - _WINDOW_S,))
        conn.execute("INSERT INTO cm_create_log (account, at) VALUES (?, ?)", (account, use_at))

    def back_off(self, account: str, seconds: float) -> None:
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"back-off seconds must be >= 0, got {seconds!r}")
        seconds = min(seconds, _MAX_BACKOFF_S)
        with self._write() as conn:
            now = self._clock()
            until = max(_backoff_until(conn, account), now + seconds)
            conn.execute(
                "INSERT OR REPLACE INTO cm_backoffs (account, until) VALUES (?, ?)",
                (account, until),
            )
            # Later create reservations start after the back-off; after a cut, the tokens
            # already handed out are re-reserved by their holders, so the schedule restarts.
            tat = max(_tat(conn, account, "create", default=until), until)
            if _cut_learned_rate(conn, account, self._limits(conn), now, seconds):
                tat = until
            conn.execute(
                "INSERT OR REPLACE INTO cm_pacers (account, kind, tat) VALUES (?, 'create', ?)",
                (account, tat),
            )

    def last_cut(self, account: str) -> float:
        row = self._connection().execute(
            "SELECT cut_at FROM cm_learned_rates WHERE account = ?", (account,)).fetchone()
        return float(row[0]) if row is not None else 0.0

    def create_accepted(self, account: str) -> None:
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM cm_learned_rates WHERE account = ?",
                            (account,)).fetchone() is None:
                return  # not throttled lately: nothing to learn, no write
        with self._write() as conn:
            limit = self._limits(conn).requests_per_minute
            conn.execute("UPDATE cm_learned_rates SET per_minute = per_minute + MAX(?, per_minute"
                         " * ?) WHERE account = ?", (_MIN_RATE_STEP, _RATE_STEP, account))
            conn.execute("DELETE FROM cm_learned_rates WHERE account = ? AND per_minute >= ?",
                         (account, limit))

    def backoff_remaining(self, account: str) -> float:
        until = _backoff_until(self._connection(), account)
        return max(0.0, until - self._clock())

    # -- observability --------------------------------------------------------

    def stats(self, account: str | None = None) -> list[AccountStats]:
        """Read-only snapshot; never takes the write lock, so health checks
        cannot block behind the limiter."""
        with self._read() as conn:
            now = self._clock()
            accounts = [account] if account is not None else _active_accounts(conn, now)
            return [_account_stats(conn, name, now) for name in accounts]


# Live declarations other than the caller's own (whose defaults are folded in separately).
_DECLARED_RANGES_SQL = (
    "SELECT COUNT(*), MIN(max_concurrent), MAX(max_concurrent),"
    " MIN(requests_per_minute), MAX(requests_per_minute), MIN(burst), MAX(burst),"
    " MIN(polls_per_minute), MAX(polls_per_minute)"
    " FROM cm_declarations WHERE expires > ? AND instance != ?"
)


def _overrides(conn: sqlite3.Connection) -> dict[str, tuple[int, float]]:
    rows = conn.execute("SELECT field, value, set_at FROM cm_overrides").fetchall()
    return {str(name): (int(value), float(set_at)) for name, value, set_at in rows
            if name in _LIMIT_RANGES}


def _count(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row is not None else 0


def _tat(conn: sqlite3.Connection, account: str, kind: str, *, default: float) -> float:
    row = conn.execute(
        "SELECT tat FROM cm_pacers WHERE account = ? AND kind = ?", (account, kind)
    ).fetchone()
    return float(row[0]) if row is not None else default


def _create_pace(conn: sqlite3.Connection, account: str, limits: Limits) -> tuple[float, int]:
    """Creates per minute and burst: the configured ones, or the learned rate and no burst
    while Replicate accepts less than configured."""
    row = conn.execute("SELECT per_minute FROM cm_learned_rates WHERE account = ?",
                       (account,)).fetchone()
    if row is None or float(row[0]) >= limits.requests_per_minute:
        return float(limits.requests_per_minute), limits.burst
    return float(row[0]), 1


def _cut_learned_rate(conn: sqlite3.Connection, account: str, limits: Limits, now: float,
                      seconds: float) -> bool:
    """Multiplicative decrease, once per throttling episode (concurrent 429s count once);
    say whether it cut."""
    row = conn.execute("SELECT per_minute, cut_at FROM cm_learned_rates WHERE account = ?",
                       (account,)).fetchone()
    current = float(limits.requests_per_minute) if row is None else \
        min(float(row[0]), limits.requests_per_minute)
    if row is not None and now - float(row[1]) < max(seconds, _EPISODE_S):
        return False
    conn.execute("INSERT OR REPLACE INTO cm_learned_rates (account, per_minute, cut_at)"
                 " VALUES (?, ?, ?)", (account, max(1.0, current * _RATE_CUT), now))
    return True


def _backoff_until(conn: sqlite3.Connection, account: str) -> float:
    row = conn.execute("SELECT until FROM cm_backoffs WHERE account = ?", (account,)).fetchone()
    return float(row[0]) if row is not None else 0.0


def _active_accounts(conn: sqlite3.Connection, now: float) -> list[str]:
    rows = conn.execute(
        "SELECT account FROM cm_leases WHERE expires > :now"
        " UNION SELECT account FROM cm_tickets WHERE expires > :now"
        " UNION SELECT account FROM cm_backoffs WHERE until > :now"
        " UNION SELECT account FROM cm_create_log WHERE at > :since"
        " ORDER BY 1",
        {"now": now, "since": now - _WINDOW_S},
    ).fetchall()
    return [str(row[0]) for row in rows]


def _account_stats(conn: sqlite3.Connection, account: str, now: float) -> AccountStats:
    return AccountStats(
        account=account,
        in_flight=_count(
            conn,
            "SELECT COUNT(*) FROM cm_leases WHERE account = ? AND expires > ?",
            (account, now),
        ),
        waiting=_count(
            conn,
            "SELECT COUNT(*) FROM cm_tickets WHERE account = ? AND expires > ?",
            (account, now),
        ),
        creates_last_minute=_count(
            conn,
            "SELECT COUNT(*) FROM cm_create_log WHERE account = ? AND at > ? AND at <= ?",
            (account, now - _WINDOW_S, now),
        ),
        backoff_remaining=max(0.0, _backoff_until(conn, account) - now),
    )


class ConcurrencyManager:
    """Per-process front end: waits for leases and tokens, keeps leases alive.

    One per process. All waiting happens here, outside any store transaction
    and outside every lock.
    """

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
        self._registry_lock = threading.Lock()
        self._leases: set[str] = set()
        self._tickets: set[str] = set()
        # Releases here and those the store relays from other processes wake waiters; polls
        # are the fallback for releases nobody relays.
        self._releases = ReleaseCount()
        self._stop = threading.Event()
        self._wake = threading.Event()  # renew now: the store is back after an outage
        self._heartbeat: threading.Thread | None = None
        self._closed = False
        self._outage_lock = threading.Lock()
        self._outage = False

    # -- concurrency ------------------------------------------------------------

    @contextmanager
    def slot(self, account: str, deadline: float) -> Iterator[None]:
        """Hold one of the account's in-flight slots for the body of the block."""
        started = time.monotonic()
        lease_id = self._acquire(account, deadline)
        metrics.limiter_waited("slot", started)
        try:
            yield
        finally:
            self._release(lease_id)

    def _acquire(self, account: str, deadline: float) -> str:
        self._check_open()
        if self._clock() >= deadline:
            raise DeadlineExceeded(f"deadline passed before waiting for a slot ({account})")
        self._ensure_heartbeat()
        ticket = uuid.uuid4().hex
        self._track(self._tickets, ticket)
        lease_id: str | None = None
        try:
            lease_id = self._wait_for_lease(account, ticket, deadline)
            self._track(self._leases, lease_id)
            return lease_id
        finally:
            self._untrack(self._tickets, ticket)
            if lease_id is None:
                # Giving up may move later waiters (here or elsewhere) to the front.
                self._best_effort(self._store.leave_queue, ticket)
                self._notify()

    def _wait_for_lease(self, account: str, ticket: str, deadline: float) -> str:
        while True:
            heard = self._releases.heard()
            if self._closed:
                raise RuntimeError("ConcurrencyManager has been shut down")
            lease_id, rank = self._patiently(
                partial(self._store.try_acquire_ranked, account, ticket), deadline,
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
                self._store_down("a waiting caller", exc)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise
                pause(min(remaining, _OUTAGE_PAUSE_MAX_S, delay * random.uniform(0.5, 1.5)))  # noqa: S311
                if self._closed:
                    raise RuntimeError("ConcurrencyManager has been shut down") from exc
                if self._clock() >= deadline:
                    raise
                delay = min(2 * delay, _OUTAGE_PAUSE_MAX_S)
                continue
            self._store_up(renew=True)
            return result

    def _store_down(self, what: str, exc: StoreUnavailable) -> None:
        """Log an outage once, however many callers and beats run into it."""
        with self._outage_lock:
            if self._outage:
                return
            self._outage = True
        logger.error("limit store unavailable (seen by %s): %s; retrying until it is back",
                     what, exc)

    def _store_up(self, *, renew: bool) -> None:
        if not self._outage:  # the common case: no lock
            return
        with self._outage_lock:
            if not self._outage:
                return
            self._outage = False
        logger.warning("limit store reachable again")
        if renew:
            # Re-register this process's leases at once: the store may have lost them.
            self._wake.set()

    def _jittered_poll(self) -> float:
        # Jitter spreads the polls of many waiters so they do not hit the
        # database in lock-step. Not security-relevant randomness.
        return self._poll_interval * random.uniform(0.5, 1.5)  # noqa: S311

    def _notify(self) -> None:
        self._releases.add()

    def _release(self, lease_id: str) -> None:
        self._untrack(self._leases, lease_id)
        self._best_effort(self._store.release, lease_id)
        self._notify()

    def _best_effort(self, cleanup: Callable[[str], None], item: str) -> None:
        """Run a cleanup whose failure must not mask the caller's result or
        exception: an unrenewed lease or ticket expires by itself within lease_ttl."""
        try:
            cleanup(item)
        except StoreUnavailable as exc:
            self._store_down(f"the cleanup of {item}", exc)
        except Exception:
            logger.error("cleanup of %s failed; it will expire", item, exc_info=True)

    # -- heartbeat --------------------------------------------------------------

    def _track(self, registry: set[str], item: str) -> None:
        with self._registry_lock:
            registry.add(item)

    def _untrack(self, registry: set[str], item: str) -> None:
        with self._registry_lock:
            registry.discard(item)

    def _ensure_heartbeat(self) -> None:
        with self._registry_lock:
            if self._heartbeat is not None and self._heartbeat.is_alive():
                return
            # Also restarted in a forked child (see _check_open): threads do not survive fork.
            self._heartbeat = threading.Thread(
                target=self._heartbeat_loop, name="concurrency-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def _heartbeat_loop(self) -> None:
        stop, wake = self._stop, self._wake
        while not stop.is_set():
            # Faster during an outage, so leases are re-registered soon after it ends.
            outage_beat = min(self._heartbeat_interval, _OUTAGE_PAUSE_MAX_S)
            wake.wait(outage_beat if self._outage else self._heartbeat_interval)
            wake.clear()
            if stop.is_set():
                return
            self._renew_once()

    def _renew_once(self) -> None:
        with self._registry_lock:
            leases, tickets = list(self._leases), list(self._tickets)
        # Separate steps: a failed declaration must not cost this beat's lease renewals.
        self._beat("lease heartbeat", lambda: self._store.renew(leases, tickets))
        self._beat("limits declaration", lambda: self._store.declare(self._instance))

    def _beat(self, what: str, step: Callable[[], None]) -> None:
        # Keep beating on any failure: one failed renewal is survivable (the interval is a
        # fraction of the ttl); a dead heartbeat would drop every lease.
        try:
            step()
        except StoreUnavailable as exc:
            self._store_down(what, exc)
            return
        except Exception:
            logger.error("%s failed; retrying", what, exc_info=True)
            return
        self._store_up(renew=False)

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
            # A 429 back-off began, or the create rate was cut, while we slept: this token
            # was spaced for a rate Replicate refuses, so take a new one.

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
            self._store_down(what, exc)
            return
        self._store_up(renew=True)

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
        self._stop.set()
        self._releases.wake_everyone()  # waiters see _closed at once
        self._wake.set()
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not threading.current_thread():
            heartbeat.join(timeout=5.0)
        with self._registry_lock:
            leases, tickets = list(self._leases), list(self._tickets)
            self._leases.clear()
            self._tickets.clear()
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
        self._ensure_heartbeat()

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            self._reset_process_state()
            self._open()
        if self._closed:
            raise RuntimeError("ConcurrencyManager has been shut down")
