"""The one JSON error shape, `{"error": message, ...}`, and the handlers that answer every
exception a request can raise with it, at the status and headers that exception means."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation.errors import (
    AccountStoreFull,
    BudgetExceeded,
    ExpandedRequestTooLarge,
    GenerationError,
    InvalidName,
    InvalidRequest,
    InvalidWebhook,
    QueueFull,
    SchemaUnavailable,
    ShuttingDown,
    StoreBusy,
    StoreUnavailable,
    TokenRejected,
)

STATUS_BY_KIND = {"deadline_exceeded": 504, "expired": 504, "shutting_down": 503,
                  "storage_error": 507, "internal_error": 500}
# The longest error message answered.
MAX_ERROR_CHARS = 2000

log = logging.getLogger(__name__)
Answer = tuple[Response, int, dict[str, str]]


class ApiError(Exception):
    """An error answered with the one JSON error shape."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None,
                 **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.extra = extra


def error_body(message: str, **extra: object) -> dict[str, object]:
    if len(message) > MAX_ERROR_CHARS:  # a message may quote what a schema or upstream wrote
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message):,} characters in all)"
    return {"error": message, **extra}


def error_response(status: int, message: str) -> Response:
    """The shape for a route that answers an error itself instead of raising one."""
    response = jsonify(error_body(message))
    response.status_code = status
    return response


def register(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.register_error_handler(StoreBusy, _store_busy)
    app.register_error_handler(StoreUnavailable, _store_unavailable)
    app.register_error_handler(ExpandedRequestTooLarge, _expanded_too_large)
    app.register_error_handler(SchemaUnavailable, _schema_unavailable)
    app.register_error_handler(AccountStoreFull, _account_store_full)
    app.register_error_handler(BudgetExceeded, _budget_exceeded)


def _api_error(exc: ApiError) -> Answer:
    return jsonify(error_body(str(exc), **exc.extra)), exc.status, exc.headers


def _http_error(exc: HTTPException) -> WerkzeugResponse:
    """Werkzeug's own errors (404, 405, 413...) in our shape, keeping their headers."""
    response = exc.get_response()
    response.set_data(jsonify(error_body(exc.description or exc.name)).get_data())
    response.content_type = "application/json"
    return response


def _token_rejected(exc: TokenRejected) -> Answer:
    """401 for a user's own token (theirs to fix); 503 when it is the server's token."""
    caller = g.get("caller")
    status = 503 if caller is not None and caller.admin else 401
    return (jsonify(error_body(str(exc), error_type=exc.kind)), status,
            {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})


def _store_busy(exc: StoreBusy) -> Answer:
    """The state file stayed locked past the wait a request may take: nothing half done."""
    return (jsonify(error_body(str(exc), error_type="store_busy")), 503,
            {"Retry-After": str(exc.retry_after)})


def _store_unavailable(exc: StoreUnavailable) -> Answer:
    """Redis or PostgreSQL is down: nothing was created; waiting work keeps its place."""
    return (jsonify(error_body(str(exc), error_type="dependency_unavailable",
                               dependency=exc.dependency)), 503,
            {"Retry-After": str(exc.retry_after)})


def _schema_unavailable(exc: SchemaUnavailable) -> Answer:
    """A non-curated model's schema could not be fetched: nothing was created."""
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.retry_after else {}
    return jsonify(error_body(str(exc), error_type="schema_unavailable")), exc.status, headers


def _account_store_full(exc: AccountStoreFull) -> Answer:
    """The account keeps all it may: 429 until its old jobs leave, 413 for a job too big ever."""
    headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after else {}
    return (jsonify(error_body(str(exc), error_type="account_store_full")), exc.status,
            headers)


def _budget_exceeded(exc: BudgetExceeded) -> Answer:
    """402: the request's most possible cost does not fit the key's budget; nothing stored."""
    return (jsonify(error_body(str(exc), error_type="budget_exceeded",
                               budget_usd=exc.budget_usd, budget_period=exc.period,
                               remaining_usd=exc.remaining_usd,
                               required_usd=exc.required_usd)), 402, {})


def _expanded_too_large(exc: ExpandedRequestTooLarge) -> Answer:
    return jsonify(error_body(str(exc), limit=exc.limit, expanded_bytes=exc.size)), 413, {}


def _unexpected_error(exc: Exception) -> Answer:
    """The errors without a handler of their own; anything else is a logged 500."""
    if isinstance(exc, InvalidRequest):
        return jsonify(error_body(str(exc), field=exc.field, **exc.extra)), 400, {}
    if isinstance(exc, InvalidName | InvalidWebhook):
        return jsonify(error_body(str(exc), field=exc.field)), 400, {}
    if isinstance(exc, QueueFull):
        kind = "account_queue_full" if exc.scope == "account" else "queue_full"
        return (jsonify(error_body(str(exc), error_type=kind)), 429,
                {"Retry-After": str(int(exc.retry_after))})
    if isinstance(exc, TokenRejected):
        return _token_rejected(exc)
    if isinstance(exc, ShuttingDown):
        return jsonify(error_body("The service is shutting down")), 503, {"Retry-After": "10"}
    if isinstance(exc, GenerationError):
        return (jsonify(error_body(str(exc), error_type=exc.kind)),
                STATUS_BY_KIND.get(exc.kind, 502), {})
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(error_body("Internal error; it has been logged")), 500, {}
