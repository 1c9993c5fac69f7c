"""The simulator's knobs (``SimConfig``) and what all its parts share: the knobs, the clock, the
one lock, and the condition that held creates wait on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

# Clocks that run in real time: a held create may sleep until a known finish time on them.
_REAL_CLOCKS: tuple[Callable[[], float], ...] = (time.monotonic, time.perf_counter, time.time)
# Config fields holding raw tokens: set from any iterable, shown only as hashes.
TOKEN_SET_FIELDS = ("invalid_tokens", "no_credit_tokens", "unknown_tokens")
# A token starting so was never issued: 401 on every call (GET /v1/account included).
UNKNOWN_TOKEN_PREFIX = "r8_unknown_"  # noqa: S105 - a marker, not a secret


@dataclass
class SimConfig:
    """Knobs; tests change them between steps (``Simulator.configure`` takes the lock)."""

    run_seconds: float = 0.5  # time in "processing"
    queue_seconds: float = 0.05  # time in "starting"
    create_rate_per_minute: float = 600.0  # token bucket per token for creates
    create_burst: int = 600
    other_rate_per_minute: float = 3000.0  # bucket per token for every other API call
    other_burst: int = 3000
    retry_after_header: bool = True  # send Retry-After header on 429
    retry_after_body: bool = True  # include "retry_after": N in 429 body
    # 401 on every call but GET /v1/account: a token revoked after the service checked it.
    invalid_tokens: set[str] = field(default_factory=set)
    # 401 on every call: tokens Replicate never issued (as UNKNOWN_TOKEN_PREFIX ones are).
    unknown_tokens: set[str] = field(default_factory=set)
    no_credit_tokens: set[str] = field(default_factory=set)  # 402 on create
    prefer_wait_timeout_status: str = "starting"  # or "current" (reproduces issue #385)
    output_ttl_seconds: float = 3600.0
    require_auth_for_files: bool = False
    download_delay_seconds: float = 0.0
    download_failures: int = 0  # the next N output downloads answer 500
    output_as_data_uri: bool = False  # outputs as data: URIs instead of URLs
    input_retention_seconds: float = 3600.0  # then GET /v1/predictions lists input as {}
    run_seconds_spread: float = 0.0  # run time = run_seconds + spread * u(prompt, seed)
    output_bytes: int = 0  # pad output files to about this many bytes (0: tiny files)


class Shared:
    """The config, the clock and the one lock every part takes; nothing sleeps holding it.

    ``config`` is read at each use, never kept: a test may replace it between steps.
    """

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self.lock = threading.RLock()
        # Held creates wait on this; cancel, configure, reset, stop and wake_waiters notify it.
        self.changed = threading.Condition(self.lock)
        self.generation = 0  # bumped by reset and stop: every held create answers at once
        self.real_time_clock = clock in _REAL_CLOCKS
        # Map the (possibly fake) clock onto wall time for the ISO timestamps.
        self._wall0 = time.time()
        self._clock0 = clock()

    def now(self) -> float:
        """Return the simulator clock."""
        return self._clock()

    def wall(self, moment: float) -> datetime:
        """Map a clock reading onto UTC wall time, to the microsecond (what created_at shows)."""
        return datetime.fromtimestamp(self._wall0 + (moment - self._clock0), tz=UTC)

    def iso(self, moment: float) -> str:
        return self.wall(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def configure(self, **changes: Any) -> None:
        """Change config knobs atomically; unknown names raise ValueError."""
        known = {f.name for f in fields(SimConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown SimConfig fields: {', '.join(unknown)}")
        with self.changed:
            for name, value in changes.items():
                setattr(self.config, name, set(value) if name in TOKEN_SET_FIELDS else value)
            self.changed.notify_all()

    def wake_waiters(self) -> None:
        """Make held Prefer-wait creates re-read the clock now (call after moving a fake one)."""
        with self.changed:
            self.changed.notify_all()

    def release_holds(self) -> None:
        """End every held create (Prefer: wait and "hold" faults): they answer at once."""
        with self.changed:
            self.generation += 1
            self.changed.notify_all()
