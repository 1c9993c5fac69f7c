"""LimitStore on Redis: the same leases, FIFO tickets, GCRA and limits as SQLiteLimitStore, shared
by every host that points at one Redis.

Every operation is one Lua script (atomic, no lock held by a client) that reads Redis's own clock
(``TIME``), so hosts with skewed clocks still agree. A ``clock`` given to the constructor (tests
only) replaces it: its value travels as an argument.

Keys. Everything of one account shares the hash tag ``{<account>}`` and every script touches the
keys of one slot only, so Redis Cluster works; the shared limits (overrides, declarations, the set
of active accounts) live under ``{limits}``. A per-account operation that needs the effective
limits reads them first with a separate script on the ``{limits}`` slot::

    <prefix>:{limits}:overrides      hash   field -> "value set_at"
    <prefix>:{limits}:declarations   hash   instance -> "mc rpm burst ppm expires"
    <prefix>:{limits}:accounts       zset   account -> last use (stats(None), pruned lazily)
    <prefix>:{<account>}:leases      zset   lease id -> expiry
    <prefix>:{<account>}:released    zset   lease id -> when purged or released (tombstones)
    <prefix>:{<account>}:queue       zset   ticket -> sequence number (FIFO)
    <prefix>:{<account>}:tickets     zset   ticket -> expiry
    <prefix>:{<account>}:seq         string the ticket sequence (INCR)
    <prefix>:{<account>}:rate        hash   tat:create, tat:poll, backoff, learned, cut_at
    <prefix>:{<account>}:creates     zset   op id -> use time (creates_last_minute)
    <prefix>:{<account>}:op:<op id>  string a result kept briefly, so a retried call spends nothing

Safe to run twice. redis-py resends a command whose answer was lost; ``try_acquire`` derives the
lease id from the ticket and returns that lease if it exists, and ``reserve``/``create_accepted``
carry an op id whose stored result a second run returns. The other operations are idempotent.

Persistence. Run Redis with ``appendonly yes`` and ``appendfsync everysec``. If a restart loses
data anyway (no AOF, or the last second of it), holders re-register: ``renew`` re-adds a lease it
does not find unless that lease was purged or released (tombstones, kept ``_TOMBSTONE_TTLS`` ttls;
lost with the data, so after a loss every live lease comes back). Until each holder's next
heartbeat an account can be over-admitted by the leases not yet re-registered; waiters simply
re-enqueue on their next poll. An outage longer than a lease's ttl lets the first waiter after it
purge leases whose holders have not renewed yet; the manager beats every second during an outage
to keep that window short.

Failures. Connection errors, timeouts, a loading or read-only server raise
``StoreUnavailable("redis", ...)``: callers fail closed. No message carries the URL (it may hold
a password).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# The same constants as the SQLite store: both backends must give the same answers.
from replicate_generation.concurrency_manager import (
    _EPISODE_S,
    _LIMIT_RANGES,
    _MAX_BACKOFF_S,
    _MIN_RATE_STEP,
    _RATE_CUT,
    _RATE_STEP,
    _WINDOW_S,
    AccountStats,
    Kind,
    Limits,
    LimitSource,
    check_known_limit,
    fold_own_defaults,
    resolve_limit_sources,
    validate_limit,
)
from replicate_generation.errors import StoreUnavailable

__all__ = ["RedisLimitStore"]

# Tombstones outlive a purge by this many ttls: a holder paused that long may not come back.
_TOMBSTONE_TTLS = 10
# How long a reserve/create_accepted result is kept for a resent command.
_OP_TTL_MS = 30_000
# The releases listener: how long one wait for a message lasts, and the pause after an error.
_LISTEN_TIMEOUT_S = 1.0
_LISTEN_RETRY_S = 0.5
# redis-py resends a command after a dropped connection this often, briefly: the manager
# retries longer, above the store.
_RETRY = Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), retries=2)
# Errors that mean "not now" rather than a bug, and the reason given; subclasses first.
_UNAVAILABLE: tuple[tuple[type[RedisError], str], ...] = (
    (AuthenticationError, "authentication failed"),
    (BusyLoadingError, "loading its data"),
    (RedisTimeoutError, "timed out"),
    (RedisConnectionError, "connection failed"),
    (ReadOnlyError, "read-only replica"),
    (OutOfMemoryError, "out of memory"),
    (MasterDownError, "the replica lost its primary"),
    (ClusterDownError, "the cluster is down"),
    (TryAgainError, "the cluster is resharding"),
)
# Plain ResponseErrors (redis-py has no class for them) that mean the same.
_TRANSIENT_PREFIXES = {"BUSY": "busy running a script", "NOREPLICAS": "not enough replicas"}

P = ParamSpec("P")
R = TypeVar("R")

# Shared by every script: the clock, and numbers printed with full precision (Lua's tostring
# keeps 14 digits, not enough for a Unix time with sub-millisecond steps).
_PRELUDE = """
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
-- Tombstones: a purged or released lease must never be revived by a late renew.
local function bury(key, ids, now, keep)
  for _, id in ipairs(ids) do redis.call('ZADD', key, now, id) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - keep))
  if #ids > 0 then redis.call('PEXPIRE', key, math.ceil(keep * 1000)) end
