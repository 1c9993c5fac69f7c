"""The limits under their API names (`concurrent_limit` is `max_concurrent` inside): the checks
on a /configure body, and the limits and their sources as the routes show them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replicate_generation.errors import InvalidRequest
from replicate_generation.limits.base import Limits, LimitSource, validate_limit
from replicate_generation.models.validation import as_integer

LIMIT_FIELDS = {"concurrent_limit": "max_concurrent", "requests_per_minute": "requests_per_minute",
                "burst": "burst", "polls_per_minute": "polls_per_minute"}


def overrides_from(body: dict[str, Any]) -> dict[str, int | None]:
    """The fields the body gives, by Limits name; each an int in range, or None to clear it."""
    unknown = sorted(set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], f"Unknown setting '{unknown[0][:100]}'; allowed: "
                             + ", ".join(LIMIT_FIELDS))
    if not body:
        raise InvalidRequest("concurrent_limit", "Give at least one of " + ", ".join(LIMIT_FIELDS))
    changes: dict[str, int | None] = {}
    for name, given in body.items():
        value = as_integer(given)  # JSON Schema counts 30.0 as the integer 30
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(name, f"{name} must be an integer, or null to clear it")
        if value is not None:
            try:
                validate_limit(LIMIT_FIELDS[name], value)
            except ValueError as exc:
                raise InvalidRequest(name, str(exc).replace(LIMIT_FIELDS[name], name)) from None
        changes[LIMIT_FIELDS[name]] = value
    return changes


def effective(sources: Mapping[str, LimitSource]) -> Limits:
    """The limits in force, whatever set each one."""
    return Limits(**{name: source.value for name, source in sources.items()})


def sources_view(sources: Mapping[str, LimitSource]) -> dict[str, dict[str, Any]]:
    return {public: sources[name].as_dict() for public, name in LIMIT_FIELDS.items()}


def limits_view(limits: Limits) -> dict[str, int]:
    return {"concurrent_limit": limits.max_concurrent,
            "requests_per_minute": limits.requests_per_minute,
            "burst": limits.burst, "polls_per_minute": limits.polls_per_minute}
