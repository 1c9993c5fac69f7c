"""When to try a webhook again: exponential backoff with jitter, and the receiver's Retry-After."""

from __future__ import annotations

import random
from collections.abc import Callable

from replicate_generation.jobs.webhooks.delivery import DeliveryResult

MAX_ATTEMPTS = 8


def backoff(
    attempt: int,
    *,
    base: float = 5.0,
    cap: float = 3600.0,
    factor: float = 4.0,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first).

    Capped exponential ``d``, then "equal jitter" in ``[d/2, d]``: spread out, never over ``cap``.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError("attempt must be an integer >= 1")
    if base <= 0 or cap <= 0 or factor < 1:
        raise ValueError("base and cap must be positive and factor at least 1")
    exponent = min(attempt - 1, 1000)
    try:
        delay = min(cap, base * factor ** exponent)
    except OverflowError:
        delay = cap
    draw = min(max(jitter(), 0.0), 1.0)
    return delay / 2 + draw * delay / 2


def retry_delay(
    result: DeliveryResult,
    attempt: int,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    base: float = 5.0,
    cap: float = 3600.0,
    jitter: Callable[[], float] = random.random,
) -> float | None:
    """Seconds until the next attempt after attempt number ``attempt`` gave ``result``, or None
    when there is none (success, not retryable, or ``max_attempts`` reached). A receiver's
    Retry-After is honoured, up to ``cap``."""
    if result.ok or not result.retryable or attempt >= max_attempts:
        return None
    delay = backoff(attempt, base=base, cap=cap, jitter=jitter)
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, cap))
    return delay
