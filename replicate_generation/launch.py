"""How the package is served: this interpreter running gunicorn with the package's own config."""

from __future__ import annotations

import os
import sys

GUNICORN_CONFIG = "python:replicate_generation.gunicorn_conf"
WSGI_APP = "replicate_generation.app:create_app()"


def gunicorn_argv(python: str | None = None) -> list[str]:
    """The image's CMD, run with this interpreter: gunicorn with the package's own config."""
    return [python or sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, WSGI_APP]


def serve() -> int:
    """Replace this process with gunicorn (so it gets the signals), as the image's CMD runs."""
    argv = gunicorn_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv: this interpreter running gunicorn
    return 1  # not reached: execv replaces the process or raises
