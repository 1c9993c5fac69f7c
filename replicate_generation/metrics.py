"""Prometheus metrics: events counted where they happen (across gunicorn workers), state read from
the shared stores at scrape time. Labels never name an account, a token or a prompt."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the limiter records into this module: no import cycle at run time
    from replicate_generation.limits.base import AccountStats

__all__ = ["CONTENT_TYPE_LATEST", "StateCollector", "render"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_STATES = ("queued", "running", "succeeded", "partially_failed", "failed", "canceled")
ITEM_STATES = ("queued", "running", "succeeded", "failed", "canceled", "expired")
RUN_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

PREDICTIONS_CREATED = Counter(
    "replicate_generation_predictions_created", "Predictions Replicate accepted.", ["model"])
PREDICTIONS_FINISHED = Counter(
    "replicate_generation_predictions_finished",
    "Predictions that ended, by how (succeeded, failed, canceled, aborted, deadline_exceeded).",
    ["model", "outcome"])
PREDICTION_SECONDS = Histogram(
    "replicate_generation_prediction_seconds",
    "Seconds from sending a create to seeing the prediction end.", ["model"],
    buckets=RUN_BUCKETS)
REPLICATE_REQUESTS = Counter(
    "replicate_generation_replicate_requests",
    "HTTP calls to Replicate's API, by endpoint and status class (error: no answer).",
    ["endpoint", "status_class"])
REPLICATE_THROTTLED = Counter(
    "replicate_generation_replicate_throttled", "429 answers from Replicate.", ["endpoint"])
BACKOFF_SECONDS = Counter(
    "replicate_generation_backoff_seconds", "Seconds of shared back-off started by 429s.")
LIMITER_WAIT = Histogram(
    "replicate_generation_limiter_wait_seconds",
    "Seconds spent waiting for a concurrency slot, a create token or a poll token.", ["kind"],
    buckets=WAIT_BUCKETS)
FALLBACKS = Counter(
    "replicate_generation_fallbacks", "Tasks that moved down their fallback chain.",
    ["from_model", "to_model"])
WEBHOOK_DELIVERIES = Counter(
    "replicate_generation_webhook_deliveries",
    "Webhook delivery attempts by outcome (delivered, retrying, failed).", ["outcome"])
COST_USD = Counter(
    "replicate_generation_cost_usd", "Estimated cost of finished predictions in USD.", ["model"])
# By caller: "admin", an issued key's name, or "user" (users' own tokens, never one label each).
SPEND_USD = Counter(
    "replicate_generation_spend_usd", "Settled cost of finished items in USD, by caller.",
    ["caller", "model"])
SPEND_PREDICTIONS = Counter(
    "replicate_generation_spend_predictions",
    "Finished items that made a prediction, by caller.", ["caller", "model"])

# Replicate's API paths, as endpoint names; anything else counts as "other".
_ENDPOINTS = (
    ("POST", re.compile(r"^/v1/(models/[^/]+/[^/]+/|deployments/[^/]+/[^/]+/)?predictions$"),
     "predictions.create"),
    ("GET", re.compile(r"^/v1/predictions$"), "predictions.list"),
    ("GET", re.compile(r"^/v1/predictions/[^/]+$"), "predictions.get"),
    ("POST", re.compile(r"^/v1/predictions/[^/]+/cancel$"), "predictions.cancel"),
)


# --------------------------------------------------------------------------- recording


def endpoint_of(method: str, path: str) -> str:
    """A bounded name for a Replicate API call (never its ids)."""
    for wanted, pattern, name in _ENDPOINTS:
        if method == wanted and pattern.match(path):
            return name
    return "other"


def observe_replicate_call(send: Callable[[httpx.Request], httpx.Response],
                           request: httpx.Request) -> httpx.Response:
    """Send one request to Replicate and count it by endpoint and status class."""
    endpoint = endpoint_of(request.method, request.url.path)
    try:
        response = send(request)
    except Exception:
        REPLICATE_REQUESTS.labels(endpoint, "error").inc()
        raise
    REPLICATE_REQUESTS.labels(endpoint, f"{response.status_code // 100}xx").inc()
    if response.status_code == 429:
        REPLICATE_THROTTLED.labels(endpoint).inc()
    return response


def prediction_created(model: str) -> None:
    PREDICTIONS_CREATED.labels(model).inc()


def prediction_finished(model: str, outcome: str, seconds: float) -> None:
    PREDICTIONS_FINISHED.labels(model, outcome).inc()
    PREDICTION_SECONDS.labels(model).observe(max(0.0, seconds))


def backoff_started(seconds: float) -> None:
    BACKOFF_SECONDS.inc(max(0.0, seconds))


def limiter_waited(kind: str, started: float) -> None:
    """Record a limiter wait that began at `started` (time.monotonic())."""
    LIMITER_WAIT.labels(kind).observe(max(0.0, time.monotonic() - started))


def fell_back(from_model: str, to_model: str) -> None:
    FALLBACKS.labels(from_model, to_model).inc()


def webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def cost(model: str, usd: float | None) -> None:
    if usd:
        COST_USD.labels(model).inc(usd)


def spend(caller: str, model: str, usd: float | None) -> None:
    """An item that made a prediction settled; `caller` is a name, never a secret."""
    SPEND_PREDICTIONS.labels(caller, model).inc()
    if usd:
        SPEND_USD.labels(caller, model).inc(usd)


# --------------------------------------------------------------------------- state


class LimitStats(Protocol):
    def stats(self, account: str | None = None) -> list[AccountStats]: ...


class JobCounts(Protocol):
    def state_counts(self) -> tuple[dict[str, int], dict[str, int]]: ...


class StateCollector(Collector):
    """Gauges read from the shared state file at scrape time: the same from every worker."""

    def __init__(self, limits: LimitStats, jobs: JobCounts) -> None:
        self._limits = limits
        self._jobs = jobs

    def describe(self) -> list[Metric]:
        return []  # registered per scrape: no up-front collect (and its queries) needed

    def collect(self) -> Iterator[Metric]:
        stats = self._limits.stats()
        yield _gauge("leases_in_flight", "Predictions holding a concurrency slot.",
                     sum(s.in_flight for s in stats))
        yield _gauge("limiter_waiters", "Callers waiting for a concurrency slot.",
                     sum(s.waiting for s in stats))
        yield _gauge("creates_last_minute", "Creates whose token fell in the last 60 s.",
                     sum(s.creates_last_minute for s in stats))
        yield _gauge("accounts_backing_off", "Accounts in a shared 429 back-off.",
                     sum(1 for s in stats if s.backoff_remaining > 0))
        jobs, items = self._jobs.state_counts()
        yield _by_state("jobs", "Jobs in the state file by state.", JOB_STATES, jobs)
        yield _by_state("job_items", "Job items in the state file by state.", ITEM_STATES, items)
        yield _gauge("queue_depth", "Items queued and not started, across every process.",
                     items.get("queued", 0))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"replicate_generation_{name}", documentation, value=value)


def _by_state(name: str, documentation: str, states: tuple[str, ...],
              counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"replicate_generation_{name}", documentation, labels=["state"])
    for state in sorted(set(states) | set(counts)):
        family.add_metric([state], counts.get(state, 0))
    return family


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render(state: StateCollector) -> bytes:
    """The text exposition: events (of every worker in multiprocess mode), then state."""
    if multiprocess_mode():
        events = CollectorRegistry()
        multiprocess.MultiProcessCollector(events)  # type: ignore[no-untyped-call]
    else:
        events = REGISTRY
    state_registry = CollectorRegistry()
    state_registry.register(state)
    return generate_latest(events) + generate_latest(state_registry)
