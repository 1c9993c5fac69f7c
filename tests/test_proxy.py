"""The reverse proxy the image runs in front of gunicorn (replicate_generation/edge/nginx.conf;
issue #10 findings 4 and 13, #20 finding 12) and what gunicorn alone still withstands.

nginx runs the package's one template as `replicate-generation edge` renders it (edge.config),
with only its listen port, upstream and private directory the test's, in front of a real gunicorn
against the simulator on 127.0.0.1. tests/test_image_command.py runs the image's own command.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ADMIN, ADMIN_KEY, SERVER_TOKEN, USER_TOKEN
from replicate_generation.edge import STOP_SECONDS
from replicate_generation.edge.config import (
    EdgeError,
    ProxyConfig,
    host_port,
    nameserver,
    needs_resolver,
    render,
    template_text,
    upstream_address,
)
from replicate_generation.edge.nginx import nginx_argv
from replicate_generation.settings import Settings
from servers import (
    ROOT,
    Gunicorn,
    assert_json_error,
    free_port,
    get_request,
    health_latencies,
    raw_exchange,
    slow_clients,
    wait_for,
)

TEMPLATE = ROOT / "replicate_generation" / "edge" / "nginx.conf"
GUNICORN_CONF = ROOT / "replicate_generation" / "gunicorn_conf.py"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


# --------------------------------------------------------------------------- nginx


def nginx_binary() -> str | None:
    """nginx on PATH or where packages put it (root's PATH may lack /usr/sbin)."""
    found = shutil.which("nginx")
    return found or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def require_nginx() -> str:
    """The nginx binary; a skip on a developer machine without it, a failure under CI."""
    binary = nginx_binary()
    if binary is not None:
        return binary
    if os.environ.get("CI"):
        pytest.fail("nginx is not installed: .ci/run installs it (apt-get install -y nginx)")
    pytest.skip("nginx is not installed (apt-get install -y nginx); CI installs it and runs this")


def template_seconds(directive: str) -> int:
    """A `directive Ns;` value written in the template itself."""
    match = re.search(rf"^\s*{directive} (\d+)s;", TEMPLATE.read_text(), re.M)
    assert match, f"{directive} not found in {TEMPLATE.name}"
    return int(match[1])


def rendered_seconds(text: str, directive: str) -> int:
    match = re.search(rf"^\s*{directive} (\d+)s;", text, re.M)
    assert match, f"{directive} not found in the rendered config"
    return int(match[1])


def proxy_config(work: Path, listen_port: int, upstream: str,
                settings: Settings | None = None) -> ProxyConfig:
    """What `edge` would render, with the test's addresses and directory."""
    settings = settings or Settings()
    return ProxyConfig(listen=f"127.0.0.1:{listen_port}", upstream=upstream, work=work,
                       max_body_bytes=settings.max_request_bytes,
                       task_timeout_seconds=settings.task_timeout_seconds)


class Nginx:
    """nginx in the foreground with the rendered template, as `edge` runs it."""

    def __init__(self, binary: str, work: Path, upstream_port: int) -> None:
        for directory in (work, work / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(render(proxy_config(work, self.port, f"127.0.0.1:{upstream_port}")))
        # Append: nginx reopens /dev/stdout (the access log), and would write over this offset.
        self._out = (work / "logs" / "stdout.log").open("ab")
        self.proc = subprocess.Popen(
            nginx_argv(binary, work, conf), stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 15.0) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.logs()}")
            try:
                return requests.get(self.url + "/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(answers, timeout, "nginx to proxy /health")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._out.close()

    def logs(self) -> str:
        files = sorted((self.work / "logs").iterdir())
        return "\n".join(path.read_text(errors="replace") for path in files)


@contextmanager
def running_nginx(work: Path, upstream_port: int) -> Iterator[Nginx]:
    """nginx in front of `upstream_port`, stopped (even on failure) when the block ends."""
    nginx = Nginx(require_nginx(), work, upstream_port)
    try:
        nginx.wait_ready()
        yield nginx
    finally:
        nginx.stop()


@pytest.fixture
def proxied(start_gunicorn: Callable[..., Gunicorn], make_settings: Callable[..., Settings],
            tmp_path: Path) -> Iterator[tuple[Gunicorn, Nginx]]:
    """gunicorn (the test's settings) behind nginx (the shipped config)."""
    server = start_gunicorn(make_settings())
    with running_nginx(tmp_path / "nginx", server.port) as nginx:
        yield server, nginx
        logs = nginx.logs()
    for secret in (SERVER_TOKEN, USER_TOKEN, ADMIN_KEY):  # nginx logs no credential either
        assert secret not in logs


# --------------------------------------------------------------------------- clients


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def established_to(port: int) -> int:
    """Established TCP connections whose local (server) side is `port`, from /proc/net."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes (or resets) `sock` before `deadline`."""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


ACCESS_LINE = re.compile(r'"[A-Z]+ \S* HTTP/[\d.]+" \d{3} \S+ \d+ms <(\d+)>')


def access_lines(server: Gunicorn) -> list[str]:
    """gunicorn's access log lines (gunicorn_conf's access_log_format)."""
    return [line for line in server.log().splitlines() if ACCESS_LINE.search(line)]


def settled_access_lines(server: Gunicorn) -> list[str]:
    """The access log once no line has been added for 0.3 s (gunicorn logs after answering)."""
    lines = access_lines(server)
    for _ in range(20):
        time.sleep(0.3)
        if (latest := access_lines(server)) == lines:
            break
        lines = latest
    return lines


def wait_for_workers(server: Gunicorn, workers: int) -> None:
    """Until every worker has served /health (each loads the app after the fork)."""
    def pids() -> bool:
        requests.get(server.url + "/health", timeout=5)
        seen = {m[1] for line in access_lines(server) if (m := ACCESS_LINE.search(line))}
        return len(seen) >= workers
    wait_for(pids, 30, f"{workers} gunicorn workers to serve")


def chunked(body: bytes, size: int = 1 << 20) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# --------------------------------------------------------------------------- slow clients


def test_slow_request_heads_never_reach_gunicorn_and_are_cut_by_the_proxy(
        proxied: tuple[Gunicorn, Nginx]) -> None:
    server, nginx = proxied
    with slow_clients(nginx.port, 40) as socks:
        latencies = health_latencies(nginx.url, 20)
        assert max(latencies) < math.inf and percentile(latencies, 0.95) < 0.5, latencies
        # No connection reached gunicorn for the 40: nginx holds them (health's are closed by now).
        assert established_to(server.port) == 0
        deadline = time.monotonic() + template_seconds("client_header_timeout") + 3
        assert all(closed_by_peer(sock, deadline) for sock in socks)


def test_a_stalled_body_holds_no_gunicorn_thread_and_is_cut_by_the_proxy(
        proxied: tuple[Gunicorn, Nginx]) -> None:
    server, nginx = proxied
    head = (b"POST /generate HTTP/1.1\r\nHost: localhost\r\nX-Admin-API-Key: " + ADMIN_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\": 1")
    before = settled_access_lines(server)
    with slow_clients(nginx.port, 1, head) as (sock,):
        started = time.monotonic()
        latencies = health_latencies(nginx.url, 10)
        assert percentile(latencies, 0.95) < 0.5, latencies
        assert established_to(server.port) == 0  # the 7 bytes wait in nginx, not in gunicorn
        timeout = template_seconds("client_body_timeout")
        assert closed_by_peer(sock, started + timeout + 3)
        assert time.monotonic() - started >= timeout - 1  # cut by that timeout, not before
    assert not [line for line in settled_access_lines(server)[len(before):] if "POST" in line]


# --------------------------------------------------------------------------- JSON refusals


LONG = b"a" * 5000
REFUSED = [
    pytest.param(get_request(b"/health?" + LONG), 414, id="uri-over-4k"),
    pytest.param(get_request(b"/health", b"X-Request-ID: " + LONG + b"\r\n"), 431,
                 id="header-line-over-4k"),
    pytest.param(get_request(b"/jobs", b"X-Replicate-API-Key: r8_\x01key\r\n"), 400,
                 id="control-byte-in-key-header"),
    pytest.param(get_request(b"/jobs", b"Content-Type: text/\x7fplain\r\n"), 400,
                 id="del-in-content-type"),
    pytest.param(get_request(b"/health", b"X-Anything: a\x00b\r\n"), 400, id="nul-in-a-header"),
    pytest.param(get_request(b"/health", b"X\x01Y: z\r\n"), 400, id="control-byte-in-header-name"),
    pytest.param(get_request(b"/he\x01alth"), 400, id="control-byte-in-uri"),
    pytest.param(get_request(b"/files/\xc3\xa9.png"), 400, id="raw-non-ascii-in-uri"),
    pytest.param(get_request(b"/health", method=b"A"), 405, id="method-gunicorn-refuses"),
    pytest.param(b"GET /health HTTP/1.1 extra\r\nHost: localhost\r\n\r\n", 400,
                 id="malformed-request-line"),
    pytest.param(get_request(b"/generate", b"Transfer-Encoding: gzip\r\n", b"POST"), 501,
                 id="unknown-transfer-coding"),
    pytest.param(get_request(b"/generate", b"X-Admin-API-Key: " + ADMIN_KEY.encode()
                             + b"\r\nContent-Length: 16777217\r\n", b"POST") + b"{", 413,
                 id="declared-body-over-16-mib"),
]


@pytest.mark.parametrize(("request_bytes", "expected"), REFUSED)
def test_what_gunicorn_would_refuse_in_html_the_proxy_refuses_in_json(
        proxied: tuple[Gunicorn, Nginx], request_bytes: bytes, expected: int) -> None:
    server, nginx = proxied
    before = settled_access_lines(server)
    assert_json_error(*raw_exchange(nginx.port, request_bytes), expected)
    assert settled_access_lines(server) == before  # refused in nginx: gunicorn never saw it


def test_a_chunked_body_over_the_limit_is_a_json_413(proxied: tuple[Gunicorn, Nginx]) -> None:
    server, nginx = proxied
    head = (b"POST /generate HTTP/1.1\r\nHost: localhost\r\nX-Admin-API-Key: " + ADMIN_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    before = settled_access_lines(server)
    assert_json_error(*raw_exchange(nginx.port, head + chunked(b" " * (16 * 2**20 + 1))), 413)
    assert settled_access_lines(server) == before


def test_headers_the_service_does_not_read_never_reach_gunicorn(
        proxied: tuple[Gunicorn, Nginx]) -> None:
    _server, nginx = proxied
    many = b"".join(b"X-Filler-%d: v\x01\r\n" % i for i in range(150))
    status, headers, body = raw_exchange(nginx.port, get_request(b"/health", many))
    # gunicorn would answer 150 headers (or a control byte in one) with an HTML 400/431.
    assert status == 200 and json.loads(body)["status"] == "healthy", body[:200]


def test_the_proxy_answers_json_when_gunicorn_is_down(proxied: tuple[Gunicorn, Nginx]) -> None:
    server, nginx = proxied
    server.kill()
    status, headers, body = raw_exchange(nginx.port, get_request(b"/health"))
    assert_json_error(status, headers, body, 502)
    assert headers["retry-after"] == "5"


# --------------------------------------------------------------------------- end to end


def test_generate_and_ranged_downloads_work_through_the_proxy(
        proxied: tuple[Gunicorn, Nginx]) -> None:
    _server, nginx = proxied
    response = requests.post(nginx.url + "/generate", headers=ADMIN, timeout=60, json={
        "model_name": "flux-dev", "prompt": "a fox behind a proxy", "output_format": "png"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"]  # the service's response headers pass through
    (url,) = response.json()["urls"]
    whole = requests.get(nginx.url + url, headers=ADMIN, timeout=10)
    assert whole.status_code == 200 and whole.content.startswith(b"\x89PNG")
    part = requests.get(nginx.url + url, headers={**ADMIN, "Range": "bytes=4-11"}, timeout=10)
    assert part.status_code == 206 and part.content == whole.content[4:12]
    assert part.headers["Content-Range"] == f"bytes 4-11/{len(whole.content)}"
    cached = requests.get(nginx.url + url, timeout=10,
                          headers={**ADMIN, "If-None-Match": whole.headers["ETag"]})
    assert cached.status_code == 304


def test_edge_with_an_upstream_is_a_balancer_for_a_gunicorn_elsewhere(
        start_gunicorn: Callable[..., Gunicorn], make_settings: Callable[..., Settings],
        tmp_path: Path) -> None:
    """compose's balancer: `edge --upstream` runs nginx alone (an address here: no DNS lookup)."""
    binary = require_nginx()
    server = start_gunicorn(make_settings(), 1)
    path = f"{Path(binary).parent}:{os.environ.get('PATH', '')}"
    balancer = Gunicorn({"PATH": path, "PYTHONPATH": str(ROOT)}, tmp_path / "balancer.log",
                        cwd=tmp_path, command=[sys.executable, "-m", "replicate_generation",
                                               "edge", "--upstream", f"127.0.0.1:{server.port}"])
    try:
        balancer.wait_ready()
        assert requests.get(balancer.url + "/health", timeout=5).json()["status"] == "healthy"
        assert_json_error(*raw_exchange(balancer.port, get_request(b"/health?" + LONG)), 414)
        balancer.proc.send_signal(signal.SIGTERM)
        assert balancer.proc.wait(timeout=30) == 0, balancer.log()
        assert "SIGTERM received: stopping nginx\n" in balancer.log()  # and no gunicorn of its own
    finally:
        balancer.stop()


# --------------------------------------------------------------------------- the config itself


def rendered(tmp_path: Path, settings: Settings | None = None) -> str:
    return render(proxy_config(tmp_path, 5003, "unix:/run/gunicorn.sock", settings))


def test_every_proxy_error_page_is_json_with_its_status(tmp_path: Path) -> None:
    text = rendered(tmp_path)
    pages = re.findall(r"error_page ((?:\d{3} )+)(?:=(\d{3}) )?(/_proxy_error/\d{3});", text)
    bodies = dict(re.findall(r"location = (/_proxy_error/\d{3}) \{[^}]*?return (\d{3} '.*?')",
                             text, re.S))
    assert pages and {"502", "504", "413", "414", "400"} <= {
        code for codes, _, _ in pages for code in codes.split()}
    for codes, overwrite, uri in pages:
        status, _, quoted = bodies[uri].partition(" ")
        assert status == (overwrite or codes.split()[-1]) == uri.rsplit("/", 1)[1]
        body = json.loads(quoted.strip("'").removesuffix("\\n"))
        assert set(body) == {"error"} and body["error"], uri


@pytest.mark.parametrize(("environ", "body_limit", "message", "read_timeout"), [
    ({}, 16 * 2**20, "over 16 MiB", 330),  # the service's defaults
    ({"MAX_REQUEST_BYTES": "1536", "TASK_TIMEOUT_SECONDS": "59.5"}, 1536, "over 1536 bytes", 90),
    ({"MAX_REQUEST_BYTES": "3145728"}, 3 * 2**20, "over 3 MiB", 330),
], ids=["defaults", "odd-values", "lowered"])
def test_the_proxy_limits_follow_the_service_settings(
        tmp_path: Path, environ: dict[str, str], body_limit: int, message: str,
        read_timeout: int) -> None:
    settings = Settings.from_env(environ)
    text = rendered(tmp_path, settings)
    size = re.search(r"^\s*client_max_body_size (\d+);", text, re.M)
    assert size and int(size[1]) == body_limit == settings.max_request_bytes
    # A synchronous batch runs up to TASK_TIMEOUT_SECONDS: nginx waits that and a margin longer.
    assert rendered_seconds(text, "proxy_read_timeout") == read_timeout
    assert read_timeout > settings.task_timeout_seconds
    assert f"Request body too large ({message})" in text


def test_nginx_drains_within_gunicorns_graceful_timeout(tmp_path: Path) -> None:
    graceful = next(ast.literal_eval(node.value)
                    for node in ast.parse(GUNICORN_CONF.read_text()).body
                    if isinstance(node, ast.Assign)
                    and ast.unparse(node.targets[0]) == "graceful_timeout")
    # By then gunicorn has answered or dropped every request; the supervisor's own limit follows.
    assert rendered_seconds(rendered(tmp_path), "worker_shutdown_timeout") == graceful
    assert graceful < STOP_SECONDS <= graceful + 5


def test_every_placeholder_is_filled_and_nothing_else_changes(tmp_path: Path) -> None:
    template, text = template_text(), rendered(tmp_path)
    assert template == TEMPLATE.read_text()  # the installed template is the checkout's
    assert "{{" not in text and "}}" not in text
    assert len(text.splitlines()) == len(template.splitlines())
    assert f"pid {tmp_path}/nginx.pid;" in text and "set $service unix:/run/gunicorn.sock;" in text
    # Every path nginx writes is in the run's private directory, never its compiled-in ones.
    for directive in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert re.search(rf"^\s*{directive}_temp_path {re.escape(str(tmp_path))}/\w+;", text, re.M)
    assert "resolver " not in text.replace("# (none", "")


@pytest.mark.parametrize("field", ["listen", "upstream", "work"])
@pytest.mark.parametrize("value", ["127.0.0.1:80; include /etc/passwd", "a b", "x{", "$host"])
def test_a_value_that_would_change_the_config_is_refused(
        tmp_path: Path, field: str, value: str) -> None:
    config = proxy_config(tmp_path, 5003, "127.0.0.1:5004")
    with pytest.raises(EdgeError, match=field):
        render(replace(config, **{field: Path(value) if field == "work" else value}))


def test_addresses_are_written_as_nginx_reads_them() -> None:
    assert host_port("0.0.0.0", 5003) == "0.0.0.0:5003"  # noqa: S104 - the image's default
    assert host_port("::", 5003) == "[::]:5003"
    assert upstream_address("replicas:5003") == ("replicas", 5003)
    assert upstream_address("[fd00::1]:80") == ("fd00::1", 80)
    for bad in ("replicas", "replicas:", ":5003", "replicas:99999", "replicas:http"):
        with pytest.raises(EdgeError, match="HOST:PORT"):
            upstream_address(bad)


def test_only_a_named_upstream_gets_a_resolver(tmp_path: Path) -> None:
    assert needs_resolver("replicas") and not needs_resolver("10.0.0.7")
    assert not needs_resolver("fd00::1")
    assert nameserver("# docker\nsearch local\nnameserver 127.0.0.11\nnameserver 8.8.8.8\n") \
        == "127.0.0.11"
    assert nameserver("search local\n") is None
    named = replace(proxy_config(tmp_path, 5003, "replicas:5003"), resolver="fd00::53")
    assert "    resolver [fd00::53] valid=10s ipv6=off;" in render(named)


def _headers_read(tree: ast.AST) -> set[str]:
    """Names in `request.headers.get(X)`, `request.headers[X]` and `X in request.headers`."""
    constants = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}

    def is_headers(node: ast.AST) -> bool:
        return ast.unparse(node) == "request.headers"

    def name_of(node: ast.AST) -> Any:
        return node.value if isinstance(node, ast.Constant) else constants.get(
            getattr(node, "id", ""))

    found: set[Any] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and is_headers(node.func.value) and node.args):
            found.add(name_of(node.args[0]))
        elif isinstance(node, ast.Subscript) and is_headers(node.value):
            found.add(name_of(node.slice))
        elif (isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In)
              and is_headers(node.comparators[0])):
            found.add(name_of(node.left))
    return {str(name) for name in found if name}


def test_every_header_the_service_reads_is_forwarded_by_the_proxy() -> None:
    text = TEMPLATE.read_text()
    forwarded = {name.lower() for name in re.findall(r"proxy_set_header (\S+) \$", text)}
    checked = re.search(r'map "([^"]+)" \$control_bytes_in_headers', text)
    assert checked
    read: set[str] = set()
    for path in (ROOT / "replicate_generation").rglob("*.py"):
        if "devtools" not in path.parts:
            source = path.read_text()
            read |= {name.lower() for name in _headers_read(ast.parse(source))}
            if re.search(r"\bsession\[|request\.cookies", source):  # Flask reads Cookie
                read.add("cookie")
    assert {"x-admin-api-key", "x-replicate-api-key", "prefer", "idempotency-key"} <= read
    assert read <= forwarded, f"add to {TEMPLATE.name}: {sorted(read - forwarded)}"
    for name in read - {"host"}:  # nginx validates Host itself
        assert f"$http_{name.replace('-', '_')}" in checked[1], name


# --------------------------------------------------------------------------- gunicorn alone


def test_gunicorn_alone_serves_health_until_every_thread_is_held(
        start_gunicorn: Callable[..., Gunicorn], make_settings: Callable[..., Settings]) -> None:
    """gunicorn's documented limit: WEB_CONCURRENCY x GUNICORN_THREADS slow heads stop it."""
    workers, threads = 2, 16  # the shipped defaults (.env.example)
    server = start_gunicorn(make_settings(), workers, GUNICORN_THREADS=str(threads))
    wait_for_workers(server, workers)
    with slow_clients(server.port, workers * threads - 1):
        # worker_connections = threads: a worker with every thread held stops accepting, so
        # /health goes to the worker with a free thread instead of queueing behind them.
        latencies = health_latencies(server.url, 20)
        assert max(latencies) < math.inf and percentile(latencies, 0.95) < 0.5, latencies
        with slow_clients(server.port, 40 - (workers * threads - 1)):
            assert health_latencies(server.url, 1, timeout=3) == [math.inf]
    # Once the slow clients hang up, their threads come back.
    wait_for(lambda: health_latencies(server.url, 1, timeout=2)[0] < math.inf, 15,
             "gunicorn to answer again")


def test_gunicorn_alone_closes_a_connection_that_sends_nothing(
        start_gunicorn: Callable[..., Gunicorn], make_settings: Callable[..., Settings]) -> None:
    server = start_gunicorn(make_settings(), 1)
    with slow_clients(server.port, 1, b"") as (sock,):
        started = time.monotonic()
        # gthread waits 5 s for a first byte, then (keepalive = 0) closes it at once.
        assert closed_by_peer(sock, started + 10)
        assert 4 <= time.monotonic() - started <= 9
