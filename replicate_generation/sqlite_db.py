"""One SQLite file shared by every process on the host (the limit and job stores): per-thread
connections, WAL, short writes queued per process, and pages freed by deletes given back to the
disk a bounded batch at a time (incremental auto-vacuum)."""

from __future__ import annotations

import functools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.request import pathname2url

from sqlalchemy import URL, Connection, Engine, create_engine, event

from replicate_generation.errors import StoreBusy

log = logging.getLogger(__name__)

# One wait inside SQLite's busy handler; longer locks are retried above it, with jitter.
BUSY_TIMEOUT_S = 0.5
# How long a caller that can be answered (an HTTP request) waits for the write lock in all.
WRITE_PATIENCE_S = 5.0
# The WAL switch at start-up waits longer: nobody is answered until it is done.
STARTUP_PATIENCE_S = 30.0
RETRY_PAUSE_MAX_S = 0.25
STORE_BUSY_RETRY_AFTER_S = 2
_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
# The WAL file is cut back to this after a checkpoint (else it keeps its largest size for good).
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# Each connection's page cache, in KiB when negative: a process has one connection per thread,
# so SQLite's 2 MiB default grew every worker by tens of MiB as the file grew; the OS caches
# the file once for all of them.
CACHE_SIZE = -256
# Pages (4 KiB) one reclaim step frees: a write lock held for tens of milliseconds.
RECLAIM_PAGES = 2048
# A file from before incremental auto-vacuum is rebuilt (VACUUM) only up to this size.
CONVERT_MAX_BYTES = 64 * 1024 * 1024
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


_patience = threading.local()
_write_locks: dict[str, threading.RLock] = {}
_write_locks_guard = threading.Lock()


def _forget_write_locks() -> None:
    # A lock held by a parent's thread at fork() would never be released in the child.
    global _write_locks_guard
    _write_locks.clear()
    _write_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_write_locks)


@functools.lru_cache(maxsize=64)
def _canonical(path: str) -> str:
    # Resolved once per path, not on every write (realpath stats each component).
    return os.path.realpath(path)


@contextmanager
def process_write_lock(path: str, patience: float | None) -> Iterator[None]:
    """Writers of one process queue on a Python lock and are woken at once; SQLite's busy
    handler (sleeps of 1 to 100 ms) is then met only between processes."""
    key = _canonical(path)
    with _write_locks_guard:
        lock = _write_locks.setdefault(key, threading.RLock())
    if not lock.acquire(timeout=-1 if patience is None else patience):
        raise StoreBusy("the state file is busy; try again shortly")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def patient_writes() -> Iterator[None]:
    """Inside, this thread's writes are retried until they succeed, never StoreBusy: for work
    no caller waits on and that must not be lost (an item's run, a prediction id)."""
    previous = getattr(_patience, "on", False)
    _patience.on = True
    try:
        yield
    finally:
        _patience.on = previous


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (extended codes included)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


def retry_while_busy(step: Callable[[], object], *, patience: float | None) -> None:
    """Run `step` until it is not refused as busy; StoreBusy after `patience` seconds (None:
    never give up). Full jitter keeps waiting writers from retrying in lockstep."""
    give_up = None if patience is None else time.monotonic() + patience
    tries = 0
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            tries += 1
            if give_up is not None and time.monotonic() >= give_up:
                raise StoreBusy("the state file is busy; try again shortly") from exc
            if tries % 40 == 0:
                log.warning("the state file has been locked by another writer for %d tries",
                            tries)
            # The exponent is capped: 2**tries past ~1024 overflows a float (a long wait).
            pause = min(RETRY_PAUSE_MAX_S, 0.005 * 2**min(tries, 16))
            time.sleep(random.uniform(0, pause))  # noqa: S311


