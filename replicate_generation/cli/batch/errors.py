"""The two errors of a `run`: bad input or a refused request (exit 2), and no room yet (retry)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments, input, manifest or a request the service refused: exit 2."""


class Busy(Exception):
    """The service or this process has no room now; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
