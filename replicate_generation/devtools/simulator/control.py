"""The ``/_sim/`` control surface: what tests do with ``Simulator``'s methods, over HTTP, for
other processes (benchmarks, the demo): stats, create times, config, faults, reset, logs."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from flask import Flask, Response, request

from replicate_generation.devtools.simulator.catalogue import MODELS
from replicate_generation.devtools.simulator.config import TOKEN_SET_FIELDS, Shared, SimConfig
from replicate_generation.devtools.simulator.faults import DEFAULT_HOLD_S, Faults
from replicate_generation.devtools.simulator.gate import Gate
from replicate_generation.devtools.simulator.ledger import Ledger, max_in_window, token_hash
from replicate_generation.devtools.simulator.web import json_response, problem_response


def _config_json(config: SimConfig) -> dict[str, Any]:
    """Return the config as JSON; token sets are shown as hashes, never raw."""
    out: dict[str, Any] = {}
    for f in fields(SimConfig):
        value = getattr(config, f.name)
        out[f.name] = sorted(token_hash(t) for t in value) if f.name in TOKEN_SET_FIELDS else value
    return out


class Control:
    """The /_sim routes; ``reset`` is the simulator's own, which clears every part."""

    def __init__(
        self, shared: Shared, ledger: Ledger, faults: Faults, gate: Gate,
        reset: Callable[[], None],
    ) -> None:
        self._shared = shared
        self._ledger = ledger
        self._faults = faults
        self._gate = gate
        self._reset = reset

    def add_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/", view_func=_ctl_index, methods=["GET"])
        route("/_sim/stats", view_func=self._ctl_stats, methods=["GET"])
        route("/_sim/creates", view_func=self._ctl_creates, methods=["GET"])
        route("/_sim/reset", view_func=self._ctl_reset, methods=["POST"])
        route("/_sim/config", view_func=self._ctl_config, methods=["GET", "POST"])
        route("/_sim/inject", view_func=self._ctl_inject, methods=["POST"])
        route("/_sim/create_fault", view_func=self._ctl_create_fault, methods=["POST"])
        route("/_sim/predictions", view_func=self._ctl_predictions, methods=["GET"])
        route("/_sim/requests", view_func=self._ctl_requests, methods=["GET"])

    def _ctl_stats(self) -> Response:
        """GET /_sim/stats[?token_hash=]: counters of one account, or of all."""
        key = request.args.get("token_hash")
        with self._shared.lock:
            if key:
                return json_response(200, self._ledger.stats_locked(key))
            return json_response(200, self._ledger.all_stats_locked())

    def _ctl_creates(self) -> Response:
        """GET /_sim/creates?token_hash=&seconds=60&since=: create times and window maxima.

        ``by_prompt`` counts the accepted creates per prompt since the last reset (not ``since``).
        """
        key = request.args.get("token_hash", "")
        seconds = float(request.args.get("seconds", "60"))
        since = float(request.args.get("since", "-inf"))
        with self._shared.lock:
            times = [t for t in self._ledger.create_times_locked(key) if t >= since]
            samples = self._ledger.inflight_samples_locked(key)
        by_prompt = self._ledger.prompt_counts(key)
        return json_response(
            200,
            {
                "now": self._shared.now(),
                "create_times": times,
                "max_creates_in_window": max_in_window(times, seconds),
                "max_inflight_at_create": max((n for t, n in samples if t >= since), default=0),
                "by_prompt": by_prompt,
            },
        )

    def _ctl_reset(self) -> Response:
        """POST /_sim/reset."""
        self._reset()
        return json_response(200, {"ok": True})

    def _ctl_config(self) -> Response:
        """GET or POST /_sim/config: read or change SimConfig fields (JSON)."""
        if request.method == "POST":
            try:
                self._shared.configure(**(request.get_json(force=True, silent=True) or {}))
            except (TypeError, ValueError) as exc:
                return problem_response(400, {"detail": str(exc), "status": 400})
        with self._shared.lock:
            return json_response(200, _config_json(self._shared.config))

    def _ctl_inject(self) -> Response:
        """POST /_sim/inject: {method, path_regex, status, body?, headers?, count?}."""
        spec = request.get_json(force=True, silent=True) or {}
        try:
            self._faults.inject(
                str(spec.get("method", "*")),
                str(spec["path_regex"]),
                int(spec["status"]),
                spec.get("body"),
                spec.get("headers"),
                int(spec.get("count", 1)),
            )
        except (KeyError, TypeError, ValueError, re.error) as exc:
            return problem_response(400, {"detail": f"bad injection: {exc}", "status": 400})
        return json_response(200, {"ok": True})

    def _ctl_create_fault(self) -> Response:
        """POST /_sim/create_fault: {kind, count?, token_hash?, body?, hold_seconds?}."""
        spec = request.get_json(force=True, silent=True) or {}
        try:
            self._faults.add_create_fault(
                str(spec["kind"]),
                int(spec.get("count", 1)),
                spec.get("token_hash"),
                spec.get("body"),
                float(spec.get("hold_seconds", DEFAULT_HOLD_S)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return problem_response(400, {"detail": f"bad create fault: {exc}", "status": 400})
        return json_response(200, {"ok": True})

    def _ctl_predictions(self) -> Response:
        """GET /_sim/predictions[?token_hash=]."""
        return json_response(200, self._ledger.summaries(request.args.get("token_hash")))

    def _ctl_requests(self) -> Response:
        """GET /_sim/requests: the request log."""
        return json_response(200, self._gate.requests_log())


def _ctl_index() -> Response:
    """GET /: what this server is, for people trying the demo."""
    return json_response(
        200,
        {"simulator": "replicate", "models": sorted(MODELS), "api": "/v1", "control": "/_sim"},
    )
