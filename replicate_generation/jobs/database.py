"""The job store's connection to its database, shared by every part of the store: short read and
write transactions on SQLite or PostgreSQL, waits for a busy file or a lost server, and the
health checks."""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Select, Table, exc, func, select
from sqlalchemy.dialects import postgresql, sqlite

from replicate_generation.errors import StoreBusy, StoreUnavailable
from replicate_generation.jobs.migrations import upgrade
from replicate_generation.jobs.schema import (
    Backend,
    backend_of,
    open_engine,
    reachable,
    ready_probe,
)
from replicate_generation.sqlite_db import (
    WRITE_PATIENCE_S,
    is_busy,
    probe_file_write,
    sqlite_transaction,
    writes_are_patient,
)

log = logging.getLogger(__name__)

_RECONNECT_PAUSE_MAX_S = 2.0


def lock_for_transaction(conn: Connection, name: str) -> None:
    """Serialise PostgreSQL transactions that check then write under `name` (SQLite's writers
    already take turns); released at commit."""
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(name.encode()).digest()
        conn.execute(select(func.pg_advisory_xact_lock(
            int.from_bytes(digest[:8], "big", signed=True))))


class JobDatabase:
    """The jobs tables' engine on SQLite or PostgreSQL, upgraded to the newest migration on opening.

    A lost PostgreSQL raises StoreUnavailable; the same object works again once it is back.
    """

    def __init__(self, target: str) -> None:
        self.engine = open_engine(target)
        try:
            upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        # SQLite reads share the writers' engine (a connection per thread, WAL readers never wait).
        self._reads = self.engine if self.backend == "sqlite" else open_engine(target, reads=True)

    @property
    def backend(self) -> Backend:
        return backend_of(self.engine)

    @property
    def engines(self) -> tuple[Engine, ...]:
        """The writers' engine, then the readers' where they have their own (PostgreSQL)."""
        return (self.engine,) if self._reads is self.engine else (self.engine, self._reads)

    def close(self) -> None:
        """Close the pooled connections (new ones are opened if used again)."""
        self.engine.dispose()
        self._reads.dispose()

    # -- connections and transactions ------------------------------------------------------

    @contextmanager
    def write(self, *, patient: bool = False) -> Iterator[Connection]:
        """A short write transaction. SQLite: BEGIN IMMEDIATE, busy waits retried up to
        WRITE_PATIENCE_S then StoreBusy. Patient (or inside `patient_writes()`): retried without
        limit, and on PostgreSQL a refused connection is retried too."""
        patience = None if patient or writes_are_patient() else WRITE_PATIENCE_S
        with self._session(patience, write=True) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read (SQLite: one snapshot; PostgreSQL: autocommit, a snapshot per statement). Inside
        `patient_writes()` (an item holding a slot) it waits for PostgreSQL to come back."""
        patience = None if writes_are_patient() else WRITE_PATIENCE_S
        with self._session(patience, write=False) as conn, _busy_is_store_busy():
            yield conn

    def scalar(self, query: Select[Any]) -> Any:
        """One value, in a read transaction of its own."""
        with self.read() as conn:
            return conn.execute(query).scalar()

    def insert(self, table: Table) -> sqlite.Insert | postgresql.Insert:
        """INSERT with the dialect's ON CONFLICT clauses."""
        return sqlite.insert(table) if self.backend == "sqlite" else postgresql.insert(table)

    @contextmanager
    def _session(self, patience: float | None, *, write: bool) -> Iterator[Connection]:
        conn = self._connect(self.engine if write else self._reads, patience)
        with reachable(self.engine), conn:
            if self.backend == "sqlite":
                with sqlite_transaction(conn, immediate=write, patience=patience):
                    yield conn
            elif not write:
                # READ COMMITTED snapshots each statement anyway: no BEGIN and COMMIT round trips.
                yield conn
            else:
                with conn.begin():
                    yield conn

    @staticmethod
    def _connect(engine: Engine, patience: float | None) -> Connection:
        """A pooled connection; a patient caller waits for PostgreSQL to be reachable."""
        tries = 0
        while True:
            try:
                with reachable(engine, connecting=True):
                    return engine.connect()
            except StoreUnavailable:
                if patience is not None:
                    raise
            except exc.TimeoutError as error:
                if patience is not None:
                    raise StoreBusy("every connection to the job store is in use") from error
            tries += 1
            if tries % 20 == 0:
                log.warning("the job store has been unreachable for %d tries", tries)
            pause = min(_RECONNECT_PAUSE_MAX_S, 0.01 * 2**min(tries, 16))
            time.sleep(random.uniform(0, pause))  # noqa: S311 - jitter only

    # -- health ----------------------------------------------------------------------------

    def check(self) -> None:
        """A cheap round trip (SELECT 1); StoreUnavailable when the database cannot answer."""
        try:
            with self.read() as conn:
                conn.execute(select(1))
        except (sqlite3.Error, exc.DBAPIError) as error:
            raise StoreUnavailable(self.backend, f"{type(error).__name__}") from error

    def probe_write(self) -> None:
        """Raise unless the store can be written afresh (readiness): SQLite opens the file anew."""
        database = self.engine.url.database
        if self.backend == "sqlite" and database:
            probe_file_write(database)
            return
        with self.write() as conn:
            stmt = postgresql.insert(ready_probe).values(id=1, at=time.time())
            conn.execute(stmt.on_conflict_do_update(index_elements=[ready_probe.c.id],
                                                    set_={"at": stmt.excluded.at}))


@contextmanager
def _busy_is_store_busy() -> Iterator[None]:
    try:
        yield
    except exc.OperationalError as error:
        # Rare in WAL (recovery, a checkpoint); the caller may try again.
        if isinstance(error.orig, sqlite3.OperationalError) and is_busy(error.orig):
            raise StoreBusy("the state file is busy; try again shortly") from error
        raise
