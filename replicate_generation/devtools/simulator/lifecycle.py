"""One prediction's record and lifecycle: status and progress read off the clock, so an injected
fake clock makes timing tests deterministic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from replicate_generation.devtools.simulator.catalogue import ModelSpec

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


@dataclass
class Prediction:
    """One prediction; its status is a pure function of the clock (no background thread)."""

    id: str
    spec: ModelSpec
    version: str  # "hidden" for official-model calls, else the 64-hex id
    input: dict[str, Any]
    token_hash: str
    source: str  # which endpoint created it: model, version, deployment
    created: float
    queue_s: float
    run_s: float | None  # None: hangs until canceled
    error: str | None
    empty: bool
    n_outputs: int
    ext: str
    canceled_at: float | None = None
    seq: int = 0  # creation order across all tokens: ties on a fake clock, list cursors

    def start_time(self) -> float | None:
        """Return when it started processing, or None if it was canceled before that."""
        start = self.created + self.queue_s
        if self.canceled_at is not None and self.canceled_at < start:
            return None
        return start

    def terminal_time(self) -> float | None:
        if self.canceled_at is not None:
            return self.canceled_at
        if self.run_s is None:
            return None
        return self.created + self.queue_s + self.run_s

    def status(self, now: float) -> str:
        end = self.terminal_time()
        if end is not None and now >= end:
            if self.canceled_at is not None:
                return "canceled"
            return "failed" if self.error else "succeeded"
        return "starting" if now < self.created + self.queue_s else "processing"

    def in_flight(self, now: float) -> bool:
        end = self.terminal_time()
        return self.created <= now and (end is None or now < end)

    def progress(self, now: float) -> float:
        """Return the fraction of the run done at ``now``, for the tqdm-style logs."""
        start = self.start_time()
        if start is None or now <= start:
            return 0.0
        if self.run_s is None:
            return min(0.75, (now - start) / 10.0)  # a hung run creeps, never finishes
        return 1.0 if self.run_s <= 0 else min(1.0, (now - start) / self.run_s)

    def picture(self) -> dict[str, Any]:
        """What a demo picture of this prediction shows: its prompt, in its aspect ratio."""
        return {"prompt": str(self.input.get("prompt") or ""),
                "aspect_ratio": self.input.get("aspect_ratio")}

    def summary(self, now: float) -> dict[str, Any]:
        """Return what ``Simulator.predictions`` and ``/_sim/predictions`` show of it."""
        end = self.terminal_time()
        start = self.start_time()
        ended = end is not None and now >= end
        return {
            "id": self.id,
            "model": self.spec.ref,
            "version": self.version,
            "input": dict(self.input),
            "status": self.status(now),
            "token_hash": self.token_hash,
            "created_at_clock": self.created,
            "started_at_clock": self.start_time(),
            "completed_at_clock": end if end is not None and now >= end else None,
            "canceled": self.canceled_at is not None,
            "error": self.error,
            "source": self.source,
            "num_outputs": 0 if self.empty else self.n_outputs,
            # What Replicate bills: the prediction's metrics.predict_time once it ended.
            "billed_seconds": (round(end - start, 6) if start is not None else 0.0)
            if ended and end is not None else None,
        }
