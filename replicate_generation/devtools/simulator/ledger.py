"""What the simulator counts: every prediction by id and, per account, token buckets, counters,
create times and in-flight levels. Accounts are keyed by ``token_hash``; raw tokens are never
stored or reported."""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from replicate_generation.devtools.simulator.catalogue import ModelSpec, output_count, output_ext
from replicate_generation.devtools.simulator.config import Shared, SimConfig
from replicate_generation.devtools.simulator.lifecycle import Prediction
from replicate_generation.devtools.simulator.markers import (
    behaviour,
    output_tricks,
    run_seconds_for,
)

# Counters kept per account, on top of the derived figures in _STATS_KEYS.
_COUNTERS = (
    "creates_throttled",
    "creates_rejected",
    "gets",
    "cancels",
    "other_calls",
    "other_throttled",
    "injected",
    "downloads",
    "lists",
    "create_faults",
)
# The order of Simulator.stats(): the brief's keys first, then the extra counters.
_STATS_KEYS = (
    "creates_accepted",
    "creates_throttled",
    "creates_rejected",
    "inflight_now",
    "inflight_peak",
    "max_creates_in_60s",
    "gets",
    "cancels",
    "predictions",
    "other_calls",
    "other_throttled",
    "injected",
    "downloads",
    "lists",
    "create_faults",
)


