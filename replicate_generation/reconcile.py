"""Find out whether a create whose answer was lost made a prediction.

Replicate has no idempotency key: the account's predictions since the intent are listed and
matched by model and input, and only a listing that proves there is none allows a new create."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import replicate

# Replicate's clock and ours may disagree; look this far before the intent.
CLOCK_SKEW_SECONDS = 30.0
# Replicate keeps API inputs in listings for an hour; past that a match is impossible.
INPUT_RETENTION_SECONDS = 3600.0
# Pages of 100: a bound on how far back one lookup may read.
MAX_PAGES = 50


def input_digest(model_input: dict[str, object]) -> str:
    """A stable fingerprint of an input: canonical JSON (sorted keys), SHA-256."""
    canonical = json.dumps(model_input, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Found:
    """The create did make this prediction."""

    prediction_id: str
    status: str


@dataclass(frozen=True)
class Absent:
    """The listing shows no such prediction: creating again pays once."""


@dataclass(frozen=True)
class Unresolvable:
    """Neither proven nor disproven (inputs already dropped from the listing)."""

    reason: str


Lookup = Found | Absent | Unresolvable


@dataclass(frozen=True)
class Intent:
    """What was about to be created, and when (wall clock)."""

    model_ref: str
    input_sha256: str
    at: float


def find_prediction(client: replicate.Client, intent: Intent, *, now: float,
                    exclude: Collection[str], pace: Callable[[], None]) -> Lookup:
    """Look the intent up in the account's listing; `pace` runs before every page."""
    if now - intent.at > INPUT_RETENTION_SECONDS - CLOCK_SKEW_SECONDS:
        return Unresolvable("the create is over an hour old: Replicate no longer lists its input")
    since = _iso(intent.at - CLOCK_SKEW_SECONDS)
    inputless = 0
    for prediction in _listing(client, since, pace):
        if not _made_by(prediction, intent.model_ref) or prediction.get("id") in exclude:
            continue
        listed_input = prediction.get("input")
        if not isinstance(listed_input, dict) or not listed_input:
            inputless += 1
            continue
        if input_digest(listed_input) == intent.input_sha256:
            return Found(str(prediction["id"]), str(prediction.get("status") or "starting"))
    if inputless:
        return Unresolvable(f"{inputless} prediction(s) of {intent.model_ref} since the create "
                            "are listed without their input")
    return Absent()


def _made_by(prediction: dict[str, Any], model_ref: str) -> bool:
    """The listed prediction is of the model (or `deployments/<owner>/<name>`) the intent names."""
    deployment = prediction.get("deployment")
    return prediction.get("model") == model_ref or (
        isinstance(deployment, str) and f"deployments/{deployment}" == model_ref)


def _listing(client: replicate.Client, since: str,
             pace: Callable[[], None]) -> Iterator[dict[str, Any]]:
    """Every listed prediction created after `since`, following `next` page by page."""
    url: str | None = "/v1/predictions"
    params: dict[str, str] | None = {"created_after": since}
    for _page in range(MAX_PAGES):
        if url is None:
            return
        pace()
        body = client._request("GET", url, params=params).json()  # noqa: SLF001
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list):
            raise ValueError("the prediction listing is not a {results: [...]} object")
        yield from (r for r in results if isinstance(r, dict))
        url, params = body.get("next") or None, None  # `next` carries the filter and cursor
    raise ValueError(f"more than {MAX_PAGES} pages of predictions since the create")


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
