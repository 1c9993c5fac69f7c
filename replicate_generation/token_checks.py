"""Is a user's Replicate token real? Replicate is asked (`GET /v1/account`) before anything is
stored for the token or a console session opens, and its word is kept by token hash in the shared
store (the state file, or Redis with REDIS_URL): minutes for a valid token, about a minute for a
refused one. Every worker and replica reads the same verdict, so Replicate hears of a token once
per period, not once per request; a create answered 401 turns the verdict to refused for all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from replicate_generation.clients import GuardedTransport, account_key, retry_after_of
from replicate_generation.errors import TokenRejected, TokenUnverified
from replicate_generation.settings import Settings
from replicate_generation.sqlite_db import Database

log = logging.getLogger(__name__)

# One question to Replicate; the caller's request waits for it.
ASK_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
ASK_CONNECTIONS = 16
# Another process already asking about the token is waited for this long, then we ask too.
CLAIM_SECONDS = 15.0
_WAIT_STEP_S = 0.05
# Retry-After when Replicate could not answer and did not say when to come back.
UNVERIFIED_RETRY_AFTER_S = 5.0

OK, REFUSED, PENDING = "ok", "refused", "pending"


@dataclass(frozen=True)
class Verdict:
    """Replicate's word on a token (or "pending": a process is asking now), until a wall time."""

    state: str
    until: float


class VerdictStore(Protocol):
    """Where verdicts are shared; keys are account keys (a hash of the token), never tokens."""

    def read(self, account: str, now: float) -> Verdict | None: ...

    def write(self, account: str, verdict: Verdict, now: float) -> None: ...

    def claim(self, account: str, now: float, until: float) -> bool:
        """Mark the account "pending" unless any verdict stands; True if this caller asks."""
        ...

    def release(self, account: str) -> None:
        """Drop a "pending" mark whose ask failed, so the next caller asks at once."""
        ...

    def close(self) -> None: ...


