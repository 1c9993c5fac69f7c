"""One prediction's record and lifecycle: status and progress read off the clock, so an injected
fake clock makes timing tests deterministic. A `Cancel-After` deadline ends it `aborted` if it
passes before the start (nothing billed), `canceled` if it passes while running."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from replicate_generation.devtools.simulator.catalogue import ModelSpec

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})


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
    cancel_after: float | None = None  # the create's Cancel-After, in seconds from `created`
    deployment: str | None = None  # the deployment (`owner/name`) that created it

    def deadline_time(self) -> float | None:
        return None if self.cancel_after is None else self.created + self.cancel_after

    def _ending(self) -> tuple[float, str] | None:
        """When it ends and how: a cancel, its own end (which wins a tie), or its deadline."""
        start = self.created + self.queue_s
        endings = []
        if self.canceled_at is not None:
            endings.append((self.canceled_at, "canceled"))
        if self.run_s is not None:
            endings.append((start + self.run_s, "failed" if self.error else "succeeded"))
        deadline = self.deadline_time()
        if deadline is not None:
            endings.append((deadline, "aborted" if deadline <= start else "canceled"))
        return min(endings, key=lambda ending: ending[0]) if endings else None

    def start_time(self) -> float | None:
        """Return when it started processing, or None if it was canceled or aborted before."""
        start = self.created + self.queue_s
        ending = self._ending()
        if ending is not None and (ending[1] == "aborted" or ending[0] < start):
            return None
        return start

    def terminal_time(self) -> float | None:
        ending = self._ending()
        return None if ending is None else ending[0]

    def status(self, now: float) -> str:
        ending = self._ending()
        if ending is not None and now >= ending[0]:
            return ending[1]
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
            "cancel_after": self.cancel_after,
            "deadline_clock": self.deadline_time(),
            "error": self.error,
            "source": self.source,
            "deployment": self.deployment,
            "num_outputs": 0 if self.empty else self.n_outputs,
            # What Replicate bills: the prediction's metrics.predict_time once it ended.
            "billed_seconds": (round(end - start, 6) if start is not None else 0.0)
            if ended and end is not None else None,
        }
