"""What every limit store shares: limits, their sources, account stats, the LimitStore protocol.

An "account" is an opaque string (a hash of its token); nothing here knows Flask or Replicate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol

Kind = Literal["create", "poll"]

# Inclusive: 0 would block forever, a negative rate divide by zero (upstream defect §3.8).
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "max_concurrent": (1, 10_000),
    "requests_per_minute": (1, 100_000),
    "burst": (1, 1_000),
    "polls_per_minute": (1, 100_000),
}

# A bogus Retry-After (or "inf") must not freeze an account for good.
MAX_BACKOFF_S = 3600.0
WINDOW_S = 60.0
# AIMD: 60% on a 429 (70% cost a throttled probe, 50% a sixth of the pace), +1% per create.
RATE_CUT = 0.6
RATE_STEP = 0.01
MIN_RATE_STEP = 0.2
# 429s closer together than this (or than their back-off) are one episode: one cut.
EPISODE_S = 1.0


@dataclass(frozen=True)
class Limits:
    """Per-account limits; the same values apply to every account."""

    max_concurrent: int  # predictions in flight per account
    requests_per_minute: int  # prediction creates per minute per account
    burst: int = 1  # creates allowed back-to-back above the steady pace
    polls_per_minute: int = 2400  # non-create calls per account (Replicate: 3000)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is not an int in range."""
        for name in LIMIT_RANGES:
            validate_limit(name, getattr(self, name))


def validate_limit(name: str, value: object) -> None:
    """Raise ValueError unless ``name`` is a limit field and ``value`` an int in its range."""
    check_known_limit(name)
    low, high = LIMIT_RANGES[name]
    # bool is an int subclass; True as a limit is a caller bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def check_known_limit(name: str) -> None:
    if name not in LIMIT_RANGES:
        raise ValueError(f"unknown limit {name!r}; known: {', '.join(LIMIT_RANGES)}")


@dataclass(frozen=True)
class LimitSource:
    """One limit as every process sharing the store applies it, and why.

    ``source``: "configure" (an override), else "environment" (the smallest live declaration).
    """

    value: int
    source: Literal["environment", "configure"]
    set_at: float | None  # when the override was stored (None for "environment")
    declared_min: int | None  # smallest value declared by a live process, if any
    declared_max: int | None
    declarations: int  # live processes declaring their environment's limits

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source,
                "set_at": None if self.set_at is None else iso_utc(self.set_at),
                "declared": {"min": self.declared_min, "max": self.declared_max,
                             "processes": self.declarations}}


def iso_utc(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds, as the job records use."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resolve_limit_sources(
    overrides: Mapping[str, tuple[int, float]],
    ranges: Mapping[str, tuple[int, int]],
    declarations: int,
    defaults: Limits,
) -> dict[str, LimitSource]:
    """Per field: the override (value, set_at) if any, else the smallest live declaration, else
    (an observer alone) ``defaults``. The rule every LimitStore applies."""
    sources: dict[str, LimitSource] = {}
    for name in LIMIT_RANGES:
        low, high = ranges.get(name, (None, None))
        if name in overrides:
            value, set_at = overrides[name]
            sources[name] = LimitSource(value, "configure", set_at, low, high, declarations)
        else:
            value = low if low is not None else getattr(defaults, name)
            sources[name] = LimitSource(value, "environment", None, low, high, declarations)
    return sources


def fold_own_defaults(
    ranges: Mapping[str, tuple[int, int]], declarations: int, own: Limits
) -> tuple[dict[str, tuple[int, int]], int]:
    """Add the caller's own declaration, which always counts even if its stored row lapsed."""
    folded = dict(ranges)
    for name in LIMIT_RANGES:
        mine = getattr(own, name)
        low, high = folded.get(name, (mine, mine))
        folded[name] = (min(low, mine), max(high, mine))
    return folded, declarations + 1


