"""The lock that keeps job events' ids in commit order on PostgreSQL: a transaction-scoped
advisory lock, taken as an appending transaction's last lock (it then waits on nothing while
held, so no deadlock), and held to its commit. SQLite's one writer needs none."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Row, func, select

# pg_advisory_xact_lock key of the appends: "rg_evts".
_APPEND_LOCK = 0x72675F65767473
# The column a statement returns when it took the lock itself (an update of the job's row).
ORDERED = "append_ordered"

# A statement of its own, for a transaction whose last write returned nothing.
APPEND_ORDER = select(func.pg_advisory_xact_lock(_APPEND_LOCK))


def taking_append_order() -> ColumnElement[Any]:
    """A RETURNING column that takes the lock once its row is locked: one round trip fewer
    while the job's row is held."""
    return func.pg_advisory_xact_lock(_APPEND_LOCK).label(ORDERED)


def took_append_order(row: Row[Any] | None) -> bool:
    return row is not None and ORDERED in row._fields
