"""The threaded werkzeug server the simulator's app runs on, in a daemon thread."""

from __future__ import annotations

import threading

from flask import Flask
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler


class _QuietHandler(WSGIRequestHandler):
    """Drop the per-request access log: benchmarks make tens of thousands of requests."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class _BigBacklogServer(ThreadedWSGIServer):
    """``make_server(threaded=True)`` with a backlog of 2048: 128 drops bursts of connects."""

    request_queue_size = 2048


class Serving:
    """One running server: listening from construction until ``close``."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self._server = _BigBacklogServer(host, port, app, handler=_QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="replicate-simulator",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
