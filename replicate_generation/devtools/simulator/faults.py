"""Injected faults: canned answers for the next requests that match a path, and create faults
that lose the answer to a create that succeeded (dropped, 502, garbage, held)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flask import Response

from replicate_generation.devtools.simulator.config import Shared, SimConfig
from replicate_generation.devtools.simulator.web import (
    default_problem,
    problem_response,
    throttle_response,
)

# What Cloudflare answers when the origin behind it fails (the API reference's "gateway").
CLOUDFLARE_502_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# Faults that hit a create after the prediction exists (see Simulator.inject_create_fault).
CREATE_FAULT_KINDS = ("drop", "502", "garbage", "hold")
# Longer than any read timeout the client sets (wait + 0.5 s, at most 60.5 s).
DEFAULT_HOLD_S = 65.0


@dataclass
class Fault:
    method: str  # upper case, or "*"
    pattern: re.Pattern[str]
    status: int
    body: dict[str, Any] | str | None
    headers: dict[str, str]
    remaining: int


@dataclass
class CreateFault:
    """A fault for the next ``remaining`` accepted creates (of one token hash, or of all)."""

    kind: str  # one of CREATE_FAULT_KINDS
    key: str | None
    remaining: int
    body: str | None  # 502 page or garbage body; None: the default for the kind
    hold_seconds: float


class Faults:
    """The pending faults; ``take_*_locked`` consume them and need the lock."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._faults: list[Fault] = []
        self._create_faults: list[CreateFault] = []

    def clear_locked(self) -> None:
        self._faults.clear()
        self._create_faults.clear()

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` matching requests with this response instead."""
        fault = Fault(
            method=method.upper(),
            pattern=re.compile(path_regex),
            status=status,
            body=body,
            headers=dict(headers or {}),
            remaining=count,
        )
        with self._shared.lock:
            self._faults.append(fault)

    def add_create_fault(
        self, kind: str, count: int, key: str | None, body: str | None, hold_seconds: float
    ) -> None:
        """Aim a create fault at the next ``count`` creates of account ``key`` (None: any)."""
        if kind not in CREATE_FAULT_KINDS:
            raise ValueError(f"unknown create fault {kind!r}: use one of {CREATE_FAULT_KINDS}")
        if count < 1:
            raise ValueError("count must be at least 1")
        fault = CreateFault(kind, key, count, body, float(hold_seconds))
        with self._shared.lock:
            self._create_faults.append(fault)

    def take_locked(self, method: str, path: str) -> Fault | None:
        """Consume the first injected fault that matches this request, if any."""
        for fault in self._faults:
            if fault.method in ("*", method) and fault.pattern.search(path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def take_create_locked(self, key: str) -> CreateFault | None:
        """Consume the first create fault aimed at this token (or at every token)."""
        for fault in self._create_faults:
            if fault.key in (None, key):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._create_faults.remove(fault)
                return fault
        return None


def fault_response(fault: Fault, config: SimConfig) -> Response:
    """Build the answer of an injected fault; a bare 429 looks like a real throttle."""
    if fault.status == 429 and fault.body is None:
        given = fault.headers.get("Retry-After", "1")
        seconds = int(given) if given.isdigit() else 1
        response = throttle_response(
            seconds,
            in_header=config.retry_after_header,
            in_body=config.retry_after_body,
        )
    elif isinstance(fault.body, str):
        response = Response(fault.body, fault.status, mimetype="text/html")
    elif fault.body is None and fault.status in (502, 503, 504):
        response = Response(b"", fault.status)  # gateway errors: empty body, like Cloudflare
    elif fault.body is None:
        response = problem_response(fault.status, default_problem(fault.status))
    else:
        response = problem_response(fault.status, fault.body)
    response.headers.update(fault.headers)
    return response
