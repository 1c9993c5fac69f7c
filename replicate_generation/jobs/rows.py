"""What the job store takes and hands out: a new job and its items, a job's and an item's row, how
an item ended; the states they move through, and how a table row becomes one of them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, bindparam, select

from replicate_generation.jobs.schema import job_items, jobs
from replicate_generation.jobs.shared_values import unpack

# "expired": nothing was created for it before its job's start deadline (deadline_seconds).
ITEM_STATES = ("queued", "running", "succeeded", "failed", "canceled", "expired")
ITEM_TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
JOB_TERMINAL = frozenset({"succeeded", "partially_failed", "failed", "canceled"})
OPEN_STATES = ("queued", "running")
# A job asked to cancel whose items have not all ended (a prediction may still run).
CANCEL_REQUESTED = "cancel_requested"
# An item whose prediction was canceled but never seen to stop on Replicate.
CANCEL_UNCONFIRMED = "cancel_unconfirmed"


@dataclass(frozen=True)
class NewItem:
    """What an item will run: the serialised plan (models, input, names); opaque to the store."""

    spec: dict[str, Any]
    # The most it may cost with its fallbacks (None: unknown), held against a budget while open.
    reserved_usd: float | None = None


@dataclass(frozen=True)
class NewJob:
    id: str
    account: str
    kind: str
    request_id: str
    items: Sequence[NewItem]
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_private: bool = False
    origin: str = "service"
    # The issued key that submits it (None for the admin key and a user's own token).
    key_id: str | None = None
    # Who submits it, as the ledger names callers.
    caller: str | None = None
    priority: str = "batch"
    # Wall-clock seconds after which none of its items is created (None: no limit).
    start_deadline: float | None = None


@dataclass
class ItemRow:
    job_id: str
    index: int
    spec: dict[str, Any]
    state: str
    prediction_id: str | None
    prediction_model: str | None
    model_used: str | None
    attempts: list[dict[str, Any]]
    files: list[str]
    error: str | None
    error_type: str | None
    cost_usd: float | None
    placeholder: bool
    notes: list[str]
    queued_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def terminal(self) -> bool:
        return self.state in ITEM_TERMINAL


@dataclass
class JobRow:
    id: str
    account: str
    kind: str
    state: str
    request_id: str
    item_count: int
    owner: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None
    idempotency_key: str | None
    request_hash: str | None
    webhook_url: str | None
    webhook_private: bool
    webhook_state: str | None
    webhook_attempts: int
    webhook_next_at: float | None
    webhook_error: str | None
    counts: dict[str, int] = field(default_factory=dict)
    # The fencing number an owner's writes carry (see Owners.fence_of).
    fence: int = 0
    # The items' total cost, kept on the job's row as items finish.
    cost_usd: float | None = None
    key_id: str | None = None
    caller: str | None = None
    priority: str | None = None
    start_deadline: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in JOB_TERMINAL


@dataclass(frozen=True)
class ItemOutcome:
    """How an item ended."""

    state: str
    model_used: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    cost_usd: float | None = None
    placeholder: bool = False
    notes: list[str] = field(default_factory=list)
    # What Replicate billed the last prediction for (its metrics.predict_time).
    billed_seconds: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # files' bytes known from writing them


JOB_COLUMNS = [jobs.c[name] for name in (
    "id", "account", "kind", "state", "request_id", "item_count", "owner", "created_at",
    "started_at", "finished_at", "cancel_requested_at", "idempotency_key", "request_hash",
    "webhook_url", "webhook_private", "webhook_state", "webhook_attempts", "webhook_next_at",
    "webhook_error", "fence", "key_id", "caller", "priority", "start_deadline",
    *(f"{state}_items" for state in ITEM_STATES), "cost_usd")]
ITEM_COLUMNS = [job_items.c[name] for name in (
    "job_id", "idx", "spec", "state", "prediction_id", "prediction_model", "model_used",
    "attempts", "files", "error", "error_type", "cost_usd", "placeholder", "notes", "queued_at",
    "started_at", "finished_at")]


def job_row(row: Row[Any]) -> JobRow:
    r = row._mapping
    # Stored as queued/running (so recovery still finds it); shown as what it is.
    cancel_requested = r["cancel_requested_at"] is not None and r["state"] not in JOB_TERMINAL
    return JobRow(
        id=r["id"], account=r["account"], kind=r["kind"],
        state=CANCEL_REQUESTED if cancel_requested else r["state"], request_id=r["request_id"],
        item_count=int(r["item_count"]), owner=r["owner"], created_at=float(r["created_at"]),
        started_at=r["started_at"], finished_at=r["finished_at"],
        cancel_requested_at=r["cancel_requested_at"], idempotency_key=r["idempotency_key"],
        request_hash=r["request_hash"], webhook_url=r["webhook_url"],
        webhook_private=bool(r["webhook_private"]), webhook_state=r["webhook_state"],
        webhook_attempts=int(r["webhook_attempts"]), webhook_next_at=r["webhook_next_at"],
        webhook_error=r["webhook_error"], fence=int(r["fence"]), key_id=r["key_id"],
        caller=r["caller"], priority=r["priority"], start_deadline=r["start_deadline"],
        counts=kept_counts(row), cost_usd=round(float(r["cost_usd"]), 6))


def kept_counts(row: Row[Any]) -> dict[str, int]:
    """The item counts kept on a job's row (jobs.<state>_items), every item state present."""
    r = row._mapping
    return {state: int(r[f"{state}_items"]) for state in ITEM_STATES}


def item_row(row: Row[Any], values: dict[str, str]) -> ItemRow:
    """The item, its spec's references to shared values replaced by `values`."""
    r = row._mapping
    return ItemRow(
        job_id=r["job_id"], index=int(r["idx"]), spec=unpack(json.loads(r["spec"]), values),
        state=r["state"], prediction_id=r["prediction_id"],
        prediction_model=r["prediction_model"], model_used=r["model_used"],
        attempts=json.loads(r["attempts"]), files=json.loads(r["files"]), error=r["error"],
        error_type=r["error_type"], cost_usd=r["cost_usd"], placeholder=bool(r["placeholder"]),
        notes=json.loads(r["notes"]), queued_at=float(r["queued_at"]),
        started_at=r["started_at"], finished_at=r["finished_at"])


def load_job(conn: Connection, job_id: str) -> JobRow | None:
    row = conn.execute(_JOB_BY_ID, {"job_id": job_id}).first()
    if row is None:
        return None
    return job_row(row)


# Built once: the hottest reads of a job's row, by bound id.
_JOB_BY_ID = select(*JOB_COLUMNS).where(jobs.c.id == bindparam("job_id"))
_KEPT_COUNTS = select(*(jobs.c[f"{state}_items"] for state in ITEM_STATES)).where(
    jobs.c.id == bindparam("job_id"))


def count_items(conn: Connection, job_id: str) -> dict[str, int]:
    """The job's items by state, every state present: the counts kept on its row."""
    row = conn.execute(_KEPT_COUNTS, {"job_id": job_id}).first()
    return kept_counts(row) if row is not None else dict.fromkeys(ITEM_STATES, 0)


def job_cost(conn: Connection, job_id: str) -> float:
    """The items' summed cost, kept on the job's row as they finish."""
    cost = conn.execute(select(jobs.c.cost_usd).where(jobs.c.id == job_id)).scalar()
    return round(float(cost or 0.0), 6)
