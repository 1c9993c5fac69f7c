"""A job's items counted by state (and their cost summed) on the job's own row, moved in the same
transaction as the items they count, so reading a job costs the same whatever its size; and the
finished jobs' totals, kept as jobs finish and go, so /metrics never reads every job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Row,
    Select,
    Update,
    bindparam,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from replicate_generation.jobs.event_order import taking_append_order
from replicate_generation.jobs.rows import ITEM_STATES, JOB_TERMINAL, kept_counts
from replicate_generation.jobs.schema import job_totals, jobs

COUNT_COLUMNS: dict[str, Column[Any]] = {state: jobs.c[f"{state}_items"] for state in ITEM_STATES}
# Written as literals: SQLite uses the partial index jobs_open only for its own WHERE, verbatim.
OPEN_JOB = jobs.c.state.in_([literal_column("'queued'"), literal_column("'running'")])
# What an item's events say of its job: its owner, cost and counts as the write leaves them.
JOB_FACTS: list[ColumnElement[Any]] = [jobs.c.account, jobs.c.key_id, jobs.c.cost_usd,
                                       *COUNT_COLUMNS.values()]


def move_items(conn: Connection, job_id: str, before: str | None, after: str | None,
               count: int = 1, *, cost: float = 0.0, then_append: bool = False
               ) -> Row[Any] | None:
    """`count` of the job's items went from state `before` to `after` (None: not there);
    `cost` is added to the job's summed cost. Returns the job's JOB_FACTS as the move left
    them (None: nothing moved, or no such job). `then_append`: an event of this move follows,
    so on PostgreSQL the update takes the append order's lock too (event_order)."""
    moved = before != after and bool(count)
    if not (moved or cost):
        return None
    ordered = then_append and conn.dialect.name == "postgresql"
    statement = _move_returning(before if moved else None, after if moved else None, bool(cost),
                                ordered)
    return conn.execute(statement, {"w_job": job_id, "v_count": count, "v_cost": cost}).first()


def counts_moved(before: str, after: str) -> Update:
    """The UPDATE of a job's row that moves one item between two states (`w_job`, `v_count`),
    for a writer that sets more of the row in the same statement."""
    return _move(before, after, False)


@cache
def _move(before: str | None, after: str | None, with_cost: bool) -> Update:
    """The UPDATE that moves counts between two states (and adds a cost), built once per pair."""
    values: dict[Column[Any], ColumnElement[Any]] = {}
    if before is not None:
        values[COUNT_COLUMNS[before]] = COUNT_COLUMNS[before] - bindparam("v_count")
    if after is not None:
        values[COUNT_COLUMNS[after]] = COUNT_COLUMNS[after] + bindparam("v_count")
    if with_cost:
        values[jobs.c.cost_usd] = jobs.c.cost_usd + bindparam("v_cost")
    return update(jobs).where(jobs.c.id == bindparam("w_job")).values(values)


@cache
def _move_returning(before: str | None, after: str | None, with_cost: bool,
                    ordered: bool) -> Update:
    statement = _move(before, after, with_cost).returning(*JOB_FACTS)
    return statement.returning(taking_append_order()) if ordered else statement


def end_queued_items(conn: Connection, job_ids: Sequence[str], after: str) -> None:
    """Every queued item of these jobs went to `after` (as one UPDATE of their items did)."""
    if not job_ids:
        return
    queued, ended = COUNT_COLUMNS["queued"], COUNT_COLUMNS[after]
    # SET reads the row as it was: `ended` gains what `queued` held.
    conn.execute(update(jobs).where(jobs.c.id == bindparam("moved"))
                 .values({ended: ended + queued, queued: 0}),
                 [{"moved": job_id} for job_id in job_ids])


# -- finished jobs' totals --------------------------------------------------------------------


def add_finished(conn: Connection, state: str, counts: Mapping[str, int], sign: int = 1) -> None:
    """A job ended in `state` with these item counts (sign -1: such a job was removed)."""
    rows = [{"kind": "jobs", "state": state, "count": sign}]
    rows += [{"kind": "items", "state": item_state, "count": sign * count}
             for item_state, count in sorted(counts.items()) if count]
    insert = (sqlite.insert(job_totals) if conn.dialect.name == "sqlite"
              else postgresql.insert(job_totals))
    for row in rows:  # one row at a time, in one order: concurrent finishers never deadlock
        conn.execute(insert.values(row).on_conflict_do_update(
            index_elements=[job_totals.c.kind, job_totals.c.state],
            set_={"count": job_totals.c.count + insert.excluded.count}))


def forget_finished(conn: Connection, job_ids: Sequence[str]) -> None:
    """Take these jobs (about to be deleted) out of the totals, the finished ones being there."""
    finished = select(jobs.c.state, *COUNT_COLUMNS.values()).where(
        jobs.c.id.in_(job_ids), jobs.c.state.in_(sorted(JOB_TERMINAL)))
    for row in conn.execute(finished).all():
        add_finished(conn, str(row.state), kept_counts(row), sign=-1)


def open_jobs_by_state() -> Select[Any]:
    """The open jobs (few: the work in flight) by state, their item counts summed."""
    return select(jobs.c.state, func.count(), *(func.sum(c) for c in COUNT_COLUMNS.values())
                  ).where(OPEN_JOB).group_by(jobs.c.state)


def state_counts(conn: Connection) -> tuple[dict[str, int], dict[str, int]]:
    """(jobs by state, items by state) of every job kept: the totals plus the open jobs."""
    by_job: dict[str, int] = {}
    by_item: dict[str, int] = {}
    for kind, state, count in conn.execute(select(
            job_totals.c.kind, job_totals.c.state, job_totals.c.count)):
        target = by_job if kind == "jobs" else by_item
        target[str(state)] = target.get(str(state), 0) + int(count)
    for state, jobs_count, *item_counts in conn.execute(open_jobs_by_state()):
        by_job[str(state)] = by_job.get(str(state), 0) + int(jobs_count)
        for item_state, count in zip(COUNT_COLUMNS, item_counts, strict=True):
            by_item[item_state] = by_item.get(item_state, 0) + int(count or 0)
    return ({s: n for s, n in by_job.items() if n}, {s: n for s, n in by_item.items() if n})
