"""`replicate-generation edge`, the image's CMD: nginx in front of gunicorn in one container.

nginx listens on FLASK_HOST:FLASK_PORT and gunicorn on a Unix socket in a private directory
(0700) that also holds nginx's config, rendered from the package's one template (config.py),
and its pid and temp files. With `upstream`, nginx alone fronts gunicorns elsewhere (compose's
balancer). The supervisor (supervisor.py) runs as PID 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from replicate_generation.edge.config import (
    EdgeError,
    ProxyConfig,
    host_port,
    nameserver,
    needs_resolver,
    render,
    upstream_address,
)
from replicate_generation.edge.nginx import check_config, find_nginx, nginx_argv
from replicate_generation.edge.supervisor import Program, Relay, Supervisor, block_signals, say
from replicate_generation.errors import SettingsError
from replicate_generation.launch import gunicorn_argv
from replicate_generation.settings import Settings, read_environ

__all__ = ["EdgeError", "run"]

# gunicorn's graceful_timeout and nginx's worker_shutdown_timeout (30 s), then 2 s to exit.
STOP_SECONDS = 32.0
# A start that cannot happen (no nginx, a bad setting or config) exits 2, a failed run 1.
START_FAILED = 2
# sun_path holds 108 bytes with its terminating NUL.
_SOCKET_PATH_MAX = 107
_RESOLV_CONF = Path("/etc/resolv.conf")


def run(upstream: str | None = None) -> int:
    """Run nginx (and gunicorn, unless `upstream` names where it runs) until stopped."""
    block_signals()  # first: no child or thread may start with these signals deliverable
    try:
        settings = Settings.from_env(read_environ())
        binary = find_nginx()
    except (SettingsError, EdgeError) as exc:
        say(str(exc))
        return START_FAILED
    with _private_directory() as work:
        relay = Relay()
        try:
            programs = _programs(settings, binary, work, upstream, relay.write)
        except EdgeError as exc:
            relay.close()
            say(str(exc))
            return START_FAILED
        try:
            return Supervisor(os.environ, STOP_SECONDS).run(programs)
        finally:
            relay.close()


@contextlib.contextmanager
def _private_directory() -> Iterator[Path]:
    """A fresh 0700 directory (mkdtemp's mode) for the socket, config and nginx's files."""
    work = Path(tempfile.mkdtemp(prefix="replicate-generation-edge-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _programs(settings: Settings, binary: str, work: Path, upstream: str | None,
              access_log: int) -> list[Program]:
    """gunicorn (unless upstream is given), then nginx once gunicorn listens."""
    programs: list[Program] = []
    if upstream is None:
        socket = work / "gunicorn.sock"
        if len(os.fsencode(socket)) > _SOCKET_PATH_MAX:
            raise EdgeError(f"{socket} is too long for a Unix socket; set a shorter TMPDIR")
        programs.append(Program("gunicorn", gunicorn_argv(bind=f"unix:{socket}"), signal.SIGTERM))
        target, resolver, ready = f"unix:{socket}", None, socket.exists
    else:
        host, port = upstream_address(upstream)
        target, resolver, ready = host_port(host, port), _resolver(host), (lambda: True)
    conf = work / "nginx.conf"
    conf.write_text(render(ProxyConfig(
        listen=host_port(settings.host, settings.port), upstream=target, work=work,
        max_body_bytes=settings.max_request_bytes,
        task_timeout_seconds=settings.task_timeout_seconds, resolver=resolver)))
    check_config(binary, work, conf)
    programs.append(Program("nginx", nginx_argv(binary, work, conf), signal.SIGQUIT,
                            stdout=access_log, ready=ready))
    return programs


def _resolver(host: str) -> str | None:
    """The nameserver nginx asks for the upstream's addresses per request (replicas come and go)."""
    if not needs_resolver(host):
        return None
    try:
        found = nameserver(_RESOLV_CONF.read_text())
    except OSError:
        found = None
    if found is None:
        raise EdgeError(f"no nameserver in {_RESOLV_CONF} to look up {host!r}")
    return found
