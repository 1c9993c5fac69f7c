"""What every API and output-file request passes through before and after its view: injected
faults, auth, the per-account token buckets (429s), rate-limit headers, the request log, and
the answers to errors."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
from collections import deque
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from replicate_generation.devtools.simulator.config import UNKNOWN_TOKEN_PREFIX, Shared
from replicate_generation.devtools.simulator.faults import Faults, fault_response
from replicate_generation.devtools.simulator.ledger import Ledger, token_hash
from replicate_generation.devtools.simulator.web import (
    INTERNAL_ERROR,
    NOT_FOUND,
    UNAUTHENTICATED,
    ApiError,
    problem_response,
    request_token,
    throttle_response,
)

_CREATE_PATH = re.compile(r"^/v1/(?:(?:models|deployments)/[^/]+/[^/]+/)?predictions/?$")
_LOG_LIMIT = 200_000


def _is_simulated_path(path: str) -> bool:
    """Tell API and output-file paths (logged, injectable) from the /_sim control surface."""
    return path.startswith("/v1/") or path.startswith("/_sim/outputs/")


def _shut_client_socket() -> None:
    """Shut the client's socket so it gets no answer (httpx: RemoteProtocolError).

    Werkzeug then drops the response quietly; a WSGI transport has no socket, so it gets the 444.
    """
    conn = request.environ.get("werkzeug.socket")
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


class Gate:
    """The request hooks and error handlers of the app, and the request log they keep."""

    def __init__(self, shared: Shared, ledger: Ledger, faults: Faults) -> None:
        self._shared = shared
        self._ledger = ledger
        self._faults = faults
        self._log: deque[dict[str, Any]] = deque(maxlen=_LOG_LIMIT)

    def add_to(self, app: Flask) -> None:
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(ApiError, self._on_api_error)
        app.register_error_handler(HTTPException, _on_http_error)

    def clear_locked(self) -> None:
        self._log.clear()

    def requests_log(self) -> list[dict[str, Any]]:
        """Return every API/output request seen: method, path, token_hash, json, status..."""
        with self._shared.lock:
            return [dict(entry) for entry in self._log]

    def _before_request(self) -> Response | None:
        """Apply injected faults, auth and the token buckets before any API view runs."""
        if not _is_simulated_path(request.path):
            return None
        g.arrived = self._shared.now()
        g.arrived_real = time.monotonic()  # Prefer-wait windows are real seconds
        token = request_token()
        g.token_hash = token_hash(token) if token else None
        fault = self._take_fault(request.method, request.path, g.token_hash)
        if fault is not None:
            g.injected = True
            return fault
        if not request.path.startswith("/v1/"):
            return None  # output files: auth is optional and checked by the view
        if token is None or self._token_invalid(token, request.path):
            return problem_response(401, UNAUTHENTICATED)
        return self._throttle(
            g.token_hash, _CREATE_PATH.match(request.path) is not None and request.method == "POST"
        )

    def _token_invalid(self, token: str, path: str) -> bool:
        """Unknown tokens are refused everywhere; revoked ones everywhere but the account check."""
        if token.startswith(UNKNOWN_TOKEN_PREFIX):
            return True
        with self._shared.lock:
            config = self._shared.config
            if token in config.unknown_tokens:
                return True
            return token in config.invalid_tokens and path != "/v1/account"

    def _throttle(self, key: str, create: bool) -> Response | None:
        """Take a token from the create or the other bucket; answer 429 when it is empty."""
        with self._shared.lock:
            account, cfg = self._ledger.account_locked(key), self._shared.config
            bucket, rate, burst = account.bucket_for(cfg, create)
            wait = bucket.take(self._shared.now(), rate, burst)
            g.ratelimit = bucket.headers(rate, burst)
            if wait == 0.0:
                if not create:  # accepted creates are counted when the prediction exists
                    account.counters["other_calls"] += 1
                return None
            account.counters["creates_throttled" if create else "other_throttled"] += 1
            seconds = max(1, math.ceil(wait - 1e-9))
            return throttle_response(
                seconds, in_header=cfg.retry_after_header, in_body=cfg.retry_after_body
            )

    def _take_fault(self, method: str, path: str, key: str | None) -> Response | None:
        """Consume the first matching injected fault, if any, and build its response."""
        with self._shared.lock:
            fault = self._faults.take_locked(method, path)
            if fault is None:
                return None
            self._ledger.count_locked(key, "injected")
            return fault_response(fault, self._shared.config)

    def _after_request(self, response: Response) -> Response:
        """Add the rate-limit headers and record the request."""
        if not _is_simulated_path(request.path):
            return response
        if request.path.startswith("/v1/"):
            remaining, reset = g.get("ratelimit") or (self._shared.config.other_burst, 1)
            response.headers["ratelimit-remaining"] = str(remaining)
            response.headers["ratelimit-reset"] = str(reset)
        entry = {
            "t": g.get("arrived", self._shared.now()),
            "method": request.method,
            "path": request.path,
            "query": request.query_string.decode(errors="replace"),
            "token_hash": g.get("token_hash"),
            "json": request.get_json(silent=True),
            "prefer": request.headers.get("Prefer"),
            "cancel_after": request.headers.get("Cancel-After"),
            "status": response.status_code,
            "injected": bool(g.get("injected", False)),
            "create_fault": g.get("create_fault"),
        }
        with self._shared.lock:
            self._log.append(entry)
        if entry["create_fault"] == "drop":
            _shut_client_socket()  # only now: the client's next request must be logged after this
        return response

    def _on_api_error(self, error: ApiError) -> Response:
        if request.method == "POST" and _CREATE_PATH.match(request.path):
            with self._shared.lock:
                self._ledger.count_locked(g.get("token_hash"), "creates_rejected")
        return problem_response(error.status, error.body)


def _on_http_error(error: HTTPException) -> Response:
    status = error.code or 500
    if status == 404:
        return problem_response(404, NOT_FOUND)
    detail = INTERNAL_ERROR["detail"] if status >= 500 else error.description
    return problem_response(status, {"detail": detail, "status": status})
