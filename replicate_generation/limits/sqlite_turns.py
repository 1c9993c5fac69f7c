"""The SQLite limit store's waiting line: each account's tickets in order of band (interactive
first), then start-time fair queueing among callers (a caller's next ticket starts where its last
one finished, or at the account's virtual time if it was idle; a heavier weight finishes sooner),
then arrival."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from replicate_generation.limits.base import Turn

SCHEMA = (
    # Each caller's virtual finish per account; rows at or behind the account's time are dropped.
    """CREATE TABLE IF NOT EXISTS cm_fair (
        account TEXT NOT NULL, caller TEXT NOT NULL, finish REAL NOT NULL,
        PRIMARY KEY (account, caller)) WITHOUT ROWID""",
    # The start tag of the last ticket granted, per account.
    """CREATE TABLE IF NOT EXISTS cm_vtime (
        account TEXT PRIMARY KEY, v REAL NOT NULL) WITHOUT ROWID""",
)
# Added to an older state file's cm_tickets; its waiting tickets count as interactive, at tag 0.
TICKET_COLUMNS = (("band", "INTEGER NOT NULL DEFAULT 0"), ("tag", "REAL NOT NULL DEFAULT 0"))
ORDER_INDEX = "CREATE INDEX IF NOT EXISTS cm_tickets_order ON cm_tickets (account, band, tag, seq)"


class Place(NamedTuple):
    band: int
    tag: float
    seq: int


def create(conn: sqlite3.Connection) -> None:
    """The tables, and the ordering columns on a state file made before them."""
    for statement in SCHEMA:
        conn.execute(statement)
    have = {row[1] for row in conn.execute("PRAGMA table_info(cm_tickets)")}
    for name, kind in TICKET_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE cm_tickets ADD COLUMN {name} {kind}")
    conn.execute(ORDER_INDEX)


def place(conn: sqlite3.Connection, account: str, ticket: str, turn: Turn, expires: float) -> Place:
    """Refresh the ticket's expiry, or enqueue it where its turn puts it (new, or purged)."""
    row = conn.execute("SELECT band, tag, seq FROM cm_tickets WHERE ticket = ?",
                       (ticket,)).fetchone()
    if row is not None:
        conn.execute("UPDATE cm_tickets SET expires = ? WHERE seq = ?", (expires, row[2]))
        return Place(int(row[0]), float(row[1]), int(row[2]))
    start = max(_vtime(conn, account), _finish(conn, account, turn.caller))
    conn.execute("INSERT INTO cm_fair (account, caller, finish) VALUES (?, ?, ?) ON CONFLICT"
                 " (account, caller) DO UPDATE SET finish = excluded.finish",
                 (account, turn.caller, start + turn.step))
    cursor = conn.execute(
        "INSERT INTO cm_tickets (ticket, account, expires, band, tag) VALUES (?, ?, ?, ?, ?)",
        (ticket, account, expires, turn.band, start))
    if cursor.lastrowid is None:  # pragma: no cover - sqlite always sets it
        raise RuntimeError("SQLite returned no rowid for a new ticket")
    return Place(turn.band, start, cursor.lastrowid)


def placed(conn: sqlite3.Connection, ticket: str, *, fresh_after: float) -> Place | None:
    """The ticket's place, if it waits and expires after `fresh_after`."""
    row = conn.execute("SELECT band, tag, seq FROM cm_tickets WHERE ticket = ? AND expires > ?",
                       (ticket, fresh_after)).fetchone()
    return None if row is None else Place(int(row[0]), float(row[1]), int(row[2]))


def ahead(conn: sqlite3.Connection, account: str, mine: Place,
          live_at: float | None = None) -> int:
    """Tickets of the account that enter before this one (those still live at `live_at`)."""
    sql = "SELECT COUNT(*) FROM cm_tickets WHERE account = ? AND (band, tag, seq) < (?, ?, ?)"
    params: tuple[object, ...] = (account, *mine)
    if live_at is not None:
        sql += " AND expires > ?"
        params += (live_at,)
    row = conn.execute(sql, params).fetchone()
    return int(row[0])


def served(conn: sqlite3.Connection, account: str, mine: Place) -> None:
    """The account's virtual time moves to the granted ticket's start; idle callers forgotten."""
    conn.execute("INSERT INTO cm_vtime (account, v) VALUES (?, ?) ON CONFLICT (account)"
                 " DO UPDATE SET v = max(v, excluded.v)", (account, mine.tag))
    conn.execute("DELETE FROM cm_fair WHERE account = ? AND finish <= ?",
                 (account, _vtime(conn, account)))


def _vtime(conn: sqlite3.Connection, account: str) -> float:
    row = conn.execute("SELECT v FROM cm_vtime WHERE account = ?", (account,)).fetchone()
    return float(row[0]) if row else 0.0


def _finish(conn: sqlite3.Connection, account: str, caller: str) -> float:
    row = conn.execute("SELECT finish FROM cm_fair WHERE account = ? AND caller = ?",
                       (account, caller)).fetchone()
    return float(row[0]) if row else 0.0