class TokenChecks:
    """`check(token)` before anything is stored for a user's token; `refuse(account)` when
    Replicate answers 401 to the account's work. `clock` is wall time (shared across hosts)."""

    def __init__(self, base_url: str, store: VerdictStore, *, verified_seconds: float,
                 refused_seconds: float, clock: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._store = store
        self._verified = verified_seconds
        self._refused = refused_seconds
        self._clock = clock
        transport = transport or GuardedTransport(ASK_TIMEOUT, ASK_CONNECTIONS)
        self._http = httpx.Client(base_url=base_url, transport=transport)

    def check(self, token: str) -> None:
        """Return if Replicate accepts the token; TokenRejected while its last word was a
        refusal; TokenUnverified if it could not be asked (nothing is decided then)."""
        account = account_key(token)
        verdict = self._settled(account)
        if verdict is None:
            verdict = self._ask_once(token, account)
        if verdict.state == REFUSED:
            raise TokenRejected(max(1.0, verdict.until - self._clock()))

    def refuse(self, account: str) -> None:
        """Replicate answered 401 to this account's work: refused everywhere for a while."""
        now = self._clock()
        self._store.write(account, Verdict(REFUSED, now + self._refused), now)

    def close(self) -> None:
        self._http.close()
        self._store.close()

    def _settled(self, account: str) -> Verdict | None:
        """The standing verdict, once any other process's ask ended; None: ours to ask."""
        give_up = time.monotonic() + CLAIM_SECONDS
        while True:
            now = self._clock()
            verdict = self._store.read(account, now)
            if verdict is not None and verdict.state != PENDING:
                return verdict
            if verdict is None and self._store.claim(account, now, now + CLAIM_SECONDS):
                return None
            if time.monotonic() >= give_up:
                return None  # the asker went away without an answer
            time.sleep(_WAIT_STEP_S)

    def _ask_once(self, token: str, account: str) -> Verdict:
        try:
            accepted = self._ask(token)
        except TokenUnverified:
            self._store.release(account)
            raise
        now = self._clock()
        verdict = Verdict(OK, now + self._verified) if accepted else \
            Verdict(REFUSED, now + self._refused)
        self._store.write(account, verdict, now)
        if not accepted:
            log.info("replicate refused the token of account=%s when it was checked", account)
        return verdict

    def _ask(self, token: str) -> bool:
        try:
            response = self._http.get("/v1/account",
                                      headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            log.warning("could not check a token with replicate: %s", type(exc).__name__)
            raise TokenUnverified(UNVERIFIED_RETRY_AFTER_S) from None
        if response.status_code == 200:
            return True
        if response.status_code in (401, 403):
            return False
        log.warning("replicate answered %d to a token check", response.status_code)
        wait = retry_after_of(response) or UNVERIFIED_RETRY_AFTER_S
        raise TokenUnverified(min(max(wait, 1.0), 60.0))


# -- the shared stores -------------------------------------------------------------------------

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS token_verdicts (account TEXT PRIMARY KEY, state TEXT NOT NULL, "
    "until REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS token_verdicts_until ON token_verdicts(until)",
)


class SQLiteVerdicts:
    """Verdicts in the host's state file; expired rows go with the next write."""

    def __init__(self, path: str) -> None:
        self._db = Database(path)
        with self._db.write() as conn:
            for statement in _SQLITE_SCHEMA:
                conn.execute(statement)

    def read(self, account: str, now: float) -> Verdict | None:
        with self._db.read() as conn:
            row = conn.execute("SELECT state, until FROM token_verdicts WHERE account = ?",
                               (account,)).fetchone()
        return Verdict(str(row[0]), float(row[1])) if row and row[1] > now else None

    def write(self, account: str, verdict: Verdict, now: float) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM token_verdicts WHERE until <= ?", (now,))
            conn.execute("INSERT OR REPLACE INTO token_verdicts VALUES (?, ?, ?)",
                         (account, verdict.state, verdict.until))

    def claim(self, account: str, now: float, until: float) -> bool:
        with self._db.write() as conn:
            row = conn.execute("SELECT until FROM token_verdicts WHERE account = ?",
                               (account,)).fetchone()
            if row is not None and row[0] > now:
                return False
            conn.execute("INSERT OR REPLACE INTO token_verdicts VALUES (?, ?, ?)",
                         (account, PENDING, until))
            return True

    def release(self, account: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM token_verdicts WHERE account = ? AND state = ?",
                         (account, PENDING))

    def close(self) -> None:
        """Nothing to close: the connections are per thread and end with it."""


class RedisVerdicts:
    """Verdicts in Redis, one key per account that expires with its verdict (Cluster-safe)."""

    def __init__(self, url: str, *, cluster: bool, prefix: str) -> None:
        # Only deployments with REDIS_URL load the Redis client.
        from replicate_generation.limits.redis_client import RedisConnection  # noqa: PLC0415

        self._connection = RedisConnection(url, cluster=cluster, socket_timeout=5.0, scripts={})
        self._prefix = prefix

    def _key(self, account: str) -> str:
        return f"{self._prefix}:token-verdict:{account}"

    def read(self, account: str, now: float) -> Verdict | None:
        value = _guarded("read", lambda: self._connection.client().get(self._key(account)))
        if not isinstance(value, str) or " " not in value:
            return None
        state, until = value.split(" ", 1)
        return Verdict(state, float(until)) if float(until) > now else None

    def write(self, account: str, verdict: Verdict, now: float) -> None:
        _guarded("write", lambda: self._connection.client().set(
            self._key(account), f"{verdict.state} {verdict.until!r}",
            px=_millis(verdict.until - now)))

    def claim(self, account: str, now: float, until: float) -> bool:
        return bool(_guarded("claim", lambda: self._connection.client().set(
            self._key(account), f"{PENDING} {until!r}", px=_millis(until - now), nx=True)))

    def release(self, account: str) -> None:
        key = self._key(account)
        value = _guarded("release", lambda: self._connection.client().get(key))
        if isinstance(value, str) and value.startswith(PENDING):
            _guarded("release", lambda: self._connection.client().delete(key))

    def close(self) -> None:
        self._connection.close()


def _millis(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _guarded(what: str, step: Callable[[], object]) -> object:
    """One Redis command; an unreachable Redis is StoreUnavailable (the request fails closed)."""
    from replicate_generation.limits.redis_client import fail_closed  # noqa: PLC0415

    def token_verdict() -> object:
        return step()

    token_verdict.__name__ = f"token verdict {what}"  # what the 503 names
    return fail_closed(token_verdict)()


def open_token_checks(settings: Settings) -> TokenChecks:
    """Redis when REDIS_URL is set (every replica), else the host's state file."""
    store: VerdictStore
    if settings.redis_url:
        store = RedisVerdicts(settings.redis_url, cluster=settings.redis_cluster,
                              prefix=settings.redis_key_prefix)
    else:
        store = SQLiteVerdicts(str(settings.state_file))
    return TokenChecks(settings.replicate_base_url, store,
                       verified_seconds=settings.token_verified_seconds,
                       refused_seconds=settings.token_refused_seconds)