class Database:
    """Connections per thread (and per process, so a fork never reuses its parent's)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            # Per-thread connections to ":memory:" would each see a private database.
            raise ValueError("the state store needs a file path shared by all processes")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Fork-inherited connections, kept: closing them in the child would drop its POSIX locks.
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
        # In WAL mode NORMAL survives process crashes; only an OS crash can lose the last commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA cache_size = {CACHE_SIZE}")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    @contextmanager
    def write(self, *, patient: bool = False) -> Iterator[sqlite3.Connection]:
        """A short write transaction; IMMEDIATE locks up front, so read-then-write never gets BUSY.

        Waits retry WRITE_PATIENCE_S, then StoreBusy; forever if `patient` or in `patient_writes()`.
        """
        conn = self.connection()
        patience = None if patient or getattr(_patience, "on", False) else WRITE_PATIENCE_S
        with process_write_lock(self.path, patience):
            retry_while_busy(lambda: conn.execute("BEGIN IMMEDIATE"), patience=patience)
            try:
                yield conn
                retry_while_busy(lambda: conn.execute("COMMIT"), patience=patience)
            except BaseException:
                # Never leave a transaction open on this thread's connection.
                if conn.in_transaction:
                    conn.rollback()
                raise

    def probe_write(self, timeout: float = 2.0) -> None:
        """Open the path anew (a replaced or unwritable file shows only there) and write;
        mode=rw: a file that has gone is an error, never silently created again."""
        probe_file_write(self.path, timeout)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot; in WAL mode readers never wait for writers."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            # Rare in WAL (recovery, a checkpoint); the caller may try again.
            if is_busy(exc):
                raise StoreBusy("the state file is busy; try again shortly") from exc
            raise
        finally:
            if conn.in_transaction:
                conn.rollback()


def enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent; a no-op once done); start-up only, holding no lock.
    A new file is made with incremental auto-vacuum, so purged space can go back to the disk.

    Retried briefly: workers opening a new file at once get SQLITE_BUSY past the busy handler.
    """
    give_up = time.monotonic() + STARTUP_PATIENCE_S
    while True:
        try:
            # Only a file with no table yet takes it; an older file is converted by reclaim_space.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            row = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _BUSY_CODES:
                raise
            if time.monotonic() > give_up:
                raise
            time.sleep(random.uniform(0.005, 0.05))  # noqa: S311 - jitter only
            continue
        if row is None or str(row[0]).lower() != "wal":
            # Still correct (BEGIN IMMEDIATE serialises writers), but readers may wait (e.g. NFS).
            log.warning("SQLite refused WAL mode (journal_mode=%s)", row)
        return


# -- the same rules for SQLAlchemy (the job store) ----------------------------------------------


def writes_are_patient() -> bool:
    """Whether this thread is inside `patient_writes()`."""
    return bool(getattr(_patience, "on", False))


