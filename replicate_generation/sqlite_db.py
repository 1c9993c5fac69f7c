"""One SQLite file shared by every process on the host: per-thread connections, WAL, short writes.

Both the limit store and the job store live in the state file; this is the part they share.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Transactions here last microseconds; this only matters under heavy contention, and a writer
# that waits this long means something is wrong.
BUSY_TIMEOUT_S = 10.0
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


class Database:
    """Connections per thread (and per process, so a fork never reuses its parent's)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            # Per-thread connections to ":memory:" would each see a private database.
            raise ValueError("the state store needs a file path shared by all processes")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Connections inherited through fork() must not be used or closed in the child (closing
        # would drop the child's own POSIX locks); keep them referenced instead.
        self._inherited: list[sqlite3.Connection] = []
        enable_wal(self.connection())

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        if conn is not None:
            self._inherited.append(conn)
        # isolation_level=None: transactions are issued explicitly (BEGIN IMMEDIATE / COMMIT).
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        # NORMAL is durable across process crashes in WAL mode; only an OS crash can lose the
        # last commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; IMMEDIATE takes the write lock up front so that
        read-then-write never fails half way with SQLITE_BUSY."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Never leave a transaction open on this thread's connection.
            if conn.in_transaction:
                conn.rollback()
            raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot; in WAL mode readers never wait for writers."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()


def enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent; a no-op once done).

    When several workers open a brand-new file at once, the switch can fail with SQLITE_BUSY
    without consulting the busy handler, so retry briefly. Start-up only; no lock is held.
    """
    give_up = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            row = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _BUSY_CODES:
                raise
            if time.monotonic() > give_up:
                raise
            time.sleep(random.uniform(0.005, 0.05))  # noqa: S311 - jitter only
            continue
        if row is None or str(row[0]).lower() != "wal":
            # Still correct (BEGIN IMMEDIATE serialises writers) but readers may then wait for
            # writers; e.g. network filesystems.
            log.warning("SQLite refused WAL mode (journal_mode=%s)", row)
        return
