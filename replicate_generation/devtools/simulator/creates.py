"""Creating predictions: the three create routes (model, deployment, version), ``Prefer: wait``
holds, ``Cancel-After`` deadlines, and the lost answers of create faults."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from flask import Flask, Response, g, request

from replicate_generation.devtools.simulator.catalogue import (
    SCHEMA_MODELS,
    ModelSpec,
    deployment_release,
    lookup,
    official,
    resolve_version,
)
from replicate_generation.devtools.simulator.config import Shared
from replicate_generation.devtools.simulator.faults import CLOUDFLARE_502_HTML, CreateFault, Faults
from replicate_generation.devtools.simulator.ledger import Ledger
from replicate_generation.devtools.simulator.lifecycle import TERMINAL_STATUSES, Prediction
from replicate_generation.devtools.simulator.rendering import Renderer
from replicate_generation.devtools.simulator.validation import (
    MODEL_BODY_KEYS,
    VERSION_BODY_KEYS,
    check_input,
    check_schema_input,
    create_body,
)
from replicate_generation.devtools.simulator.web import (
    INSUFFICIENT_CREDIT,
    NOT_FOUND,
    ApiError,
    base_url,
    field_error,
    json_response,
    request_token,
    validation_problem,
)

# Answer before the window ends: the client times out at window + 0.5 s, orphaning the prediction.
_WAIT_MARGIN_S = 0.2
_WAIT_POLL_S = 0.02  # how often a held create re-reads a clock that does not run in real time
_WAKE_SLACK_S = 0.001  # sleep this past a known finish time, so the clock has surely reached it
_DROPPED_STATUS = 444  # logged for a dropped create (nginx's "no response"); never sent
_PREFER_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$")
_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"^(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?$")
_BARE_SECONDS = re.compile(rf"^{_NUMBER}$")
MIN_CANCEL_AFTER_S = 5.0  # Replicate's documented minimum deadline


def parse_prefer_wait(header: str | None) -> tuple[int, str] | None:
    """Parse ``Prefer: wait`` / ``wait=N`` into (seconds, Preference-Applied value).

    Bare ``wait`` means 60 s; N is clamped to the documented 1..60.
    """
    for part in (header or "").split(","):
        match = _PREFER_WAIT.match(part)
        if match is None:
            continue
        if match.group(1) is None:
            return 60, "wait"
        seconds = min(max(int(match.group(1)), 1), 60)
        return seconds, f"wait={seconds}"
    return None


def parse_cancel_after(header: str | None) -> float | None:
    """Parse ``Cancel-After`` (``30s``, ``5m``, ``1h30m`` or bare seconds) into seconds.

    Malformed or under 5 s: 422 (the real body for it is unverified; this is the 422 shape).
    """
    if header is None:
        return None
    text = header.strip()
    seconds: float | None = float(text) if _BARE_SECONDS.match(text) else None
    match = _DURATION.match(text)
    if seconds is None and match is not None and any(match.groups()):
        hours, minutes, secs = (float(part or 0) for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None or seconds < MIN_CANCEL_AFTER_S:
        description = (f"Cancel-After must be a duration such as 30s, 5m or 1h30m (or bare "
                       f"seconds) of at least {MIN_CANCEL_AFTER_S:g}s, got {header!r}")
        raise ApiError(422, validation_problem([field_error("cancel_after", "Cancel-After",
                                                            description)]))
    return seconds


class Creates:
    """The create routes; a held create waits on the shared condition, never holding the lock."""

    def __init__(
        self, shared: Shared, ledger: Ledger, faults: Faults, renderer: Renderer
    ) -> None:
        self._shared = shared
        self._ledger = ledger
        self._faults = faults
        self._renderer = renderer

    def add_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route(
            "/v1/models/<owner>/<name>/predictions",
            view_func=self._create_for_model,
            methods=["POST"],
        )
        route(
            "/v1/deployments/<owner>/<name>/predictions",
            view_func=self._create_for_deployment,
            methods=["POST"],
        )
        route("/v1/predictions", view_func=self._create_for_version, methods=["POST"])

    def _create_for_model(self, owner: str, name: str) -> Response:
        """POST /v1/models/{owner}/{name}/predictions: run an official model (a community
        model is a 404 here: it runs by version id)."""
        spec = lookup(f"{owner}/{name}")
        if spec is None or not official(spec):
            raise ApiError(404, NOT_FOUND)
        body = create_body(MODEL_BODY_KEYS, required=("input",))
        return self._create(spec, "hidden", "model", body)

    def _create_for_deployment(self, owner: str, name: str) -> Response:
        """POST /v1/deployments/{owner}/{name}/predictions: its current release's version."""
        release = deployment_release(owner, name)
        if release is None:
            raise ApiError(404, NOT_FOUND)
        body = create_body(MODEL_BODY_KEYS, required=("input",))
        return self._create(*release, "deployment", body, deployment=f"{owner}/{name}")

    def _create_for_version(self) -> Response:
        """POST /v1/predictions: version id, owner/name or owner/name:version."""
        body = create_body(VERSION_BODY_KEYS, required=("version", "input"))
        spec, version = resolve_version(body["version"])
        return self._create(spec, version, "version", body)

    def _create(self, spec: ModelSpec, version: str, source: str, body: dict[str, Any],
                deployment: str | None = None) -> Response:
        """Validate the input, record the prediction and answer (holding it for Prefer: wait)."""
        cancel_after = parse_cancel_after(request.headers.get("Cancel-After"))
        if spec.ref in SCHEMA_MODELS:
            check_schema_input(spec, version, body["input"])
        else:
            check_input(spec, body["input"])
        token = request_token() or ""
        with self._shared.lock:
            no_credit = token in self._shared.config.no_credit_tokens
        if no_credit:
            raise ApiError(402, INSUFFICIENT_CREDIT)
        wait = parse_prefer_wait(request.headers.get("Prefer"))
        base = base_url()
        with self._shared.lock:
            key = g.token_hash
            pred = self._ledger.add_locked(spec, version, source, body["input"], key,
                                           cancel_after, deployment)
            fault = self._faults.take_create_locked(key)
            if fault is not None:
                self._ledger.count_locked(key, "create_faults")
        if fault is not None:
            return self._faulty_create_response(fault, pred, base)
        if wait is None:
            with self._shared.lock:
                return json_response(201, self._renderer.render_locked(pred, base))
        payload = self._hold(pred, wait[0], base)
        return json_response(201, payload, {"Preference-Applied": wait[1]})

    def _faulty_create_response(
        self, fault: CreateFault, pred: Prediction, base: str
    ) -> Response:
        """Lose the answer to a create that succeeded, the way the fault's kind says."""
        g.create_fault = fault.kind
        if fault.kind == "drop":
            return Response(b"", _DROPPED_STATUS)  # the gate shuts the socket, once logged
        if fault.kind == "502":
            return Response(fault.body or CLOUDFLARE_502_HTML, 502, mimetype="text/html")
        if fault.kind == "garbage":
            return self._garbage_response(fault.body, pred, base)
        return self._held_response(pred, fault.hold_seconds, base)

    def _garbage_response(self, body: str | None, pred: Prediction, base: str) -> Response:
        """Answer 201 with a body that is not a prediction (default: the real one, truncated)."""
        if body is None:
            with self._shared.lock:
                full = json.dumps(self._renderer.render_locked(pred, base), separators=(",", ":"))
            body = full[: len(full) // 2]
        mimetype = "text/html" if body.lstrip().startswith("<") else "application/json"
        return Response(body, 201, mimetype=mimetype)

    def _held_response(self, pred: Prediction, seconds: float, base: str) -> Response:
        """Sit on the answer for ``seconds`` of real time (past the read timeout), then send it."""
        deadline = time.monotonic() + seconds
        changed = self._shared.changed
        with changed:
            generation = self._shared.generation
            while self._shared.generation == generation and time.monotonic() < deadline:
                changed.wait(deadline - time.monotonic())
            return json_response(201, self._renderer.render_locked(pred, base))

    def _hold(self, pred: Prediction, seconds: int, base: str) -> dict[str, Any]:
        """Keep a Prefer-wait create open until terminal or the window ends (waiting unlocked).

        It also wakes at the known finish time, or on cancel, configure, wake_waiters, reset, stop.
        """
        deadline = g.get("arrived_real", time.monotonic()) + max(0.0, seconds - _WAIT_MARGIN_S)
        shared = self._shared
        with shared.changed:
            generation = shared.generation
            while shared.generation == generation:
                if pred.status(shared.now()) in TERMINAL_STATUSES:
                    return self._renderer.render_locked(pred, base)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                shared.changed.wait(self._nap_seconds(pred, left))
            as_starting = shared.config.prefer_wait_timeout_status == "starting"
            return self._renderer.render_locked(pred, base, as_starting=as_starting)

    def _nap_seconds(self, pred: Prediction, left: float) -> float:
        """Return how long a held create may wait before it must look at the clock again."""
        if not self._shared.real_time_clock:
            return min(left, _WAIT_POLL_S)  # a fake clock moves without telling us
        end = pred.terminal_time()
        if end is None:
            return left  # hangs: only a cancel (which notifies) or the window ends it
        return min(left, max(0.0, end - self._shared.now()) + _WAKE_SLACK_S)