def sqlite_engine(path: str) -> Engine:
    """A pooled engine on the state file: WAL, synchronous NORMAL, the short busy timeout and
    transactions issued explicitly (see `sqlite_transaction`)."""
    if path in ("", ":memory:"):
        # Pooled connections to ":memory:" would each see a private database.
        raise ValueError("the state store needs a file path shared by all processes")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    url = URL.create("sqlite+pysqlite", database=path)
    # Unbounded overflow: a thread never waits for a connection, SQLite's lock is what serialises.
    engine = create_engine(url, pool_size=16, max_overflow=-1,
                           connect_args={"timeout": BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _on_connect)
    with engine.connect() as conn:
        enable_wal(driver_connection(conn))
    return engine


def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # isolation_level=None: the driver never opens transactions itself; BEGIN is explicit.
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA synchronous = NORMAL")
    dbapi_connection.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    dbapi_connection.execute(f"PRAGMA cache_size = {CACHE_SIZE}")


def driver_connection(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)  # noqa: S101 - sqlite_engine made it
    return raw


@contextmanager
def sqlite_transaction(conn: Connection, *, immediate: bool,
                       patience: float | None) -> Iterator[None]:
    """BEGIN [IMMEDIATE] ... COMMIT on a SQLAlchemy connection, busy waits retried as
    `Database.write` retries them; a read (not immediate) is rolled back at the end."""
    raw = driver_connection(conn)
    path = conn.engine.url.database or ""
    with process_write_lock(path, patience) if immediate else nullcontext():
        retry_while_busy(lambda: raw.execute("BEGIN IMMEDIATE" if immediate else "BEGIN"),
                         patience=patience)
        try:
            yield
            if immediate:
                retry_while_busy(lambda: raw.execute("COMMIT"), patience=patience)
        finally:
            # Never leave a transaction open on a pooled connection.
            if raw.in_transaction:
                raw.rollback()


def probe_file_write(path: str, timeout: float = 2.0) -> None:
    """Open the path anew (a replaced or unwritable file shows only there) and write;
    mode=rw: a file that has gone is an error, never silently created again."""
    uri = "file:" + pathname2url(os.path.abspath(path)) + "?mode=rw"
    conn = sqlite3.connect(uri, timeout=timeout, isolation_level=None, uri=True)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS ready_probe (id INTEGER PRIMARY KEY, at REAL)")
        conn.execute("INSERT OR REPLACE INTO ready_probe VALUES (1, ?)", (time.time(),))
        conn.execute("COMMIT")
    finally:
        conn.close()


# -- space given back to the disk -----------------------------------------------------------------


def reclaim_space(path: str, *, budget: float = 1.0) -> int:
    """Give the pages deletes freed back to the disk, RECLAIM_PAGES per short write, for at most
    `budget` seconds; return the pages freed (0 on any failure: only space is at stake). A file
    made before incremental auto-vacuum is rebuilt once if small (VACUUM), else left as it is
    with a warning saying how to convert it."""
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        return _reclaim(conn, path, budget)
    except (sqlite3.Error, StoreBusy) as exc:
        # Only space is at stake: the next pass tries again.
        log.warning("could not give the state file's free pages back: %s", exc)
        return 0
    finally:
        conn.close()


def _reclaim(conn: sqlite3.Connection, path: str, budget: float) -> int:
    free = _pragma(conn, "freelist_count")
    if not free:
        return 0
    if _pragma(conn, "auto_vacuum") != INCREMENTAL:
        return _convert(conn, path, free)
    give_up = time.monotonic() + budget
    left = free
    while left and time.monotonic() < give_up:
        _write_script(conn, path, f"PRAGMA incremental_vacuum({RECLAIM_PAGES});")
        left = _pragma(conn, "freelist_count")
    # The file shrinks when the WAL is folded back in; PASSIVE never waits for readers.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return free - left


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute(f"PRAGMA {name}").fetchone()
    return int(row[0]) if row else 0


def _write_script(conn: sqlite3.Connection, path: str, body: str) -> None:
    """One write transaction around `body`, queued like every writer of this process."""

    def step() -> None:
        try:
            # executescript: Python's execute steps a multi-row PRAGMA only once.
            conn.executescript(f"BEGIN IMMEDIATE; {body} COMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.rollback()
            raise

    with process_write_lock(path, WRITE_PATIENCE_S):
        retry_while_busy(step, patience=WRITE_PATIENCE_S)


_warned_unconverted: set[str] = set()


def _convert(conn: sqlite3.Connection, path: str, free: int) -> int:
    """Rebuild a small file with incremental auto-vacuum (writers wait a moment); warn once
    about a large one, which is better converted while the service is stopped."""
    if os.path.getsize(path) > CONVERT_MAX_BYTES:
        if path not in _warned_unconverted:
            _warned_unconverted.add(path)
            log.warning("the state file %s predates incremental auto-vacuum and keeps space its "
                        "deletes freed; while the service is stopped, run: sqlite3 <file> "
                        "'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;'", path)
        return 0
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    with process_write_lock(path, WRITE_PATIENCE_S):
        retry_while_busy(lambda: conn.execute("VACUUM"), patience=WRITE_PATIENCE_S)
    log.info("the state file %s now gives freed space back to the disk", path)
    return free
