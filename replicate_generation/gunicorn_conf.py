"""Gunicorn settings for the Replicate generation service.

Run as ``gunicorn -c python:replicate_generation.gunicorn_conf
'replicate_generation.app:create_app()'`` (what the image, ``replicate-generation serve`` and
``python app.py`` do). The gunicorn master executes this file
once at start-up; the names below that gunicorn knows are its settings, the ``_``-prefixed ones are
private helpers it ignores. Values come from the same environment variables, with the same
defaults, as the service's own settings, so the port gunicorn binds and the port the app reports
cannot drift apart.
"""

from __future__ import annotations

import os
import tempfile

from dotenv import find_dotenv, load_dotenv

# Load the .env found from the working directory, as create_app() does (the environment wins), so
# a local run binds the FLASK_PORT that .env sets. The image has no .env: compose passes it in.
load_dotenv(find_dotenv(usecwd=True), override=False)


def _env(name: str, default: str) -> str:
    """Return the variable, or `default` if it is unset or blank (as `${NAME:-default}` does)."""
    return os.environ.get(name, "").strip() or default


def _env_int(name: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return the variable as an int in [minimum, maximum], or stop start-up naming it."""
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        # SystemExit, not ValueError: gunicorn turns an exception here into a bare traceback, while
        # SystemExit prints just this line and exits 1 before any worker starts.
        raise SystemExit(f"gunicorn.conf.py: {name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SystemExit(f"gunicorn.conf.py: {name} must be {bounds}, got {value}")
    return value


def _env_loglevel(name: str, default: str) -> str:
    """Return a gunicorn log level from a Python logging level name, or stop start-up naming it."""
    raw = _env(name, default)
    # Accept the names Python's logging module accepts (WARN and FATAL are its aliases).
    aliases = {"warn": "warning", "fatal": "critical"}
    level = aliases.get(raw.lower(), raw.lower())
    if level not in {"debug", "info", "warning", "error", "critical"}:
        raise SystemExit(
            f"gunicorn.conf.py: {name} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}"
        )
    return level


def _bind_address(host: str, port: int) -> str:
    """Return gunicorn's `HOST:PORT`, bracketing a bare IPv6 host (`::` -> `[::]:5003`)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# --- Socket -------------------------------------------------------------------------------------

# All interfaces by default: inside a container the published port reaches the app only that way.
# Set FLASK_HOST=127.0.0.1 to keep a bare-metal run local; the HEALTHCHECK calls 127.0.0.1, so in
# the image keep 0.0.0.0 (or a wildcard).
_host = _env("FLASK_HOST", "0.0.0.0")  # noqa: S104 (deliberate, see above)
_port = _env_int("FLASK_PORT", 5003, maximum=65535)
bind = [_bind_address(_host, _port)]

# --- Workers ------------------------------------------------------------------------------------

# Requests mostly wait (on the dispatcher, which waits on Replicate), so threads, not processes,
# give the concurrency: each gthread worker serves GUNICORN_THREADS requests at once.
worker_class = "gthread"
threads = _env_int("GUNICORN_THREADS", 16)

# A worker holds at most one connection per thread. gthread reads a request head in a pool thread
# with no deadline, so a client that sends half a request line holds its thread until it hangs up;
# a worker whose threads are all held this way then stops accepting (rather than queueing new
# connections behind them), and the kernel hands them to a worker with a free thread. That is all
# gunicorn can do: WEB_CONCURRENCY x GUNICORN_THREADS such clients stop the service until they
# hang up, which is why deploy/nginx.conf (client_header_timeout, client_body_timeout, request
# buffering) fronts it in docker-compose.yml. It also means no kept-alive connections (below).
worker_connections = threads

# More than one process is safe because the limits live in the shared SQLite STATE_FILE, not in
# process memory. Two workers keep the service up while one restarts. Note that gunicorn itself
# parses WEB_CONCURRENCY when it is imported (its default for `workers`), so a non-integer value
# fails there, with a traceback that shows the variable name, before this file runs.
workers = _env_int("WEB_CONCURRENCY", 2)

# No preloading: create_app() starts the dispatcher's threads and opens SQLite, and neither threads
# nor SQLite connections survive fork(). Each worker builds its own app after the fork.
preload_app = False

# No periodic worker recycling (max_requests stays 0): a recycled worker would drop the tasks it
# has queued. Restart the container instead if memory ever grows.

# --- Timeouts -----------------------------------------------------------------------------------

# For gthread this is a heartbeat, not a request deadline: the worker's main loop touches its
# heartbeat file every second while requests run in the thread pool, so a /generate-batch that
# legitimately takes minutes is never killed by it (TASK_TIMEOUT_SECONDS bounds those). Only a
# worker whose main loop is stuck for 30 s is killed and replaced. The default is right for gthread.
timeout = 30

# On SIGTERM (docker stop) workers stop accepting and get this long to finish in-flight requests,
# then are killed. compose's stop_grace_period is 35s, so gunicorn finishes (or logs the forced
# exit) before Docker's SIGKILL; a bare `docker stop` waits only 10 s unless given `-t 35`.
# Longer requests are cut off at shutdown.
graceful_timeout = 30

# No keep-alive: with one connection per thread an idle kept-alive connection would block accept.
# It also bounds a connection that sends nothing: gthread waits 5 s for its first byte in a pool
# thread, then closes it after `keepalive` (0) more seconds. nginx opens a connection per request.
keepalive = 0

# --- Request limits -----------------------------------------------------------------------------

# gunicorn answers these in HTML; behind deploy/nginx.conf (4 KB request and header lines) the
# proxy refuses long lines first, in JSON, so these sit at gunicorn's maximum (8190) to stay above.
limit_request_line = 8190
limit_request_field_size = 8190
# gunicorn's default: nginx forwards only the few headers the service reads.
limit_request_fields = 100

# The heartbeat above is a file touched every second. In a container /tmp is on the overlay (disk)
# filesystem, where that can block; /dev/shm is tmpfs (the gunicorn docs' advice for Docker).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108

# --- Logging ------------------------------------------------------------------------------------

# Access log to stdout and errors to stderr: the container runtime collects both.
accesslog = "-"
errorlog = "-"
loglevel = _env_loglevel("LOG_LEVEL", "INFO")

# Credentials travel in request headers (X-Admin-API-Key, X-Replicate-API-Key), so this format uses
# NO request-header atoms: not %({...}i)s, nor %(a)s / %(f)s (User-Agent / Referer), nor %(u)s
# (decoded from Authorization), nor %({...}e)s (the WSGI environ holds every header as HTTP_*).
# %(U)s is the path without the query string, so nothing a client puts after `?` is logged either.
# Fields: client address, time, method, path, protocol, status, bytes sent, duration ms, worker pid.
# The last field is the response's X-Request-ID (a response header: the service sanitised it).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms %(p)s %({x-request-id}o)s'

# --- Process ------------------------------------------------------------------------------------

# Shown in `ps`/`top` as "gunicorn: master [replicate-generation]".
proc_name = "replicate-generation"

# No control socket (gunicornc): nothing needs to resize or reload workers at run time, its default
# path ($HOME/.gunicorn/gunicorn.ctl) is shared by every gunicorn the same user runs (tests, demo),
# and the image's appuser has no home directory to put it in.
control_socket_disable = True

# forwarded_allow_ips stays at gunicorn's default (127.0.0.1 and ::1, or FORWARDED_ALLOW_IPS if
# set): X-Forwarded-* headers are trusted only from a proxy on this host, so a client cannot spoof
# its scheme. Set FORWARDED_ALLOW_IPS to the proxy's address when one fronts the service.


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


def worker_exit(server: object, worker: object) -> None:
    """Stop the worker's job runner before the interpreter shuts down.

    Left to interpreter exit, the dispatcher's pool threads would be joined before any atexit
    hook runs, so a SIGTERM would wait for every queued item. Closing here takes no new items,
    gives running ones the grace period and leaves the rest in the store for the next start.
    """
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None)
    runner = extensions.get("jobs") if isinstance(extensions, dict) else None
    close = getattr(runner, "close", None)
    if callable(close):
        close()