end
"""

# KEYS: overrides, declarations, accounts. ARGV: now, own instance or '', account to mark or ''.
# Returns the overrides (flat field, "value set_at") and the other live declarations.
_LIMITS_LUA = _PRELUDE + """
local now = clock(ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], now, ARGV[3]) end
local declared = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '(%S+)$'))
  if all[i] ~= ARGV[2] and expires > now then table.insert(declared, all[i + 1]) end
end
return {redis.call('HGETALL', KEYS[1]), declared}
"""

# KEYS: declarations. ARGV: now, ttl, instance, "mc rpm burst ppm".
_DECLARE_LUA = _PRELUDE + """
local now = clock(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do  -- purged by the living processes' heartbeats: no reaper to fail
  local expires = tonumber(string.match(all[i + 1], '(%S+)$'))
  if expires <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4] .. ' ' .. num(now + tonumber(ARGV[2])))
"""

# KEYS: overrides. ARGV: now, then field, value ('' clears) pairs.
_OVERRIDE_LUA = _PRELUDE + """
local now = clock(ARGV[1])
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. num(now)) end
end
"""

# KEYS: leases, released, queue, tickets, seq. ARGV: now, ttl, max_concurrent, ticket, lease id,
# tombstone keep. Returns the lease id, or nil while the caller must wait.
_ACQUIRE_LUA = _PRELUDE + """
local now, ttl, limit = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, lease = ARGV[4], ARGV[5]
-- Purged inside the granting script: a dead holder's slot is back within ttl, no reaper.
bury(KEYS[2], redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now)), now, tonumber(ARGV[6]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now))
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', num(now))) do
  redis.call('ZREM', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', num(now))
if redis.call('ZSCORE', KEYS[1], lease) then return lease end  -- a resent call that already won
local seq = redis.call('ZSCORE', KEYS[3], ticket)
if not seq then
  seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[3], seq, ticket)
end
redis.call('ZADD', KEYS[4], now + ttl, ticket)
local free = limit - redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. seq)
-- FIFO: only the first `free` may enter (free <= 0: a lowered limit drains first); else the rank.
if ahead >= free then return ahead - free + 1 end
redis.call('ZREM', KEYS[3], ticket)
redis.call('ZREM', KEYS[4], ticket)
redis.call('ZREM', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + ttl, lease)
return lease
"""

# KEYS: leases, released, tickets. ARGV: now, ttl, number of leases, lease ids..., tickets...
_RENEW_LUA = _PRELUDE + """
local now, n = clock(ARGV[1]), tonumber(ARGV[3])
local expires = now + tonumber(ARGV[2])
for i = 4, 3 + n do
  -- Missing but never purged or released: lost with Redis's data, so it is re-registered.
  -- Expired but not purged yet: revived, as nobody was granted its slot (grants purge first).
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) or not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[1], expires, ARGV[i])
  end
end
for i = 4 + n, #ARGV do redis.call('ZADD', KEYS[3], 'XX', expires, ARGV[i]) end
"""

# KEYS: leases, released. ARGV: now, lease id, tombstone keep.
_RELEASE_LUA = _PRELUDE + """
local now = clock(ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[2])
bury(KEYS[2], {ARGV[2]}, now, tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], '')  -- the next in line, in any process, may enter now
"""

# KEYS: queue, tickets, leases, released. ARGV: now, ticket, its lease id, tombstone keep.
_LEAVE_LUA = _PRELUDE + """
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
-- A grant whose answer was lost: the caller never learned of the lease, so it goes too.
if redis.call('ZREM', KEYS[3], ARGV[3]) == 1 then
  bury(KEYS[4], {ARGV[3]}, clock(ARGV[1]), tonumber(ARGV[4]))
