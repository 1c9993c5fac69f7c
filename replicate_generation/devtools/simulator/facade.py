"""``Simulator``: builds the parts into one Flask app, serves it, and gives tests its control and
introspection methods (``stats``, ``inject``, ``predictions``...)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask import Flask

from replicate_generation.devtools.simulator.catalogue import add_catalogue_routes
from replicate_generation.devtools.simulator.config import Shared, SimConfig
from replicate_generation.devtools.simulator.control import Control
from replicate_generation.devtools.simulator.creates import Creates
from replicate_generation.devtools.simulator.faults import DEFAULT_HOLD_S, Faults
from replicate_generation.devtools.simulator.files import FileRoutes
from replicate_generation.devtools.simulator.gate import Gate
from replicate_generation.devtools.simulator.hostile import add_routes as add_hostile_routes
from replicate_generation.devtools.simulator.ledger import Ledger, max_in_window, token_hash
from replicate_generation.devtools.simulator.predictions import PredictionRoutes
from replicate_generation.devtools.simulator.rendering import Renderer
from replicate_generation.devtools.simulator.schema_models import (
    clear_overrides,
    set_input_schema,
)
from replicate_generation.devtools.simulator.server import Serving


class Simulator:
    """Replicate's HTTP API on 127.0.0.1, with counters and fault injection for tests."""

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._shared = Shared(config if config is not None else SimConfig(), clock)
        self.base_url = ""
        self._ledger = Ledger(self._shared)
        self._faults = Faults(self._shared)
        self._gate = Gate(self._shared, self._ledger, self._faults)
        self._files = FileRoutes(self._shared, self._ledger)
        self._serving: Serving | None = None
        self.app = self._build_app()

    def _build_app(self) -> Flask:
        app = Flask("replicate_simulator")
        renderer = Renderer(self._shared)
        self._gate.add_to(app)
        Creates(self._shared, self._ledger, self._faults, renderer).add_routes(app)
        PredictionRoutes(self._shared, self._ledger, renderer).add_routes(app)
        add_catalogue_routes(app)
        self._files.add_routes(app)
        Control(self._shared, self._ledger, self._faults, self._gate, self.reset).add_routes(app)
        add_hostile_routes(app, set_input_schema, clear_overrides)
        return app

    @property
    def config(self) -> SimConfig:
        return self._shared.config

    @config.setter
    def config(self, config: SimConfig) -> None:
        self._shared.config = config

    # ---- lifecycle of the server ----

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a daemon thread; return the base URL (without /v1)."""
        if self._serving is not None:
            return self.base_url
        self._serving = Serving(self.app, host, port)
        self.base_url = f"http://{host}:{self._serving.port}"
        return self.base_url

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        serving, self._serving = self._serving, None
        if serving is None:
            return
        self._shared.release_holds()
        serving.close()

    # ---- control ----

    def now(self) -> float:
        """Return the simulator clock."""
        return self._shared.now()

    def reset(self) -> None:
        """Forget predictions, counters, faults, buckets, files and the request log.

        The config is kept: it was chosen by whoever built the simulator.
        """
        with self._shared.lock:
            self._ledger.clear_locked()
            self._faults.clear_locked()
            self._files.clear_locked()
            self._gate.clear_locked()
        clear_overrides()
        self._shared.release_holds()

    def wake_waiters(self) -> None:
        """Make held Prefer-wait creates re-read the clock now (call after moving a fake one)."""
        self._shared.wake_waiters()

    def configure(self, **changes: Any) -> None:
        """Change config knobs atomically; unknown names raise ValueError."""
        self._shared.configure(**changes)

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` matching requests (``method`` may be "*") with this response.

        A 429 without a body mimics a real throttle (Retry-After 1 s); a str body goes as text/html.
        """
        self._faults.inject(method, path_regex, status, body, headers, count)

    def inject_create_fault(
        self,
        kind: str,
        count: int = 1,
        *,
        token: str | None = None,
        body: str | None = None,  # the 502's page or the garbage 201; None: the real answer, halved
        hold_seconds: float = DEFAULT_HOLD_S,  # real time; reset() and stop() end it early
    ) -> None:
        """Make the next ``count`` accepted creates (of ``token``, or of any) lose their answer.

        The prediction exists anyway; ``kind``: "drop" (real server only), "502", "garbage", "hold".
        """
        key = token_hash(token) if token else None
        self._faults.add_create_fault(kind, count, key, body, hold_seconds)

    # ---- introspection ----

    def creates_by_prompt(self, token: str) -> dict[str, int]:
        """Return how many accepted creates each input prompt got ("exactly one per item")."""
        return self._ledger.prompt_counts(token_hash(token))

    def creates_by_input(self, token: str) -> dict[str, int]:
        """Return how many accepted creates each whole input got, keyed by its canonical JSON."""
        inputs = self._ledger.inputs_of(token_hash(token))
        return dict(Counter(json.dumps(inp, sort_keys=True, default=str) for inp in inputs))

    def stats(self, token: str | None = None) -> dict[str, Any]:
        """Return the counters of one token, or of every token keyed by its hash."""
        with self._shared.lock:
            if token is not None:
                return self._ledger.stats_locked(token_hash(token))
            return self._ledger.all_stats_locked()

    def max_creates_in_window(self, token: str, seconds: float, since: float | None = None) -> int:
        """Return the most accepted creates in any rolling window of ``seconds``."""
        times = self.create_times(token)
        if since is not None:
            times = [t for t in times if t >= since]
        return max_in_window(times, seconds)

    def max_inflight_at_create(self, token: str, since: float) -> int:
        """Return the largest in-flight count (the new one included) at a create at >= since."""
        with self._shared.lock:
            samples = self._ledger.inflight_samples_locked(token_hash(token))
        return max((n for t, n in samples if t >= since), default=0)

    def create_times(self, token: str) -> list[float]:
        """Return the clock times of the token's accepted creates."""
        with self._shared.lock:
            return self._ledger.create_times_locked(token_hash(token))

    def predictions(self, token: str | None = None) -> list[dict[str, Any]]:
        """Return a summary of every prediction (of one token, if given), oldest first."""
        return self._ledger.summaries(token_hash(token) if token is not None else None)

    def requests_log(self) -> list[dict[str, Any]]:
        """Return every API/output request seen: method, path, token_hash, json, status..."""
        return self._gate.requests_log()
