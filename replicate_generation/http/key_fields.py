"""What the admin may set on an issued key, read strictly from a request body: each field's type
and range, unknown fields refused, times as ISO 8601 in the future; and a key as JSON."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any

from replicate_generation.errors import InvalidRequest
from replicate_generation.jobs.keys import BUDGET_PERIODS, SETTABLE, IssuedKey

# Printable, no leading or trailing space: names appear in logs, the ledger and CSV exports.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,62}[A-Za-z0-9._-]$|^[A-Za-z0-9]$")
_MODEL_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}$")
MAX_MODELS = 100
MAX_WEIGHT = 1000.0
MAX_BUDGET_USD = 1_000_000.0
MAX_GRACE_SECONDS = 7 * 24 * 3600
DEFAULT_GRACE_SECONDS = 3600


def key_fields(body: dict[str, Any], *, minting: bool) -> dict[str, Any]:
    """The settable fields the body names, checked; a 400 naming the first bad one."""
    unknown = sorted(set(body) - set(SETTABLE))
    if unknown:
        raise InvalidRequest(unknown[0], f"{unknown[0]} is not a key field; known: "
                             f"{', '.join(SETTABLE)}")
    if minting and "name" not in body:
        raise InvalidRequest("name", "name is required")
    fields = {name: _READERS[name](body[name]) for name in SETTABLE if name in body}
    if fields.get("budget_usd") is not None and fields.get("budget_period") is None and minting:
        fields["budget_period"] = "month"
    return fields


def grace_seconds(body: dict[str, Any]) -> float:
    unknown = sorted(set(body) - {"grace_seconds"})
    if unknown:
        raise InvalidRequest(unknown[0], f"{unknown[0]} is not a rotation field")
    value = body.get("grace_seconds", DEFAULT_GRACE_SECONDS)
    return _number("grace_seconds", value, 0, MAX_GRACE_SECONDS)


def key_body(key: IssuedKey, now: float, secret: str | None = None) -> dict[str, Any]:
    """A key as the API shows it; the secret only in the answer that made it."""
    body: dict[str, Any] = {
        "id": key.id, "object": "key", "name": key.name, "prefix": key.prefix,
        "state": _state(key, now), "budget_usd": key.budget_usd,
        "budget_period": key.budget_period, "max_concurrent": key.max_concurrent,
        "weight": key.weight, "models": None if key.models is None else list(key.models),
        "expires_at": iso(key.expires_at), "created_at": iso(key.created_at),
        "updated_at": iso(key.updated_at), "rotated_at": iso(key.rotated_at),
        "previous_key_valid_until": iso(key.previous_until)
        if key.previous_until is not None and key.previous_until > now else None,
        "revoked_at": iso(key.revoked_at), "allow_unknown_cost": key.allow_unknown_cost,
    }
    if secret is not None:
        body["key"] = secret
    return body


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _state(key: IssuedKey, now: float) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.live(now) else "expired"


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):  # match lets "a\n" through
        raise InvalidRequest("name", "name must be 1-64 letters, digits or ' ._:@/-', starting "
                             "and ending with a letter, digit, '.', '_' or '-'")
    return value


def _budget(value: Any) -> float | None:
    return None if value is None else _number("budget_usd", value, 0, MAX_BUDGET_USD)


def _period(value: Any) -> str | None:
    if value is not None and value not in BUDGET_PERIODS:
        raise InvalidRequest("budget_period",
                             f"budget_period must be one of {', '.join(BUDGET_PERIODS)} or null")
    return value  # type: ignore[no-any-return]


def _max_concurrent(value: Any) -> int | None:
    if value is None:
        return None
    number = _number("max_concurrent", value, 1, 10_000)
    if number != int(number):
        raise InvalidRequest("max_concurrent", "max_concurrent must be a whole number")
    return int(number)


def _weight(value: Any) -> float:
    number = _number("weight", 1.0 if value is None else value, 0, MAX_WEIGHT)
    if number <= 0:
        raise InvalidRequest("weight", f"weight must be above 0 and at most {MAX_WEIGHT:g}")
    return number


def _models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_MODELS
            or not all(isinstance(m, str) and _MODEL_REF.fullmatch(m) for m in value)):
        raise InvalidRequest("models", f"models must be null or a list of 1-{MAX_MODELS} model "
                             "names (a curated name such as flux-dev, or owner/name)")
    return sorted(set(value))


def _expires_at(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidRequest("expires_at", "expires_at must be an ISO 8601 time or null")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("expires_at", "expires_at must be an ISO 8601 time or null") from None
    if moment.tzinfo is None:
        raise InvalidRequest("expires_at", "expires_at must name its time zone (e.g. Z)")
    if moment.year > 9998:  # shown back in UTC, whose calendar ends at 9999-12-31
        raise InvalidRequest("expires_at", "expires_at must be before the year 9999")
    if moment.timestamp() <= time.time():
        raise InvalidRequest("expires_at", "expires_at must be in the future")
    return moment.timestamp()


def _allow_unknown_cost(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest("allow_unknown_cost", "allow_unknown_cost must be true or false")
    return value


def _number(field: str, value: Any, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high):
        raise InvalidRequest(field, f"{field} must be a number from {low:g} to {high:g}")
    return float(value)


_READERS = {"name": _name, "budget_usd": _budget, "budget_period": _period,
            "max_concurrent": _max_concurrent, "weight": _weight, "models": _models,
            "expires_at": _expires_at, "allow_unknown_cost": _allow_unknown_cost}