end
redis.call('PUBLISH', ARGV[5], '')  -- those behind it moved up
"""

# KEYS: rate, creates, op. ARGV: now, kind, rpm, burst, ppm, max_wait, op id, op ttl (ms).
# Returns the wait before the token may be used (too long: nothing spent).
_RESERVE_LUA = _PRELUDE + """
local done = redis.call('GET', KEYS[3])
if done then return done end  -- a resent call: the first run already answered
local now, kind = clock(ARGV[1]), ARGV[2]
local rpm, burst, rate = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if kind == 'create' then
  rate = rpm
  local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
  if learned and learned < rpm then rate, burst = learned, 1 end  -- learning: no burst
end
local interval = 60 / rate
-- During a shared back-off "now" is its end, so tokens taken during it stay spaced after it.
local arrival = math.max(now, tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0)
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat:' .. kind)) or arrival
local use_at = math.max(arrival, tat - (burst - 1) * interval)
if use_at - now <= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'tat:' .. kind, math.max(tat, arrival) + interval)
  if kind == 'create' then  -- logged at its use time: what Replicate will see
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now - 60))
    redis.call('ZADD', KEYS[2], use_at, ARGV[7])
  end
end
local wait = num(use_at - now)
redis.call('SET', KEYS[3], wait, 'PX', ARGV[8])
return wait
"""

# KEYS: rate. ARGV: now, seconds, rpm, episode, cut.
_BACKOFF_LUA = _PRELUDE + """
local now, seconds, rpm = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local until_ = math.max(tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0, now + seconds)
redis.call('HSET', KEYS[1], 'backoff', until_)
local tat = math.max(tonumber(redis.call('HGET', KEYS[1], 'tat:create')) or until_, until_)
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
local cut_at = tonumber(redis.call('HGET', KEYS[1], 'cut_at'))
-- 429s closer together than the episode are one: one cut; then the schedule restarts.
if not learned or now - cut_at >= math.max(seconds, tonumber(ARGV[4])) then
  local current = math.min(learned or rpm, rpm)
  redis.call('HSET', KEYS[1], 'learned', math.max(1, current * tonumber(ARGV[5])), 'cut_at', now)
  tat = until_
