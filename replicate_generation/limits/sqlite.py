"""LimitStore on one SQLite file (WAL) shared by every process on a host.

Concurrency is leases with an expiry (a dead holder's slot comes back after the ttl, no counter
to leak), waiters are FIFO tickets, rates are GCRA per account and kind.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from replicate_generation.errors import StoreBusy, StoreUnavailable
from replicate_generation.limits import sqlite_turns as turns
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
from replicate_generation.limits.wakeups import HostWakeups, wakeup_directory
from replicate_generation.sqlite_db import Database

logger = logging.getLogger(__name__)

_SCHEMA = (
    # Legacy: older versions' /configure row; _migrate_legacy_limits makes per-field overrides.
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
    # AUTOINCREMENT: a seq is never reused, so a new ticket never sorts ahead of an older one.
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

    A connection per thread: a writer in SQLite's busy wait holds no lock others (/health) need.
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
        # The instance declared here: its defaults count even if its row lapsed (a slow heartbeat).
        self._own: tuple[str, int] | None = None
        self._wakeups = HostWakeups(wakeup_directory(path))
        self._create_schema()

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    def check(self) -> None:
        """Raise StoreUnavailable unless the state file can be read now (a cheap read)."""
        try:
            with self._db.read() as conn:
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




    def _create_schema(self) -> None:
        with self._db.write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            turns.create(conn)
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
            [(name, int(value), now) for name, value in zip(LIMIT_RANGES, row, strict=True)],
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
        for position, name in enumerate(LIMIT_RANGES):
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
        with self._db.read() as conn:
            return self._limits(conn)

    def describe_limits(self) -> dict[str, LimitSource]:
        with self._db.read() as conn:
            return self._sources(conn, self._clock())

    def set_limits(self, limits: Limits) -> None:
        limits.validate()
        self.set_overrides({name: getattr(limits, name) for name in LIMIT_RANGES})

    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        for name, value in changes.items():  # all checked before anything is stored
            check_known_limit(name)
            if value is not None:
                validate_limit(name, value)
        with self._db.write() as conn:
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
        with self._db.write() as conn:
            conn.execute("DELETE FROM cm_overrides")

    def declare(self, instance: str) -> None:
        self._own = (instance, os.getpid())
        defaults = self._defaults
        with self._db.write() as conn:
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
        with self._db.write() as conn:
            conn.execute("DELETE FROM cm_declarations WHERE instance = ?", (instance,))

    # -- leases and tickets -----------------------------------------------

    def try_acquire(self, account: str, ticket: str, turn: Turn = ANYONE,
                    limit: int | None = None) -> str | None:
        return self.try_acquire_ranked(account, ticket, turn, limit)[0]

    def try_acquire_ranked(self, account: str, ticket: str, turn: Turn = ANYONE,
                           limit: int | None = None) -> tuple[str | None, int]:
        # Most looks find the waiter still behind others: a read answers them, no write lock.
        rank = self._rank_while_waiting(account, ticket, limit)
        if rank is not None:
            return None, rank
        with self._db.write() as conn:
            now = self._clock()
            # Purged inside the granting transaction: dead holders' slots free with no reaper.
            conn.execute("DELETE FROM cm_leases WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM cm_tickets WHERE expires <= ?", (now,))
            mine = turns.place(conn, account, ticket, turn, now + self._ttl)
            shared = self._limits(conn).max_concurrent
            free = (shared if limit is None else min(shared, limit)) - _count(
                conn, "SELECT COUNT(*) FROM cm_leases WHERE account = ?", (account,)
            )
            ahead = turns.ahead(conn, account, mine)
            # In turn: only the first `free` may enter (free <= 0: a lowered limit drains first).
            if ahead >= free:
                return None, ahead - free + 1
            conn.execute("DELETE FROM cm_tickets WHERE seq = ?", (mine.seq,))
            turns.served(conn, account, mine)
            lease_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO cm_leases (id, account, expires) VALUES (?, ?, ?)",
                (lease_id, account, now + self._ttl),
            )
            return lease_id, 0

    def _rank_while_waiting(self, account: str, ticket: str, limit: int | None) -> int | None:
        """A placed ticket's rank while others enter first; None when it may enter now, is not
        placed, or its expiry is due a refresh: then the granting write decides."""
        with self._db.read() as conn:
            now = self._clock()
            mine = turns.placed(conn, ticket, fresh_after=now + self._ttl / 2)
            if mine is None:
                return None
            shared = self._limits(conn).max_concurrent
            held = _count(conn, "SELECT COUNT(*) FROM cm_leases WHERE account = ? AND expires > ?",
                          (account, now))
            free = (shared if limit is None else min(shared, limit)) - held
            ahead = turns.ahead(conn, account, mine, live_at=now)
        return ahead - free + 1 if ahead >= free else None

    def renew(self, lease_ids: Sequence[str], ticket_ids: Sequence[str]) -> None:
        if not lease_ids and not ticket_ids:
            return
        with self._db.write() as conn:
            expires = self._clock() + self._ttl
            # Expired, unpurged leases revive safely (grants purge first): a paused holder counts.
            conn.executemany(
                "UPDATE cm_leases SET expires = ? WHERE id = ?",
                [(expires, lease_id) for lease_id in lease_ids],
            )
            conn.executemany(
                "UPDATE cm_tickets SET expires = ? WHERE ticket = ?",
                [(expires, ticket) for ticket in ticket_ids],
            )

    def release(self, lease_id: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM cm_leases WHERE id = ?", (lease_id,))
        self._wakeups.publish()

    def leave_queue(self, ticket: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM cm_tickets WHERE ticket = ?", (ticket,))
        self._wakeups.publish()

    # -- rate (GCRA) and back-off --------------------------------------------

    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        if kind not in ("create", "poll"):
            raise ValueError(f"kind must be 'create' or 'poll', got {kind!r}")
        with self._db.write() as conn:
            now = self._clock()
            limits = self._limits(conn)
            rate, burst = float(limits.polls_per_minute), limits.burst
            if kind == "create":
                rate, burst = _create_pace(conn, account, limits)
            interval = WINDOW_S / rate  # emission interval T
            tolerance = (burst - 1) * interval  # tau
            # In a shared back-off "now" is its end, so tokens taken during it stay spaced after.
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
                _log_create(conn, account, use_at, now)
            return use_at - now

    def back_off(self, account: str, seconds: float) -> None:
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"back-off seconds must be >= 0, got {seconds!r}")
        seconds = min(seconds, MAX_BACKOFF_S)
        with self._db.write() as conn:
            now = self._clock()
            until = max(_backoff_until(conn, account), now + seconds)
            conn.execute(
                "INSERT OR REPLACE INTO cm_backoffs (account, until) VALUES (?, ?)",
                (account, until),
            )
            # Creates wait out the back-off; after a cut, holders re-reserve: the schedule restarts.
            tat = max(_tat(conn, account, "create", default=until), until)
            if _cut_learned_rate(conn, account, self._limits(conn), now, seconds):
                tat = until
            conn.execute(
                "INSERT OR REPLACE INTO cm_pacers (account, kind, tat) VALUES (?, 'create', ?)",
                (account, tat),
            )

    def last_cut(self, account: str) -> float:
        row = self._db.connection().execute(
            "SELECT cut_at FROM cm_learned_rates WHERE account = ?", (account,)).fetchone()
        return float(row[0]) if row is not None else 0.0

    def create_accepted(self, account: str) -> None:
        with self._db.read() as conn:
            if conn.execute("SELECT 1 FROM cm_learned_rates WHERE account = ?",
                            (account,)).fetchone() is None:
                return  # not throttled lately: nothing to learn, no write
        with self._db.write() as conn:
            limit = self._limits(conn).requests_per_minute
            conn.execute("UPDATE cm_learned_rates SET per_minute = per_minute + MAX(?, per_minute"
                         " * ?) WHERE account = ?", (MIN_RATE_STEP, RATE_STEP, account))
            conn.execute("DELETE FROM cm_learned_rates WHERE account = ? AND per_minute >= ?",
                         (account, limit))

    def backoff_remaining(self, account: str) -> float:
        until = _backoff_until(self._db.connection(), account)
        return max(0.0, until - self._clock())

    # -- observability --------------------------------------------------------

    def stats(self, account: str | None = None) -> list[AccountStats]:
        """Read-only snapshot; never takes the write lock, so health checks
        cannot block behind the limiter."""
        with self._db.read() as conn:
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
            if name in LIMIT_RANGES}


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
    if row is not None and now - float(row[1]) < max(seconds, EPISODE_S):
        return False
    conn.execute("INSERT OR REPLACE INTO cm_learned_rates (account, per_minute, cut_at)"
                 " VALUES (?, ?, ?)", (account, max(1.0, current * RATE_CUT), now))
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
        {"now": now, "since": now - WINDOW_S},
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
            (account, now - WINDOW_S, now),
        ),
        backoff_remaining=max(0.0, _backoff_until(conn, account) - now),
    )


def _log_create(conn: sqlite3.Connection, account: str, use_at: float, now: float) -> None:
    # Logged at use time, so creates_last_minute approximates what Replicate sees, not the queue.
    conn.execute("DELETE FROM cm_create_log WHERE at <= ?", (now - WINDOW_S,))
    conn.execute("INSERT INTO cm_create_log (account, at) VALUES (?, ?)", (account, use_at))
