"""What callers spend: each open item holds its most possible cost against its key's budget, a
finished item that made a prediction is written to the ledger at its real cost, and the ledger
is summed for budgets and grouped for /usage."""

from __future__ import annotations

from calendar import timegm
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Double, Select, bindparam, func, select

from replicate_generation.errors import BudgetExceeded
from replicate_generation.jobs.database import JobDatabase, lock_for_transaction
from replicate_generation.jobs.rows import OPEN_STATES
from replicate_generation.jobs.schema import api_keys, job_items, jobs, spend_ledger

# Rounding slack: sums of float prices must not refuse a budget met exactly.
_EPSILON = 1e-9
GROUPS = ("key", "model", "day")


@dataclass(frozen=True)
class Budget:
    """`limit_usd` per `period` (day, month, total; UTC) for an issued key or for an account
    (every caller paying with it); `allow_unknown_cost`: the caller's key may run models whose
    cost is unknown (they hold nothing and settle at no cost)."""

    limit_usd: float
    period: str
    key_id: str | None = None
    account: str | None = None
    allow_unknown_cost: bool = False

    @property
    def whose(self) -> str:
        return "this key's" if self.key_id is not None else "the account's"


def period_start(period: str, now: float) -> float:
    """Where the budget's current period began (UTC): today, this month, or ever."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    if period == "day":
        return float(timegm((moment.year, moment.month, moment.day, 0, 0, 0)))
    if period == "month":
        return float(timegm((moment.year, moment.month, 1, 0, 0, 0)))
    return 0.0


def check_budget(conn: Connection, budget: Budget, costs: Sequence[float | None],
                 now: float) -> None:
    """Raise BudgetExceeded unless the items' most possible `costs` fit (None: unknown, refused
    unless the budget allows it); inside the transaction that stores the items, holding a lock
    on PostgreSQL (the key's row, or the account's advisory lock) so concurrent requests queue
    here (SQLite's writers already take turns)."""
    _lock(conn, budget)
    used = float(conn.execute(_used(budget, now)).scalar() or 0.0)
    remaining = max(0.0, budget.limit_usd - used)
    refused_unknown = any(cost is None for cost in costs) and not budget.allow_unknown_cost
    required = round(sum(cost for cost in costs if cost is not None), 6)
    if refused_unknown or required > remaining + _EPSILON:
        raise BudgetExceeded(budget_usd=budget.limit_usd, period=budget.period,
                             remaining_usd=round(remaining, 6),
                             required_usd=None if refused_unknown else required,
                             whose=budget.whose)


def _lock(conn: Connection, budget: Budget) -> None:
    if budget.key_id is not None:
        conn.execute(select(api_keys.c.id).where(api_keys.c.id == budget.key_id)
                     .with_for_update())
    else:
        lock_for_transaction(conn, f"budget:{budget.account}")


def _used(budget: Budget, now: float) -> Select[Any]:
    """Settled spend this period plus what open items hold, in one statement (one snapshot)."""
    if budget.key_id is not None:
        spent, holding = spend_ledger.c.key_id == budget.key_id, jobs.c.key_id == budget.key_id
    else:
        spent, holding = spend_ledger.c.account == budget.account, jobs.c.account == budget.account
    settled = select(func.coalesce(func.sum(spend_ledger.c.cost_usd), 0.0)).where(
        spent, spend_ledger.c.at >= period_start(budget.period, now)).scalar_subquery()
    held = select(func.coalesce(func.sum(job_items.c.reserved_usd), 0.0)).select_from(
        job_items.join(jobs, jobs.c.id == job_items.c.job_id)).where(
        holding, job_items.c.state.in_(OPEN_STATES)).scalar_subquery()
    return select(settled + held)


_LEDGER_COLUMNS = ["job_id", "item_idx", "at", "caller", "key_id", "account", "model",
                   "prediction_id", "billed_seconds", "cost_usd"]
_LEDGER_SOURCE = select(
    job_items.c.job_id, job_items.c.idx, bindparam("v_now", type_=Double),
    func.coalesce(jobs.c.caller, "unknown"), jobs.c.key_id, jobs.c.account,
    func.coalesce(job_items.c.model_used, job_items.c.prediction_model),
    job_items.c.prediction_id, bindparam("v_billed", type_=Double), job_items.c.cost_usd,
).select_from(job_items.join(jobs, jobs.c.id == job_items.c.job_id)).where(
    job_items.c.job_id == bindparam("w_job"), job_items.c.idx == bindparam("w_idx"),
    job_items.c.prediction_id.is_not(None))


class SpendLedger:
    """The ledger and the budget figures, on the job store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db
        # Built once: every finished item runs it.
        self._record = db.insert(spend_ledger).from_select(_LEDGER_COLUMNS, _LEDGER_SOURCE) \
            .on_conflict_do_nothing(index_elements=[spend_ledger.c.job_id,
                                                    spend_ledger.c.item_idx])

    def used(self, budget: Budget, now: float) -> float:
        """What the key spent this period and its open items hold."""
        with self._db.read() as conn:
            return round(float(conn.execute(_used(budget, now)).scalar() or 0.0), 6)

    def record(self, conn: Connection, job_id: str, index: int, billed_seconds: float | None,
               now: float) -> None:
        """Write the finished item to the ledger if it made a prediction (once)."""
        conn.execute(self._record, {"w_job": job_id, "w_idx": index, "v_now": now,
                                    "v_billed": billed_seconds})

    def usage(self, group_by: tuple[str, ...], since: float, until: float, *,
              key_id: str | None = None, account: str | None = None) -> list[dict[str, Any]]:
        """Predictions and cost in [since, until), grouped; a key or an account's own only."""
        day = _day_text(self._db.backend).label("day")
        by = {"key": spend_ledger.c.caller.label("key"),
              "model": spend_ledger.c.model.label("model"), "day": day}
        chosen = [by[name] for name in group_by]
        query = select(*chosen, func.count().label("predictions"),
                       func.coalesce(func.sum(spend_ledger.c.cost_usd), 0.0).label("cost_usd"),
                       func.coalesce(func.sum(spend_ledger.c.billed_seconds), 0.0)
                       .label("billed_seconds"),
                       ).where(spend_ledger.c.at >= since, spend_ledger.c.at < until)
        if key_id is not None:
            query = query.where(spend_ledger.c.key_id == key_id)
        if account is not None:
            query = query.where(spend_ledger.c.account == account)
        query = query.group_by(*chosen).order_by(*chosen)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [{"key": getattr(r, "key", None), "model": getattr(r, "model", None),
                 "day": getattr(r, "day", None), "predictions": int(r.predictions),
                 "cost_usd": round(float(r.cost_usd), 6),
                 "billed_seconds": round(float(r.billed_seconds), 6)} for r in rows]


def _day_text(backend: str) -> Any:
    """The ledger row's UTC day as YYYY-MM-DD text, on either database."""
    if backend == "sqlite":
        return func.strftime("%Y-%m-%d", spend_ledger.c.at, "unixepoch")
    utc = func.timezone("UTC", func.to_timestamp(spend_ledger.c.at))
    return func.to_char(utc, "YYYY-MM-DD")