end
redis.call('HSET', KEYS[1], 'tat:create', tat)
"""

# KEYS: rate, op. ARGV: rpm, step, min step, op ttl (ms).
_ACCEPTED_LUA = """
if redis.call('GET', KEYS[2]) then return 0 end  -- a resent call: counted once
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
if learned then
  learned = learned + math.max(tonumber(ARGV[3]), learned * tonumber(ARGV[2]))
  if learned >= tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], 'learned', 'cut_at')
  else redis.call('HSET', KEYS[1], 'learned', learned) end
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
return 1
"""

# KEYS: rate. ARGV: now.
_BACKOFF_LEFT_LUA = _PRELUDE + """
local until_ = tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0
return num(math.max(0, until_ - clock(ARGV[1])))
"""

# KEYS: leases, tickets, creates, rate. ARGV: now.
# Returns in_flight, waiting, creates_last_minute, backoff_remaining, active (0/1).
_STATS_LUA = _PRELUDE + """
local now = clock(ARGV[1])
local live, since = '(' .. num(now), '(' .. num(now - 60)
local in_flight = redis.call('ZCOUNT', KEYS[1], live, '+inf')
local waiting = redis.call('ZCOUNT', KEYS[2], live, '+inf')
local creates = redis.call('ZCOUNT', KEYS[3], since, num(now))
local pending = redis.call('ZCOUNT', KEYS[3], since, '+inf')
local backoff = math.max(0, (tonumber(redis.call('HGET', KEYS[4], 'backoff')) or 0) - now)
local active = in_flight + waiting + pending > 0 or backoff > 0
return {in_flight, waiting, creates, num(backoff), active and 1 or 0}
"""

# KEYS: accounts. ARGV: now, then accounts.
_MARK_LUA = _PRELUDE + """
local now = clock(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
"""

# KEYS: accounts. ARGV: now, idle seconds, then accounts found inactive.
_PRUNE_LUA = _PRELUDE + """
local idle_since = clock(ARGV[1]) - tonumber(ARGV[2])
for i = 3, #ARGV do
  local seen = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  -- Only if not used since: a concurrent use re-marked it and keeps it listed.
  if seen and seen < idle_since then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
"""

_SCRIPTS = {
    "limits": _LIMITS_LUA, "declare": _DECLARE_LUA, "override": _OVERRIDE_LUA,
    "acquire": _ACQUIRE_LUA, "renew": _RENEW_LUA, "release": _RELEASE_LUA, "leave": _LEAVE_LUA,
    "reserve": _RESERVE_LUA, "backoff": _BACKOFF_LUA, "accepted": _ACCEPTED_LUA,
    "backoff_left": _BACKOFF_LEFT_LUA, "stats": _STATS_LUA, "mark": _MARK_LUA,
    "prune": _PRUNE_LUA,
}


def _unavailable_reason(exc: RedisError) -> str | None:
    """A short reason if ``exc`` means Redis cannot serve us now; None for a real error."""
    for kind, reason in _UNAVAILABLE:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, ResponseError):
        return _TRANSIENT_PREFIXES.get(str(exc).split(" ", 1)[0])
    return None


def _fail_closed(method: Callable[P, R]) -> Callable[P, R]:
    """Turn Redis being unreachable into StoreUnavailable, naming the operation, never the URL."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except RedisError as exc:
            reason = _unavailable_reason(exc)
            if reason is None:
                raise
            raise StoreUnavailable("redis", f"{method.__name__}: {reason}") from exc

    return guarded


def _connect(url: str, socket_timeout: float) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            health_check_interval=30, retry=_RETRY, decode_responses=True)
    except ValueError:
        # Its message may quote parts of the URL.
        raise ValueError("the Redis URL is not a valid redis:// or rediss:// URL") from None


def _check_account(account: str) -> None:
    # "|" splits lease ids; braces would break the account's hash tag.
    if not account or any(char in account for char in "|{}"):
        raise ValueError("an account must be a non-empty string without '|', '{' or '}'")


def _lease_account(lease_id: str) -> str | None:
    account, sep, _ = lease_id.partition("|")
    return account if sep and account else None


def _declaration(limits: Limits) -> str:
    return " ".join(str(getattr(limits, name)) for name in _LIMIT_RANGES)


