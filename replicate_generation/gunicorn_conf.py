"""Gunicorn settings: `gunicorn -c python:replicate_generation.gunicorn_conf ...` (launch.py).

Run once by the master; `_` names are not settings. FLASK_HOST, FLASK_PORT and LOG_LEVEL are read
as the service reads them, so the port gunicorn binds and the one the app reports cannot drift.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from types import FrameType

from replicate_generation.errors import SettingsError
from replicate_generation.settings import Env, Settings, read_environ

# Exported, so a local run binds the FLASK_PORT its .env sets (the image has none).
_env = Env(read_environ(export=True))
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _read(name: str, default: int, high: int | None = None) -> int:
    """The variable as an int from 1, or stop start-up naming it."""
    try:
        return _env.required_int(name, default, 1, high)
    except SettingsError as exc:
        # SystemExit prints one line and exits 1; any other exception here is a bare traceback.
        raise SystemExit(f"gunicorn_conf: {exc}") from None


def _log_level(name: str, default: str) -> str:
    """A gunicorn log level from a Python logging level name (WARN and FATAL are its aliases)."""
    raw = _env.text(name, default)
    level = {"warn": "warning", "fatal": "critical"}.get(raw.lower(), raw.lower())
    if level not in _LOG_LEVELS:
        raise SystemExit(
            f"gunicorn_conf: {name} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return level


def _bind_address(host: str, port: int) -> str:
    """Return gunicorn's `HOST:PORT`, bracketing a bare IPv6 host (`::` -> `[::]:5003`)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# All interfaces by default: inside a container the published port reaches the app only that way.
_host = _env.text("FLASK_HOST", Settings.host)
_port = _read("FLASK_PORT", Settings.port, 65535)
bind = [_bind_address(_host, _port)]

# Requests mostly wait on Replicate, so threads (not processes) give the concurrency.
worker_class = "gthread"
threads = _read("GUNICORN_THREADS", 16)
# One connection per thread: slow clients are held off by the edge proxy (edge/nginx.conf).
worker_connections = threads
# Limits live in the shared state file, so several processes are safe; two keep it up in restarts.
workers = _read("WEB_CONCURRENCY", 2)
# Threads and SQLite connections do not survive fork(): each worker builds its own app.
preload_app = False
# max_requests stays 0: a recycled worker would drop the tasks it has queued.

# A gthread heartbeat, not a request deadline: only a stuck worker main loop is killed.
timeout = 30
# In-flight requests get this long after SIGTERM; compose's stop_grace_period (35 s) is longer.
graceful_timeout = 30
# With one connection per thread an idle kept-alive connection would block accept.
keepalive = 0

# At gunicorn's maximum, above edge/nginx.conf's limits, so the proxy refuses first (in JSON).
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 100
# The heartbeat file is touched every second: tmpfs, not the container's overlay filesystem.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108

# stdout and stderr: the container runtime collects both.
accesslog = "-"
errorlog = "-"
loglevel = _log_level("LOG_LEVEL", "INFO")
# No header atoms, no query (%(U)s): credentials stay out; the last field is the X-Request-ID.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms %(p)s %({x-request-id}o)s'

proc_name = "replicate-generation"
# Job threads keep the GIL 5 ms a turn by default; each of a request's reads then waits that long.
_GIL_SWITCH_S = 0.001
# Its default path is shared by every gunicorn of the user, and appuser has no home.
control_socket_disable = True
# forwarded_allow_ips stays gunicorn's default: X-Forwarded-* is trusted from this host only.


def on_starting(server: object) -> None:
    """Give /metrics a fresh multiprocess directory before any worker (and prometheus_client)
    starts: counts from a previous run must not add up into this one's."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not directory:
        directory = tempfile.mkdtemp(prefix="replicate-generation-metrics-")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # inherited by every worker


def child_exit(server: object, worker: object) -> None:
    """A dead worker's live gauges stop counting (its counters stay, as Prometheus expects)."""
    from prometheus_client import multiprocess  # after on_starting set the directory

    pid = getattr(worker, "pid", None)
    if isinstance(pid, int):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def post_worker_init(worker: object) -> None:
    """A short GIL turn for requests beside job threads, and SIGTERM also ends the worker's event
    streams at once: held open, each would keep the graceful shutdown waiting graceful_timeout;
    their clients resume with Last-Event-ID."""
    sys.setswitchinterval(_GIL_SWITCH_S)
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None)
    runner = extensions.get("jobs") if isinstance(extensions, dict) else None
    stop_streams = getattr(getattr(runner, "stream_wakeups", None), "stop_streams", None)
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(stop_streams) or not callable(previous):
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        previous(signum, frame)
        stop_streams()

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: requests run on


def worker_exit(server: object, worker: object) -> None:
    """Stop the worker's job runner before the interpreter shuts down.

    Exit joins pool threads before atexit hooks, so a SIGTERM would wait for every queued item.
    """
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None)
    runner = extensions.get("jobs") if isinstance(extensions, dict) else None
    close = getattr(runner, "close", None)
    if callable(close):
        close()
