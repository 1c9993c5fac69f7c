"""What the shared backends (Redis for limits, PostgreSQL for jobs) raise when they are down.

Callers fail closed on it: nothing is created while a backend is unreachable, HTTP answers 503
with Retry-After, and work that was waiting keeps its place until the backend is back.
"""

from __future__ import annotations

from typing import Literal

Dependency = Literal["redis", "postgresql", "sqlite"]

UNAVAILABLE_RETRY_AFTER_S = 5


class StoreUnavailable(Exception):
    """A shared backend could not be reached; the message names it, never its credentials."""

    retry_after = UNAVAILABLE_RETRY_AFTER_S

    def __init__(self, dependency: Dependency, detail: str = "unreachable") -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency
