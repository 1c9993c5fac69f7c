"""Every exception that crosses modules: the bottom floor, importing nothing of the package."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

Dependency = Literal["redis", "postgresql", "sqlite"]

# A client retrying a down backend sooner than this only adds load.
UNAVAILABLE_RETRY_AFTER_S = 5
# A state file locked past a caller's patience frees within seconds.
STORE_BUSY_RETRY_AFTER_S = 2


class SettingsError(ValueError):
    """A variable has a value the service cannot start with; the message names it."""


class InvalidRequest(ValueError):
    """The caller's input is wrong; `field` names where, `extra` adds keys to the error body."""

    def __init__(self, field: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.field = field
        self.extra = extra


class ExpandedRequestTooLarge(ValueError):
    """The items' inputs, as they would be sent, add up to more than the server allows."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"The request expands to {size} bytes of model input across its items "
                         f"(shared values counted once per item); at most {limit} "
                         "(MAX_EXPANDED_REQUEST_BYTES)")
        self.size = size
        self.limit = limit


class InvalidWebhook(ValueError):
    """A webhook URL or secret was rejected; the message is safe to show the caller.

    `retryable` is true when the cause may pass by itself (the host did not resolve just now).
    """

    def __init__(self, message: str, *, field: str = "webhook", retryable: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.retryable = retryable


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another request body."""


class GenerationError(Exception):
    """A task failed; `kind` says how, the message is safe to show the caller."""

    def __init__(self, kind: str, message: str, *, prediction_id: str | None = None,
                 upstream_status: int | None = None, billed_seconds: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.prediction_id = prediction_id
        self.upstream_status = upstream_status
        # The ended prediction's metrics.predict_time: time-billed models cost it even failed.
        self.billed_seconds = billed_seconds


class TokenRejected(GenerationError):
    """Replicate answered 401 to this account's token moments ago: refused without asking again."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("replicate_unauthorized", "Replicate rejected this API token (401) "
                         "moments ago; it is not sent again for a while", upstream_status=401)
        self.retry_after = retry_after


class SchemaUnavailable(Exception):
    """The model's schema could not be fetched: `status` is what the HTTP layer answers."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Suspended(Exception):
    """The process is stopping: the task was left as it is, for the next start to resume."""


class DeadlineExceeded(Exception):
    """A wait for a slot or a token would pass the caller's deadline."""


class QueueFull(Exception):
    """Too many tasks are waiting in this process (or for this account); retry later."""

    def __init__(self, retry_after: float, *, scope: str = "process") -> None:
        whose = " for this account" if scope == "account" else ""
        super().__init__(f"too many tasks are queued{whose}; retry later")
        self.retry_after = retry_after
        self.scope = scope


class ShuttingDown(Exception):
    """The process is stopping and takes no new work."""


class StoreUnavailable(Exception):
    """A shared backend could not be reached; the message names it, never its credentials."""

    retry_after = UNAVAILABLE_RETRY_AFTER_S

    def __init__(self, dependency: Dependency, detail: str = "unreachable") -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency


class StoreBusy(Exception):
    """The state file stayed locked by another writer longer than this caller may wait."""

    retry_after = STORE_BUSY_RETRY_AFTER_S


class InvalidName(ValueError):
    """A caller-supplied file name was rejected; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class OutputExists(FileExistsError):
    """An output's name is taken by `path` and the caller did not ask to rename or replace."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(errno.EEXIST, message, str(path))
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return self.message


class EgressRefused(Exception):
    """An outbound fetch broke the egress policy or one of its bounds; the message is safe to show.

    `retryable`: the cause may pass by itself (a host that did not resolve just now);
    `exhausted`: a per-prediction or per-job bound is used up, so later outputs are refused too.
    """

    def __init__(self, message: str, *, retryable: bool = False, exhausted: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.exhausted = exhausted


class OutputsNotSaved(GenerationError):
    """A prediction succeeded but its outputs were not all saved; `files` lists those that were."""

    def __init__(self, kind: str, message: str, *, prediction_id: str,
                 files: tuple[str, ...] = ()) -> None:
        super().__init__(kind, message, prediction_id=prediction_id)
        self.files = files


class TokenUnverified(Exception):
    """Replicate could not say whether a user's token is valid (unreachable, 5xx, 429): the
    request is refused, nothing stored, and may be tried again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("Replicate could not be reached to check this API token; nothing was "
                         "stored, try again shortly")
        self.retry_after = retry_after


class AccountStoreFull(Exception):
    """The account keeps as many jobs, or bytes of job records, as it may: nothing was stored.

    `status` 413 for a job that could never fit, else 429 with `retry_after` (when room frees).
    """

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BudgetExceeded(Exception):
    """A request whose most possible cost does not fit what is left of the caller's budget
    (402); nothing was stored or created."""

    def __init__(self, *, budget_usd: float, period: str, remaining_usd: float,
                 required_usd: float | None, whose: str = "this key's") -> None:
        left = f"${remaining_usd:g} of {whose} ${budget_usd:g} {period} budget is left"
        if required_usd is None:
            super().__init__(
                "This request runs a model whose cost is unknown (not curated, and its hardware "
                f"is not in MODEL_HARDWARE), so a budget cannot hold it ({left}); the admin may "
                "let the key run it with allow_unknown_cost")
        else:
            super().__init__(f"This request may cost up to ${required_usd:g}, and {left}")
        self.budget_usd = budget_usd
        self.period = period
        self.remaining_usd = remaining_usd
        self.required_usd = required_usd
