"""Schemathesis hooks for test_openapi.py (loaded with SCHEMATHESIS_HOOKS): the rules the OpenAPI
document states in prose, because JSON Schema cannot (two arrays of one length, times relative to
now, a reused Idempotency-Key, a deadline the caller set), taught to the fuzzer, and made-up
Replicate tokens refused as Replicate would, and "invalid" bodies the document admits after all
not held against the service. Every other rule is checked as the document says."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import schemathesis
from jsonschema_rs import Draft202012Validator

# The simulator refuses tokens with this mark as never issued (devtools/simulator/gate.py).
NEVER_ISSUED = "r8_unknown_"
USER_KEY = "X-Replicate-API-Key"
# A leap year far ahead: any generated date moved into it is still a date, and in the future.
FUTURE_YEAR = "2996"


@schemathesis.hook("map_case")
def made_up_tokens_are_unknown(context: Any, case: Any) -> Any:
    """A token schemathesis makes up was never issued: Replicate refuses it, but the simulator
    accepts any token it was not told of, so a made-up one carries its never-issued mark."""
    headers = case.headers
    if isinstance(headers, MutableMapping) and isinstance(headers.get(USER_KEY), str):
        headers[USER_KEY] = NEVER_ISSUED + headers[USER_KEY]
    return case


def _valid_body(case: Any, method: str, path: str) -> dict[str, Any] | None:
    """The case's body when it is a valid (positive) one sent to `method` a path like `path`."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and case.method == method and case.path.startswith(path):
        return case.body if isinstance(case.body, dict) else None
    return None


@schemathesis.hook("map_case")
def one_file_name_per_prompt(context: Any, case: Any) -> Any:
    """A valid batch gives as many custom_filenames as prompts: JSON Schema cannot compare the
    lengths of two arrays, so a valid case keeps the first of the longer one."""
    body = _valid_body(case, "POST", "/generate-batch")
    if body is not None:
        names, prompts = body.get("custom_filenames"), body.get("prompts")
        if isinstance(names, list) and isinstance(prompts, list) and names and prompts:
            shortest = min(len(names), len(prompts))
            body["custom_filenames"], body["prompts"] = names[:shortest], prompts[:shortest]
    return case


@schemathesis.hook("map_case")
def expiry_in_the_future(context: Any, case: Any) -> Any:
    """A key's expires_at must be in the future, which JSON Schema cannot say: a valid case
    keeps its generated time, moved to a year ahead."""
    body = _valid_body(case, case.method, "/keys")
    if body is not None and isinstance(body.get("expires_at"), str):
        body["expires_at"] = FUTURE_YEAR + body["expires_at"][4:]
    return case


# Answers the document gives for what only prose can state, by failure code: (status, a key of
# the error body, its value). A fuzzer repeats Idempotency-Keys with new bodies (422); /usage's
# `to` must come after `from`, which defaults to this month's start; a synchronous call past the
# deadline_seconds its caller set answers 504.
DOCUMENTED: dict[str, list[tuple[int, str, str]]] = {
    "ST202": [(422, "field", "Idempotency-Key"), (400, "error", "to must be after from")],
    "ST101": [(504, "error_type", "expired")],
}


@schemathesis.hook("filter_failure")
def documented_answer(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Drop a failure only when the answer is one of the documented ones above."""
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and any(
        response.status_code == status and body.get(key) == value
        for status, key, value in DOCUMENTED.get(failure.code, [])))


@schemathesis.hook("filter_failure")
def mutated_into_another_valid_body(context: Any, failure: Any, case: Any,
                                    response: Any) -> bool:
    """A body mutated to break one model's schema can land on another model's (oneOf), as a
    model_name swapped for a sibling's: if the document admits the body, accepting it is right."""
    if failure.code != "ST201" or not _only_the_body_is_negative(case):
        return True
    return not _document_admits_body(case)


def _only_the_body_is_negative(case: Any) -> bool:
    components = case.meta.components if case.meta is not None else {}
    negative = {location.name for location, info in components.items() if info.mode.is_negative}
    return negative == {"BODY"}


def _document_admits_body(case: Any) -> bool:
    document = case.operation.schema.raw_schema
    media = document["paths"][case.path][case.method.lower()]["requestBody"]["content"]
    root = {**media["application/json"]["schema"], "components": document["components"]}
    return Draft202012Validator(root, validate_formats=True).is_valid(case.body)
