"""The job store's tables for SQLite and PostgreSQL, and the engines that hold them; a change here
ships with a new migration revision."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import (
    URL,
    BigInteger,
    Column,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    exc,
    make_url,
    text,
)
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from replicate_generation.errors import StoreUnavailable
from replicate_generation.sqlite_db import WRITE_PATIENCE_S, sqlite_engine

Backend = Literal["sqlite", "postgresql"]

# Per process, writes and reads: 4 gunicorn workers stay under PostgreSQL's default 100.
PG_POOL_SIZE = 12
PG_POOL_OVERFLOW = 2
# Reads have their own pool: a GET never waits behind writers queued on a busy job's row.
PG_READ_POOL_SIZE = 4
PG_READ_POOL_OVERFLOW = 4
# No server-side prepared statements: behind PgBouncer in transaction mode each transaction may
# reach another server session, where psycopg's "_pg3_N" would be missing or already there.
PG_CONNECT_ARGS = {"connect_timeout": 5, "prepare_threshold": None}
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "rg_idle_since"
_LOST_SERVER_STATES = ("57P01", "57P02", "57P03", "08")

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("account", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("origin", Text, nullable=False, server_default="service"),
    Column("state", Text, nullable=False),
    Column("request_id", Text, nullable=False),
    Column("item_count", Integer, nullable=False),
    Column("owner", Text),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("cancel_requested_at", Double),
    Column("idempotency_key", Text),
    Column("request_hash", Text),
    Column("webhook_url", Text),
    Column("webhook_private", Integer, nullable=False, server_default=text("0")),
    Column("webhook_state", Text),
    Column("webhook_attempts", Integer, nullable=False, server_default=text("0")),
    Column("webhook_next_at", Double),
    Column("webhook_error", Text),
    # Bumped by every claim: a write carrying an older number comes from a stale owner.
    Column("fence", Integer, nullable=False, server_default=text("0")),
    # The bytes its items and shared values took when stored: what the account's bound counts.
    Column("record_bytes", BigInteger, nullable=False, server_default=text("0")),
    # The issued key that submitted it: such a job is that key's alone to see.
    Column("key_id", Text),
    # Who submitted it, as the ledger names callers: "admin", a key's name, or "user".
    Column("caller", Text),
    # "interactive" (someone waits for it) enters before "batch" work of the same account.
    Column("priority", Text),
    # Wall-clock seconds after which no item of it is created (deadline_seconds); None: no limit.
    Column("start_deadline", Double),
    # Its items by state and their summed cost, kept by each item write: reads never count items.
    *(Column(f"{state}_items", Integer, nullable=False, server_default=text("0"))
      for state in ("queued", "running", "succeeded", "failed", "canceled", "expired")),
    Column("cost_usd", Double, nullable=False, server_default=text("0")),
)
_OPEN = jobs.c.state.in_(["queued", "running"])
Index("jobs_idempotency", jobs.c.account, jobs.c.idempotency_key, unique=True,
      sqlite_where=jobs.c.idempotency_key.is_not(None),
      postgresql_where=jobs.c.idempotency_key.is_not(None))
Index("jobs_by_account", jobs.c.account, jobs.c.created_at.desc(), jobs.c.id.desc())
# The admin's list, newest first, read a page at a time whatever the number of jobs kept.
Index("jobs_by_created", jobs.c.created_at.desc(), jobs.c.id.desc())
# An account's jobs and bytes are summed from the index alone.
Index("jobs_usage", jobs.c.account, jobs.c.record_bytes)
# Retention finds the jobs past it without reading every job.
Index("jobs_finished", jobs.c.finished_at)
Index("jobs_by_key", jobs.c.key_id, jobs.c.created_at.desc(), jobs.c.id.desc(),
      sqlite_where=jobs.c.key_id.is_not(None), postgresql_where=jobs.c.key_id.is_not(None))
Index("jobs_open", jobs.c.state, sqlite_where=_OPEN, postgresql_where=_OPEN)
Index("jobs_webhooks", jobs.c.webhook_next_at,
      sqlite_where=jobs.c.webhook_state == "pending",
      postgresql_where=jobs.c.webhook_state == "pending")

job_items = Table(
    "job_items", metadata,
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("spec", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("prediction_id", Text),
    Column("prediction_model", Text),
    Column("model_used", Text),
    Column("attempts", Text, nullable=False, server_default="[]"),
    Column("files", Text, nullable=False, server_default="[]"),
    Column("error", Text),
    Column("error_type", Text),
    Column("cost_usd", Double),
    Column("placeholder", Integer, nullable=False, server_default=text("0")),
    Column("notes", Text, nullable=False, server_default="[]"),
    Column("queued_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    # The most the item may cost (its fallbacks included), held against a budget while open.
    Column("reserved_usd", Double),
    # The process that claimed it to run (None: unclaimed, or its job's owner before claims).
    Column("runner", Text),
)
# A page of a job's items in one state is an index range, whatever the job's size.
Index("job_items_by_state", job_items.c.job_id, job_items.c.state, job_items.c.idx)
# A process's claimed items, given back when it stops, without reading every item.
Index("job_items_by_runner", job_items.c.runner, sqlite_where=job_items.c.runner.is_not(None),
      postgresql_where=job_items.c.runner.is_not(None))

# Finished jobs and their items by state, kept as jobs finish and go: /metrics reads these rows
# and the open jobs' own counts, never every job.
job_totals = Table(
    "job_totals", metadata,
    Column("kind", Text, primary_key=True),  # "jobs" or "items"
    Column("state", Text, primary_key=True),
    Column("count", BigInteger, nullable=False, server_default=text("0")),
)

job_files = Table(
    "job_files", metadata,
    Column("path", Text, primary_key=True),
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
)
Index("job_files_by_job", job_files.c.job_id)

# Values the items of a job share (a reference image...), once each, by sha256 digest.
job_values = Table(
    "job_values", metadata,
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("digest", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

job_workers = Table(
    "job_workers", metadata,
    Column("id", Text, primary_key=True),
    Column("heartbeat_at", Double, nullable=False),
)

# Keys the admin issues to internal services; the secret is kept only as its SHA-256.
api_keys = Table(
    "api_keys", metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("secret_hash", Text, nullable=False, unique=True),
    Column("prefix", Text, nullable=False),
    # The secret before the last rotation, accepted until previous_until.
    Column("previous_hash", Text, unique=True),
    Column("previous_until", Double),
    Column("budget_usd", Double),
    Column("budget_period", Text),
    Column("max_concurrent", Integer),
    Column("weight", Double, nullable=False, server_default=text("1")),
    Column("models", Text),
    Column("expires_at", Double),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("rotated_at", Double),
    Column("revoked_at", Double),
    # 1: a budgeted key may still run models whose cost is unknown.
    Column("allow_unknown_cost", Integer, nullable=False, server_default=text("0")),
)
_LIVE_KEY = api_keys.c.revoked_at.is_(None)
# A name belongs to one live key: the ledger and the audit log name keys by it.
Index("api_keys_live_name", api_keys.c.name, unique=True,
      sqlite_where=_LIVE_KEY, postgresql_where=_LIVE_KEY)

# What each finished item spent, kept after its job is removed: budgets and /usage read it.
spend_ledger = Table(
    "spend_ledger", metadata,
    Column("job_id", Text, primary_key=True),
    Column("item_idx", Integer, primary_key=True),
    Column("at", Double, nullable=False),
    Column("caller", Text, nullable=False),
    Column("key_id", Text),
    Column("account", Text, nullable=False),
    Column("model", Text),
    Column("prediction_id", Text),
    Column("billed_seconds", Double),
    Column("cost_usd", Double),
)
Index("spend_by_time", spend_ledger.c.at)
Index("spend_by_key", spend_ledger.c.key_id, spend_ledger.c.at,
      sqlite_where=spend_ledger.c.key_id.is_not(None),
      postgresql_where=spend_ledger.c.key_id.is_not(None))

# Who changed what, appended only: keys, limits, admin cancels.
audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text),
    Column("details", Text, nullable=False, server_default="{}"),
)

# What happened to each job, ids in commit order: event streams replay it after a Last-Event-ID.
# Retention deletes a job's events with it; AUTOINCREMENT: SQLite never reuses a deleted id.
job_events = Table(
    "job_events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("key_id", Text),
    Column("at", Double, nullable=False),
    Column("kind", Text, nullable=False),
    Column("data", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("job_events_by_job", job_events.c.job_id, job_events.c.id)
Index("job_events_by_account", job_events.c.account, job_events.c.id)
Index("job_events_by_key", job_events.c.key_id, job_events.c.id,
      sqlite_where=job_events.c.key_id.is_not(None),
      postgresql_where=job_events.c.key_id.is_not(None))

# What readiness writes (on SQLite the probe makes it itself, as the limit store's does).
ready_probe = Table(
    "ready_probe", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("at", Double),
)


# -- engines -----------------------------------------------------------------------------------


def database_url(target: str) -> URL:
    """A file path, `sqlite:///path` or `postgresql://...` (run on psycopg 3)."""
    if "://" not in target:
        return URL.create("sqlite+pysqlite", database=target)
    try:
        url = make_url(target)
    except exc.ArgumentError:
        # The message would repeat the string, password included.
        raise ValueError("not a database URL nor a file path") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        return url.set(drivername="sqlite+pysqlite")
    raise ValueError(f"unsupported database {url.drivername!r}: use sqlite or postgresql")


def open_engine(target: str, *, reads: bool = False) -> Engine:
    """The engine of a database URL or SQLite path; `reads`: PostgreSQL's autocommit read pool."""
    url = database_url(target)
    if url.get_backend_name() == "sqlite":
        engine = sqlite_engine(url.database or "")
    else:
        size, overflow = (PG_READ_POOL_SIZE, PG_READ_POOL_OVERFLOW) if reads else (
            PG_POOL_SIZE, PG_POOL_OVERFLOW)
        # Kept open: an overflow connection costs a new server process per use, more than the query.
        engine = create_engine(
            url, isolation_level="AUTOCOMMIT" if reads else "READ COMMITTED", pool_size=size,
            max_overflow=overflow, pool_timeout=WRITE_PATIENCE_S, connect_args=PG_CONNECT_ARGS)
        _ping_when_idle(engine)
        _shutdown_is_disconnect(engine)
    _ENGINES.add(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Pre-ping only a connection idle for PING_AFTER_IDLE_S: a busy worker's connections are
    in use every few milliseconds, and a ping per transaction was a round trip per write. A
    server lost under a busy connection fails that one statement (StoreUnavailable); the pool
    then replaces every connection older than the failure."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError("the idle connection was lost") from error


def _shutdown_is_disconnect(engine: Engine) -> None:
    """A server shutting down (SQLSTATE 57P01-57P03) or a connection exception (class 08) ends
    the connection: marked so, the pool drops it (and its older ones) and the caller sees
    StoreUnavailable, not a database error (psycopg notices the closed socket only later)."""

    @event.listens_for(engine, "handle_error")
    def _mark_lost(context: ExceptionContext) -> None:
        state = str(getattr(context.original_exception, "sqlstate", None) or "")
        if state.startswith(_LOST_SERVER_STATES):
            context.is_disconnect = True


def backend_of(engine: Engine) -> Backend:
    return "sqlite" if engine.dialect.name == "sqlite" else "postgresql"


# Fork-inherited pools, kept: used, closed or collected they drop locks or the parent's sessions.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_INHERITED: list[Pool] = []


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        _INHERITED.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- PostgreSQL down ---------------------------------------------------------------------------


@contextmanager
def reachable(engine: Engine, *, connecting: bool = False) -> Iterator[None]:
    """Turn a lost or refused PostgreSQL connection into StoreUnavailable (no URL, no password);
    `connecting`: every driver error is a refused connection."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        if backend_of(engine) == "sqlite" or not (connecting or error.connection_invalidated):
            raise
        raise StoreUnavailable("postgresql", short_reason(engine, error)) from None


def short_reason(engine: Engine, error: exc.DBAPIError) -> str:
    """The driver's first line, with the password (were it ever echoed) masked."""
    lines = str(error.orig).strip().splitlines() or [type(error.orig).__name__]
    reason = lines[0][:200]
    password = engine.url.password
    return reason.replace(str(password), "***") if password else reason