class AccountStats(NamedTuple):
    account: str
    in_flight: int  # live (unexpired) leases
    waiting: int  # callers (any process) currently waiting for a lease
    creates_last_minute: int  # create tokens whose use time fell in the last 60 s
    backoff_remaining: float  # seconds of shared 429 back-off left


@dataclass(frozen=True)
class Turn:
    """Where a waiter stands among its account's others: interactive work first, then callers
    by start-time fair queueing (each served in proportion to its weight), then arrival."""

    interactive: bool = True
    caller: str = ""
    weight: float = 1.0
    # The caller's own in-flight bound under the account's (an issued key's max_concurrent).
    cap: int | None = None

    @property
    def band(self) -> int:
        return 0 if self.interactive else 1

    @property
    def step(self) -> float:
        """How far one slot moves this caller's virtual time: less for a heavier caller."""
        return 1.0 / self.weight if self.weight > 0 else 1.0


ANYONE = Turn()


def caller_account(account: str, caller: str) -> str:
    """The account a capped caller's own slots are counted under, beside the real one's."""
    return f"{account}~{caller}"


class LimitStore(Protocol):
    """Shared state behind ConcurrencyManager. Every method is one short atomic step."""

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease or ticket lives without renewal."""
        ...

    def get_limits(self) -> Limits:
        """The effective limits: per field the override if set, else the live minimum."""
        ...

    def set_limits(self, limits: Limits) -> None:
        """Override all four fields (what /configure did before overrides were per field)."""
        ...

    def set_overrides(self, changes: Mapping[str, int | None]) -> None:
        """Override the given fields only; None clears that field's override."""
        ...

    def clear_overrides(self) -> None:
        """Drop every override: the environment's declarations apply again."""
        ...

    def describe_limits(self) -> dict[str, LimitSource]:
        """Per ``Limits`` field: its effective value and where it comes from."""
        ...

    def declare(self, instance: str) -> None:
        """Declare (or renew) this store's default limits for ``instance``, alive for lease_ttl."""
        ...

    def withdraw(self, instance: str) -> None:
        """Remove ``instance``'s declaration (a clean shutdown)."""
        ...

    def try_acquire(self, account: str, ticket: str, turn: Turn = ANYONE,
                    limit: int | None = None) -> str | None:
        """Enqueue or refresh ``ticket`` (placed by ``turn`` when new); return a lease id if it
        may enter now. ``limit`` lowers the shared max_concurrent for this account only."""
        ...

    def try_acquire_ranked(self, account: str, ticket: str, turn: Turn = ANYONE,
                           limit: int | None = None) -> tuple[str | None, int]:
        """As try_acquire, and when refused how many waiters enter before this one (1: next)."""
        ...

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when a slot is released in another process, where the store can
        tell (else waiters find out by polling)."""
        ...

    def renew(self, lease_ids: Sequence[str], ticket_ids: Sequence[str]) -> None: ...

    def release(self, lease_id: str) -> None: ...

    def leave_queue(self, ticket: str) -> None: ...

    def reserve(self, account: str, kind: Kind, *, max_wait: float = math.inf) -> float:
        """Spend one token now; return seconds to wait before using it.

        Past ``max_wait`` nothing is spent and the wait is returned: no token is burnt unused.
        """
        ...

    def back_off(self, account: str, seconds: float) -> None:
        """A 429: pause the account and lower its learned create rate (once per episode)."""
        ...

    def create_accepted(self, account: str) -> None:
        """A create went through: raise a learned create rate back towards the limit."""
        ...

    def last_cut(self, account: str) -> float:
        """When the learned create rate was last cut (0: never): tokens reserved before it were
        spaced for a rate Replicate refused."""
        ...

    def backoff_remaining(self, account: str) -> float: ...

    def stats(self, account: str | None = None) -> list[AccountStats]: ...

    def check(self) -> None:
        """Raise StoreUnavailable unless the store can be reached now (for /health)."""
        ...

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
