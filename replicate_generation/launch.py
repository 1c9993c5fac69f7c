"""How the package is served: this interpreter running gunicorn with the package's own config
(alone under `serve`, behind nginx under `edge`)."""

from __future__ import annotations

import os
import sys

GUNICORN_CONFIG = "python:replicate_generation.gunicorn_conf"
WSGI_APP = "replicate_generation.app:create_app()"


def gunicorn_argv(python: str | None = None, bind: str | None = None) -> list[str]:
    """gunicorn with the package's own config, run with this interpreter.

    `bind` (the edge's private socket, `unix:/path`) replaces the config's FLASK_HOST:FLASK_PORT:
    gunicorn lets its command line override the config file.
    """
    binding = ["--bind", bind] if bind else []
    return [python or sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, *binding, WSGI_APP]


def serve() -> int:
    """Replace this process with gunicorn (so it gets the signals): gunicorn facing clients itself,
    for a deployment with its own proxy in front (the image runs `edge` instead)."""
    argv = gunicorn_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv: this interpreter running gunicorn
    return 1  # not reached: execv replaces the process or raises
