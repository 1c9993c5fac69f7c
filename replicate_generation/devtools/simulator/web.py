"""Replicate's exact error bodies and the Flask helpers every route uses: JSON and problem+json
answers, the 429 answer, the caller's token and origin."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Response, request
from werkzeug.http import HTTP_STATUS_CODES

from replicate_generation.devtools.simulator.hostile import expand

UNAUTHENTICATED: dict[str, Any] = {
    "title": "Unauthenticated",
    "detail": "You did not pass a valid authentication token",
    "status": 401,
}
INSUFFICIENT_CREDIT: dict[str, Any] = {
    "title": "Insufficient credit",
    "detail": (
        "You have insufficient credit to run this model. Go to "
        "https://replicate.com/account/billing#billing to purchase credit. Once you purchase "
        "credit, please wait a few minutes before trying again."
    ),
    "status": 402,
}
NOT_FOUND: dict[str, Any] = {"detail": "The requested resource could not be found.", "status": 404}
INVALID_VERSION: dict[str, Any] = {
    "title": "Invalid version or not permitted",
    "detail": (
        "The specified version does not exist (or perhaps you don't have permission to use it?)"
    ),
    "status": 422,
}
FILE_NOT_FOUND: dict[str, Any] = {"detail": "File not found"}
FILE_TOO_BIG: dict[str, Any] = {"detail": "Files must be less than 100MB in size"}
INTERNAL_ERROR: dict[str, Any] = {"detail": "Internal server error"}


class ApiError(Exception):
    """Raised by a view to answer with a problem+json body (and count rejected creates)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def field_error(kind: str, name: str, description: str) -> dict[str, str]:
    return {"type": kind, "field": name, "description": description}


def validation_problem(errors: list[dict[str, str]]) -> dict[str, Any]:
    """Build the real 422 "Input validation failed" body from its invalid fields."""
    detail = "".join(f"- {e['field'] or '(root)'}: {e['description']}\n" for e in errors)
    return {
        "detail": detail,
        "status": 422,
        "title": "Input validation failed",
        "invalid_fields": errors,
    }


def default_problem(status: int) -> dict[str, Any]:
    if status == 500:
        return INTERNAL_ERROR
    return {"detail": HTTP_STATUS_CODES.get(status, "Error"), "status": status}


def json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def json_response(
    status: int, body: Any, headers: Mapping[str, str] | None = None, *, problem: bool = False
) -> Response:
    mimetype = "application/problem+json" if problem else "application/json"
    text = expand(json.dumps(body, separators=(",", ":")))
    response = Response(text, status, mimetype=mimetype)
    response.headers.update(headers or {})
    return response


def problem_response(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    """Return an RFC 7807 error; always an object, because the client calls .get() on it."""
    return json_response(status, body, headers, problem=True)


def throttle_response(seconds: int, *, in_header: bool, in_body: bool) -> Response:
    """Return the real 429 body (and Retry-After header), as the knobs ask."""
    body: dict[str, Any] = {
        "detail": f"Request was throttled. Your rate limit resets in ~{seconds}s.",
        "status": 429,
    }
    if in_body:
        body["retry_after"] = seconds
    return problem_response(429, body, {"Retry-After": str(seconds)} if in_header else None)


def _bearer_token(header: str) -> str | None:
    """Extract the token of ``Bearer <t>`` or ``Token <t>`` (both are accepted by the API)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token") or not value.strip():
        return None
    return value.strip()


def request_token() -> str | None:
    return _bearer_token(request.headers.get("Authorization", ""))


def base_url() -> str:
    """Return the origin the caller used, so URLs we hand out work from its side."""
    return request.host_url.rstrip("/")
