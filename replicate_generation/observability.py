"""Request ids and log lines: an X-Request-ID on every response, error body and log line of a
request and of its job (a contextvar), and JSON log lines (LOG_FORMAT=json) for shippers."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from contextvars import ContextVar, Token
from typing import Any

from flask import Flask, Response, g, request

HEADER = "X-Request-ID"
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# gunicorn's own loggers: in JSON mode their lines are objects too.
GUNICORN_LOGGERS = ("gunicorn.error", "gunicorn.access")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request (or job) this thread is working for, if any."""
    return _current.get()


def accept_request_id(raw: str | None) -> str:
    """The caller's id when it is sane (1-128 of [A-Za-z0-9._:-]), else a fresh one."""
    if raw is not None and SANE_ID.match(raw):
        return raw
    return "req_" + secrets.token_hex(12)


def bind_request_id(value: str | None) -> Token[str | None]:
    """Make `value` this context's request id until `unbind_request_id` is given the token."""
    return _current.set(value)


def unbind_request_id(token: Token[str | None] | None = None) -> None:
    """Undo a `bind_request_id`, or (no token) clear the id: pool threads are reused."""
    if token is None:
        _current.set(None)
        return
    try:
        _current.reset(token)
    except ValueError:  # bound in another context (a server that switched them): just clear
        _current.set(None)


# --------------------------------------------------------------------------- logging


class RequestIdFilter(logging.Filter):
    """Give every record a `request_id` attribute ("-" outside any request or job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current.get() or _access_log_id(record) or "-"
        return True


def _access_log_id(record: logging.LogRecord) -> str | None:
    """gunicorn logs access lines after the request ended: its atoms carry the response's id."""
    if record.name == "gunicorn.access" and isinstance(record.args, dict):
        value = record.args.get("{x-request-id}o")
        return value if isinstance(value, str) and SANE_ID.match(value) else None
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "request_id": getattr(record, "request_id", "-"),
            "process": record.process, "thread": record.threadName,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def _iso(created: float) -> str:
    millis = int((created % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def formatter_for(log_format: str) -> logging.Formatter:
    """The formatter LOG_FORMAT asks for."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def install_logging(log_format: str, *, extra_loggers: Iterable[str] = GUNICORN_LOGGERS) -> None:
    """Put the request id on every root handler's lines, formatted as LOG_FORMAT says."""
    handlers = list(logging.getLogger().handlers)
    if log_format == "json":
        for name in extra_loggers:
            handlers.extend(logging.getLogger(name).handlers)
    for handler in handlers:
        for old in [f for f in handler.filters if isinstance(f, RequestIdFilter)]:
            handler.removeFilter(old)
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(formatter_for(log_format))


# --------------------------------------------------------------------------- Flask


def init_app(app: Flask) -> None:
    """Bind an id to every request, echo it in `X-Request-ID` and in JSON error bodies."""
    app.before_request(_bind_for_request)
    app.after_request(_stamp_response)
    app.teardown_request(_unbind_after_request)


def _bind_for_request() -> None:
    request_id = accept_request_id(request.headers.get(HEADER))
    g.request_id = request_id
    g.request_id_token = bind_request_id(request_id)


def _stamp_response(response: Response) -> Response:
    request_id = g.get("request_id") or accept_request_id(None)
    response.headers[HEADER] = request_id
    if response.status_code >= 400 and response.mimetype == "application/json":
        _add_to_error_body(response, request_id)
    return response


def _add_to_error_body(response: Response, request_id: str) -> None:
    """The one error shape carries the request id (a body's own `request_id` is kept)."""
    body = response.get_json(silent=True)
    if isinstance(body, dict) and "error" in body and "request_id" not in body:
        body["request_id"] = request_id
        response.set_data(json.dumps(body, ensure_ascii=True, separators=(",", ":")))


def _unbind_after_request(_exc: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        unbind_request_id(token)