def _declared_ranges(values: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(min, max) per field over declarations "mc rpm burst ppm expires"."""
    ranges: dict[str, tuple[int, int]] = {}
    for value in values:
        for name, field in zip(_LIMIT_RANGES, value.split()[:len(_LIMIT_RANGES)], strict=True):
            low, high = ranges.get(name, (int(field), int(field)))
            ranges[name] = (min(low, int(field)), max(high, int(field)))
    return ranges


def _overrides(flat: Sequence[str]) -> dict[str, tuple[int, float]]:
    overrides: dict[str, tuple[int, float]] = {}
    for name, stored in zip(flat[::2], flat[1::2], strict=True):
        if name in _LIMIT_RANGES:
            value, set_at = stored.split()
            overrides[name] = (int(value), float(set_at))
    return overrides


class RedisLimitStore:
    """LimitStore on one Redis (or Cluster-compatible key layout) shared by every host.

    ``default_limits`` are what this process's environment asks for; they bind others once
    declared (the manager declares while open). ``clock`` is for tests: None uses Redis's clock.
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
    ) -> None:
        default_limits.validate()
        if not (math.isfinite(lease_ttl) and lease_ttl > 0):
            raise ValueError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and contain no '{' or '}'")
        self._redis = _connect(url, socket_timeout)
        self._defaults = default_limits
        self._ttl = float(lease_ttl)
        self._clock = clock
        self._prefix = key_prefix
        self._own: tuple[str, int] | None = None  # see SQLiteLimitStore._own
        # Tickets this process enqueued: renew and leave_queue get only the ticket.
        self._tickets: dict[str, str] = {}
        self._tickets_lock = threading.Lock()
        self._scripts = {name: self._redis.register_script(source)
                         for name, source in _SCRIPTS.items()}
        self._listener: ReleaseListener | None = None

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    # -- keys, clock -------------------------------------------------------------

    def _shared(self, name: str) -> str:
        return f"{self._prefix}:{{limits}}:{name}"

    def _key(self, account: str, name: str) -> str:
        return f"{self._prefix}:{{{account}}}:{name}"

    def _keys(self, account: str, *names: str) -> list[str]:
        return [self._key(account, name) for name in names]

    def _now(self) -> str:
        """The scripts' clock argument: '' means Redis's own TIME."""
        return "" if self._clock is None else repr(float(self._clock()))

    def _run(self, script: str, *, keys: list[str], args: list[Any]) -> Any:
        """One Lua script: EVALSHA, loading it again if the server lost it (a restart)."""
        return self._scripts[script](keys=keys, args=args)

    def _keep(self) -> float:
        return _TOMBSTONE_TTLS * self._ttl

    # -- health ----------------------------------------------------------------

    @_fail_closed
    def check(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        self._redis.ping()

    def close(self) -> None:
        """Stop listening for releases; release the connection pool."""
        if self._listener is not None:
            self._listener.close()
        self._redis.close()

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever any process releases a slot or leaves a queue."""
        if self._listener is None or not self._listener.alive_here():
            # Threads do not survive fork: a child listens on its own.
            self._listener = ReleaseListener(self._redis, self._channel())
        self._listener.add(callback)

    def _channel(self) -> str:
        return f"{self._prefix}:releases"

    # -- limits: overrides and declarations ------------------------------------------

    def _own_instance(self) -> str | None:
        if self._own is None or self._own[1] != os.getpid():
            return None
        return self._own[0]

    def _sources(self, mark: str | None = None) -> dict[str, LimitSource]:
        """The effective limits; ``mark`` records that account as active (stats(None))."""
        own = self._own_instance()
        keys = [self._shared(name) for name in ("overrides", "declarations", "accounts")]
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
        self.set_overrides({name: getattr(limits, name) for name in _LIMIT_RANGES})

    @_fail_closed
    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        for name, value in changes.items():  # all checked before anything is stored
            check_known_limit(name)
            if value is not None:
                validate_limit(name, value)
        pairs = [part for name, value in changes.items()
                 for part in (name, "" if value is None else str(value))]
        if pairs:
            self._run("override", keys=[self._shared("overrides")], args=[self._now(), *pairs])

    @_fail_closed
    def clear_overrides(self) -> None:
        self._redis.delete(self._shared("overrides"))

    @_fail_closed
    def declare(self, instance: str) -> None:
        self._own = (instance, os.getpid())  # counts locally even if this write fails
        self._run("declare", keys=[self._shared("declarations")],
                  args=[self._now(), self._ttl, instance, _declaration(self._defaults)])

    @_fail_closed
    def withdraw(self, instance: str) -> None:
        if self._own is not None and self._own[0] == instance:
            self._own = None
        self._redis.hdel(self._shared("declarations"), instance)

    # -- leases and tickets ------------------------------------------------------

    def try_acquire(self, account: str, ticket: str) -> str | None:
        return self.try_acquire_ranked(account, ticket)[0]

    @_fail_closed
    def try_acquire_ranked(self, account: str, ticket: str) -> tuple[str | None, int]:
        _check_account(account)
        with self._tickets_lock:  # before the call: a lost answer must still be left
            self._tickets[ticket] = account
        limit = self._limits(mark=account).max_concurrent
        lease = self._run(
            "acquire", keys=self._keys(account, "leases", "released", "queue", "tickets", "seq"),
            args=[self._now(), self._ttl, limit, ticket, f"{account}|{ticket}", self._keep()])
        if isinstance(lease, int):
            return None, lease
        with self._tickets_lock:
            self._tickets.pop(ticket, None)
        return str(lease), 0

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
        self._run("mark", keys=[self._shared("accounts")], args=[self._now(), *work])
        for account, (leases, tickets) in work.items():
            self._run("renew", keys=self._keys(account, "leases", "released", "tickets"),
                      args=[self._now(), self._ttl, len(leases), *leases, *tickets])

    @_fail_closed
    def release(self, lease_id: str) -> None:
        account = _lease_account(lease_id)
        if account is None:
            return  # not one of ours: nothing holds it
        self._run("release", keys=self._keys(account, "leases", "released"),
                  args=[self._now(), lease_id, self._keep(), self._channel()])

    @_fail_closed
    def leave_queue(self, ticket: str) -> None:
        with self._tickets_lock:
            account = self._tickets.pop(ticket, None)
        if account is None:
            return  # never enqueued here, or already granted
        self._run("leave", keys=self._keys(account, "queue", "tickets", "leases", "released"),
                  args=[self._now(), ticket, f"{account}|{ticket}", self._keep(),
                        self._channel()])

    # -- rate (GCRA) and back-off --------------------------------------------------

    @_fail_closed
    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        if kind not in ("create", "poll"):
            raise ValueError(f"kind must be 'create' or 'poll', got {kind!r}")
        _check_account(account)
        limits = self._limits(mark=account)
        op = uuid.uuid4().hex
        wait = self._run(
            "reserve", keys=self._keys(account, "rate", "creates", f"op:{op}"),
            args=[self._now(), kind, limits.requests_per_minute, limits.burst,
                  limits.polls_per_minute, repr(min(max_wait, 1e300)), op, _OP_TTL_MS])
        return float(wait)

    @_fail_closed
    def back_off(self, account: str, seconds: float) -> None:
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"back-off seconds must be >= 0, got {seconds!r}")
        _check_account(account)
        limit = self._limits(mark=account).requests_per_minute
        self._run("backoff", keys=self._keys(account, "rate"),
                  args=[self._now(), min(seconds, _MAX_BACKOFF_S), limit, _EPISODE_S, _RATE_CUT])

    @_fail_closed
    def create_accepted(self, account: str) -> None:
        _check_account(account)
        limit = self._limits(mark=account).requests_per_minute
        op = uuid.uuid4().hex
        self._run("accepted", keys=self._keys(account, "rate", f"op:{op}"),
                  args=[limit, _RATE_STEP, _MIN_RATE_STEP, _OP_TTL_MS])

    @_fail_closed
    def last_cut(self, account: str) -> float:
        cut_at = self._redis.hget(self._key(account, "rate"), "cut_at")
        return float(cut_at) if cut_at is not None else 0.0

    @_fail_closed
    def backoff_remaining(self, account: str) -> float:
        left = self._run("backoff_left", keys=self._keys(account, "rate"), args=[self._now()])
        return float(left)

    # -- observability ---------------------------------------------------------

    @_fail_closed
    def stats(self, account: str | None = None) -> list[AccountStats]:
        if account is not None:
            return [self._account_stats(account)[0]]
        accounts = sorted(str(name) for name in self._redis.zrange(self._shared("accounts"), 0, -1))
        found = [self._account_stats(name) for name in accounts]
        idle = [stats.account for stats, active in found if not active]
        if idle:
            self._run("prune", keys=[self._shared("accounts")],
                      args=[self._now(), max(self._ttl, _WINDOW_S), *idle])
        return [stats for stats, active in found if active]

    def _account_stats(self, account: str) -> tuple[AccountStats, bool]:
        in_flight, waiting, creates, backoff, active = self._run(
            "stats", keys=self._keys(account, "leases", "tickets", "creates", "rate"),
            args=[self._now()])
        stats = AccountStats(account, int(in_flight), int(waiting), int(creates), float(backoff))
        return stats, bool(int(active))


class ReleaseListener:
    """One thread per process on the releases channel, so the next waiter in line, whatever
    process it is in, tries at once instead of at its next poll (polls stay the fallback)."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._callbacks: list[Callable[[], None]] = []
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="redis-releases", daemon=True)
        self._thread.start()

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def alive_here(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._relay()
            except (RedisError, OSError, ValueError):
                # Down, or the pool closed under us: waiters poll meanwhile; the store says why.
                self._stop.wait(_LISTEN_RETRY_S)

    def _relay(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            while not self._stop.is_set():
                if pubsub.get_message(timeout=_LISTEN_TIMEOUT_S) is not None:
                    for callback in list(self._callbacks):
                        callback()
        finally:
            with contextlib.suppress(RedisError, OSError, ValueError):
                pubsub.close()