def token_hash(token: str) -> str:
    """Return the account key for a token; the raw token is never stored or reported."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def new_id() -> str:
    """Return a 26-character lowercase id shaped like Replicate's."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def max_in_window(times: list[float], seconds: float) -> int:
    """Return the most events inside any half-open window [t, t + seconds)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass
class Bucket:
    """A token bucket whose capacity and rate are read from the config at each call."""

    tokens: float
    updated: float

    def take(self, now: float, per_minute: float, burst: int) -> float:
        """Take one token; return 0.0 on success, else the seconds until one is available."""
        per_second = per_minute / 60.0
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(burst), self.tokens + elapsed * per_second)
        self.updated = now
        if self.tokens >= 1.0 - 1e-9:  # tolerate float drift from many small refills
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return 60.0 if per_second <= 0 else (1.0 - self.tokens) / per_second

    def headers(self, per_minute: float, burst: int) -> tuple[int, int]:
        """Return (ratelimit-remaining, ratelimit-reset seconds until full)."""
        per_second = per_minute / 60.0
        missing = max(0.0, burst - self.tokens)
        reset = 60 if per_second <= 0 else max(1, math.ceil(missing / per_second))
        return int(self.tokens + 1e-9), reset


@dataclass
class Account:
    """Everything counted per token hash."""

    create_bucket: Bucket
    other_bucket: Bucket
    create_times: list[float] = field(default_factory=list)
    inflight_at_create: list[tuple[float, int]] = field(default_factory=list)
    active: set[str] = field(default_factory=set)  # ids that may still be in flight
    prediction_ids: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))

    def bucket_for(self, cfg: SimConfig, create: bool) -> tuple[Bucket, float, int]:
        """Return the bucket a request draws from, with its current rate and burst."""
        if create:
            return self.create_bucket, cfg.create_rate_per_minute, cfg.create_burst
        return self.other_bucket, cfg.other_rate_per_minute, cfg.other_burst


class Ledger:
    """Predictions by id and accounts by token hash; methods named ``*_locked`` need the lock."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._seq = 0
        self.predictions: dict[str, Prediction] = {}
        self.accounts: dict[str, Account] = {}

    def clear_locked(self) -> None:
        self.predictions.clear()
        self.accounts.clear()

    def account_locked(self, key: str) -> Account:
        account = self.accounts.get(key)
        if account is None:
            now, cfg = self._shared.now(), self._shared.config
            account = Account(
                create_bucket=Bucket(float(cfg.create_burst), now),
                other_bucket=Bucket(float(cfg.other_burst), now),
            )
            self.accounts[key] = account
        return account

    def count_locked(self, key: str | None, counter: str) -> None:
        if key is not None:
            self.account_locked(key).counters[counter] += 1

    def create_times_locked(self, key: str) -> list[float]:
        account = self.accounts.get(key)
        return list(account.create_times) if account else []

    def inflight_samples_locked(self, key: str) -> list[tuple[float, int]]:
        """Return (clock, in-flight count with the new one) at each accepted create."""
        account = self.accounts.get(key)
        return list(account.inflight_at_create) if account else []

    def _inflight_locked(self, account: Account, now: float) -> int:
        """Count in-flight predictions, dropping the ones that finished from the active set."""
        account.active = {pid for pid in account.active if self.predictions[pid].in_flight(now)}
        return len(account.active)

    def stats_locked(self, key: str) -> dict[str, Any]:
        account = self.accounts.get(key)
        if account is None:
            return dict.fromkeys(_STATS_KEYS, 0)
        derived = {
            "creates_accepted": len(account.create_times),
            "inflight_now": self._inflight_locked(account, self._shared.now()),
            "inflight_peak": max((n for _, n in account.inflight_at_create), default=0),
            "max_creates_in_60s": max_in_window(account.create_times, 60.0),
            "predictions": len(account.prediction_ids),
        }
        return {key: derived.get(key, account.counters.get(key, 0)) for key in _STATS_KEYS}

    def all_stats_locked(self) -> dict[str, dict[str, Any]]:
        return {key: self.stats_locked(key) for key in self.accounts}

    def add_locked(
        self, spec: ModelSpec, version: str, source: str, inp: dict[str, Any], key: str,
        cancel_after: float | None = None, deployment: str | None = None,
    ) -> Prediction:
        """Create the record and count the accepted create with its in-flight level."""
        now, cfg = self._shared.now(), self._shared.config
        prompt = str(inp.get("prompt", ""))
        marked = behaviour(prompt, spec.ref)
        run_s = run_seconds_for(prompt, cfg, seed=inp.get("seed"), model=spec.ref)
        self._seq += 1
        pred = Prediction(
            id=new_id(),
            spec=spec,
            version=version,
            input=dict(inp),
            token_hash=key,
            source=source,
            created=now,
            queue_s=cfg.queue_seconds,
            run_s=None if math.isinf(run_s) else run_s,
            error=marked.error,
            empty=marked.empty,
            n_outputs=output_tricks(prompt).outputs or output_count(spec, inp),
            ext=output_ext(spec, inp),
            seq=self._seq,
            cancel_after=cancel_after,
            deployment=deployment,
        )
        self.predictions[pred.id] = pred
        account = self.account_locked(key)
        inflight = self._inflight_locked(account, now) + 1
        account.active.add(pred.id)
        account.prediction_ids.append(pred.id)
        account.create_times.append(now)
        account.inflight_at_create.append((now, inflight))
        return pred

    def newest_first_locked(self, key: str) -> list[Prediction]:
        account = self.accounts.get(key)
        ids = account.prediction_ids if account else []
        return [self.predictions[pid] for pid in reversed(ids)]

    def inputs_of(self, key: str) -> list[dict[str, Any]]:
        """Return the input of each accepted create of the account, oldest first."""
        with self._shared.lock:
            account = self.accounts.get(key)
            ids = list(account.prediction_ids) if account else []
            return [dict(self.predictions[pid].input) for pid in ids]

    def prompt_counts(self, key: str) -> dict[str, int]:
        """Return how many accepted creates each input prompt got."""
        return dict(Counter(str(inp.get("prompt")) for inp in self.inputs_of(key)))

    def summaries(self, key: str | None) -> list[dict[str, Any]]:
        """Return a summary of every prediction (of one account, if given), oldest first."""
        with self._shared.lock:
            now = self._shared.now()
            return [
                pred.summary(now)
                for pred in self.predictions.values()
                if key is None or pred.token_hash == key
            ]
