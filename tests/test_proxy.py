"""The shipped reverse proxy (deploy/nginx.conf, issue #10 findings 4 and 13) and what gunicorn
alone still withstands.

nginx runs the very file docker-compose.yml mounts, with only its listen port, upstream address and
pid/log/temp paths changed, in front of a real gunicorn against the simulator on 127.0.0.1.
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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ADMIN, ADMIN_KEY, SERVER_TOKEN, USER_TOKEN
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, free_port, wait_for

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# What compose gives nginx; the test rendering swaps these for 127.0.0.1 values and tmp paths.
COMPOSE_UPSTREAM = "replicate-generation:5003"
COMPOSE_LISTEN = "listen 8080;"
# A request line cut in half: the client never sends the rest.
HALF_REQUEST_LINE = b"GET /health HT"
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


def shipped_seconds(directive: str) -> int:
    """A `directive Ns;` value from the shipped config."""
    match = re.search(rf"^\s*{directive} (\d+)s;", NGINX_CONF.read_text(), re.M)
    assert match, f"{directive} not found in deploy/nginx.conf"
    return int(match[1])


def render_config(work: Path, listen_port: int, upstream_port: int) -> Path:
    """The shipped file with only the host, port and path values a test needs changed."""
    text = NGINX_CONF.read_text()
    substitutions = {
        COMPOSE_UPSTREAM: f"127.0.0.1:{upstream_port}",
        COMPOSE_LISTEN: f"listen 127.0.0.1:{listen_port};",
        "/var/run/nginx.pid": str(work / "nginx.pid"),
        "/var/log/nginx/": f"{work / 'logs'}/",
        "/var/cache/nginx/": f"{work / 'cache'}/",
    }
    for old, new in substitutions.items():
        assert old in text, f"deploy/nginx.conf lost {old!r}: update render_config"
        text = text.replace(old, new)
    rendered = work / "nginx.conf"
    rendered.write_text(text)
    return rendered


class Nginx:
    """nginx in the foreground (as the image runs it) with the rendered shipped config."""

    def __init__(self, binary: str, work: Path, upstream_port: int) -> None:
        for directory in (work, work / "logs", work / "cache"):
            directory.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = render_config(work, self.port, upstream_port)
        # The image's CMD adds `daemon off;`; as root, workers keep root to reach tmp_path.
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        self._out = (work / "logs" / "stdout.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", f"{work}/", "-e", str(work / "logs" / "error.log"),
             "-g", directives],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

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


@contextmanager
def slow_clients(port: int, count: int, head: bytes = HALF_REQUEST_LINE) -> Iterator[
        list[socket.socket]]:
    """`count` connections that send `head` and then nothing; closed when the block ends."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def health_latencies(url: str, count: int, timeout: float = 5.0) -> list[float]:
    """Seconds per sequential GET /health; a failure or timeout counts as infinity."""
    latencies = []
    for _ in range(count):
        start = time.monotonic()
        try:
            ok = requests.get(url + "/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            ok = False
        latencies.append(time.monotonic() - start if ok else math.inf)
    return latencies


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


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return the status, headers (lower-cased names) and body."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(request)
        except (ConnectionResetError, BrokenPipeError):
            pass  # nginx may answer and stop reading before the whole request is sent
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # nginx resets after refusing a body it did not read; the answer is in
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), {k.lower(): v for k, v in headers.items()}, body


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


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    """The service's one error shape, written by nginx: {"error": "..."} as JSON."""
    assert status == expected, (status, body[:200])
    assert headers["content-type"] == "application/json", headers
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and isinstance(parsed["error"], str), parsed


def get_request(target: bytes, headers: bytes = b"", method: bytes = b"GET") -> bytes:
    return (method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + headers
            + b"Connection: close\r\n\r\n")


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
        deadline = time.monotonic() + shipped_seconds("client_header_timeout") + 3
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
        timeout = shipped_seconds("client_body_timeout")
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


# --------------------------------------------------------------------------- the config itself


def test_every_proxy_error_page_is_json_with_its_status() -> None:
    text = NGINX_CONF.read_text()
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


def test_the_proxy_limits_match_the_service_settings() -> None:
    text = NGINX_CONF.read_text()
    defaults = Settings()
    size = re.search(r"client_max_body_size (\d+)m;", text)
    assert size and int(size[1]) * 2**20 == defaults.max_request_bytes
    assert shipped_seconds("proxy_read_timeout") > defaults.task_timeout_seconds


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
    text = NGINX_CONF.read_text()
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
    assert read <= forwarded, f"add to deploy/nginx.conf: {sorted(read - forwarded)}"
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
