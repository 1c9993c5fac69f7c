"""Checks on a create's body and input, answering with Replicate's real 400 and 422 bodies."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from replicate_generation.devtools.simulator.catalogue import ModelSpec
from replicate_generation.devtools.simulator.schema_models import input_errors
from replicate_generation.devtools.simulator.web import (
    ApiError,
    field_error,
    json_type,
    validation_problem,
)

MODEL_BODY_KEYS = frozenset(
    {"input", "webhook", "webhook_completed", "webhook_events_filter", "stream"}
)
VERSION_BODY_KEYS = MODEL_BODY_KEYS | {"version"}


def create_body(allowed: frozenset[str], *, required: tuple[str, ...]) -> dict[str, Any]:
    """Parse a create body; 400 for bad JSON, 422 for missing/unknown top-level keys."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, {"detail": "JSON parse error", "status": 400}) from None
    if not isinstance(body, dict):
        error = f"Invalid type. Expected: object, given: {json_type(body)}"
        raise ApiError(422, validation_problem([field_error("invalid_type", "", error)]))
    errors = [
        field_error("required", "", f"{key} is required") for key in required if key not in body
    ]
    errors += [
        field_error(
            "additional_property_not_allowed", "", f"Additional property {key} is not allowed"
        )
        for key in sorted(set(body) - allowed)
    ]
    if "input" in body and not isinstance(body["input"], dict):
        given = json_type(body["input"])
        errors.append(
            field_error("invalid_type", "input", f"Invalid type. Expected: object, given: {given}")
        )
    if errors:
        raise ApiError(422, validation_problem(errors))
    return body


def check_input(spec: ModelSpec, inp: dict[str, Any]) -> None:
    """Validate the fields the simulator models: prompt, output_format, num_outputs."""
    errors: list[dict[str, str]] = []
    if "prompt" not in inp:
        errors.append(field_error("required", "input", "prompt is required"))
    elif not isinstance(inp["prompt"], str):
        given = json_type(inp["prompt"])
        errors.append(
            field_error(
                "invalid_type", "input.prompt", f"Invalid type. Expected: string, given: {given}"
            )
        )
    fmt = inp.get("output_format")
    if "output_format" in inp and spec.formats and fmt not in spec.formats:
        allowed = ", ".join(f'"{f}"' for f in spec.formats)
        errors.append(
            field_error(
                "enum",
                "input.output_format",
                f"output_format must be one of the following: {allowed}",
            )
        )
    errors += _num_outputs_errors(inp)
    if errors:
        raise ApiError(422, validation_problem(errors))


def _num_outputs_errors(inp: dict[str, Any]) -> list[dict[str, str]]:
    if "num_outputs" not in inp:
        return []
    value = inp["num_outputs"]
    name = "input.num_outputs"
    if not isinstance(value, int) or isinstance(value, bool):
        return [
            field_error(
                "invalid_type", name, f"Invalid type. Expected: integer, given: {json_type(value)}"
            )
        ]
    if value > 4:
        return [field_error("number_lte", name, "Must be less than or equal to 4")]
    if value < 1:
        return [field_error("number_gte", name, "Must be greater than or equal to 1")]
    return []


def check_schema_input(spec: ModelSpec, version: str, inp: dict[str, Any]) -> None:
    """422 for what the model's own schema refuses (unknown fields are dropped silently)."""
    errors = [field_error(kind, f"input.{name}", f"{name}: {kind}")
              for name, kind in input_errors(spec.ref, version, inp)]
    if errors:
        raise ApiError(422, validation_problem(errors))
