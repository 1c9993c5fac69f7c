"""Webhooks: signing, verification, the SSRF policy, and real deliveries to a local receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from replicate_generation.errors import InvalidWebhook
from replicate_generation.jobs import webhooks
from replicate_generation.jobs.webhooks import DeliveryResult, targets

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(b"k" * 8 + bytes(range(24))).decode()
PLAIN_SECRET = "a plain shared secret, not base64"
PUBLIC_IP = "93.184.215.14"
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
PAYLOAD: dict[str, object] = {
    "id": "job_123", "state": "succeeded", "prompt": "café at dusk", "files": ["a.webp"],
}


# --------------------------------------------------------------------------- a real receiver


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP(S) server on 127.0.0.1 that records every request it gets."""

    server: ThreadingHTTPServer
    hits: list[Hit] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]


# path -> (status, extra headers)
ROUTES: dict[str, tuple[int, dict[str, str]]] = {
    "/ok": (200, {}),
    "/accepted": (202, {}),
    "/fail": (500, {}),
    "/gone": (410, {}),
    "/limited": (429, {"Retry-After": "7"}),
    "/redirect": (302, {"Location": "/target"}),
    "/target": (200, {}),
}


def _start(context: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    hits: list[Hit] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status, extra = ROUTES.get(self.path.split("?")[0], (404, {}))
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(server, hits)
    if context is not None:
        context.sni_callback = lambda _sock, name, _ctx: receiver.sni.append(name)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _start()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and key) for webhooks.invalid, a name DNS never resolves."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=webhooks.invalid",
         "-addext", "subjectAltName=DNS:webhooks.invalid",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True)
    return directory


@pytest.fixture
def tls_receiver(tls_cert: Path) -> Iterator[Receiver]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_cert / "cert.pem", tls_cert / "key.pem")
    yield from _start(context)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deliver_to(url: str, **kwargs: object) -> DeliveryResult:
    options: dict[str, object] = {
        "secret": SECRET, "msg_id": MSG_ID, "allow_private": True, "timeout": 5.0}
    options.update(kwargs)
    return webhooks.deliver(url, PAYLOAD, **options)  # type: ignore[arg-type]


def assert_no_secret(*texts: str | None) -> None:
    for text in texts:
        assert text is not None
        for needle in (SECRET, SECRET.removeprefix("whsec_"), PLAIN_SECRET):
            assert needle not in text


# --------------------------------------------------------------------------- the doc's snippet


def doc_snippet() -> str:
    text = (ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "docs/webhooks.md must hold exactly one python block: the snippet"
    return str(blocks[0])


def doc_verify() -> Callable[..., bool]:
    """The receiver's verification function, exactly as docs/webhooks.md prints it."""
    namespace: dict[str, object] = {}
    exec(compile(doc_snippet(), "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our doc
    function = namespace["verify_webhook"]
    assert callable(function)
    return function


# --------------------------------------------------------------------------- signing


def test_sign_matches_the_standard_webhooks_test_vector() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": signature}
    assert webhooks.verify(secret, headers, body, now=1614265330 + 10)


def test_secret_bytes_reads_whsec_and_plain_secrets() -> None:
    assert webhooks.secret_bytes(SECRET) == b"k" * 8 + bytes(range(24))
    assert webhooks.secret_bytes(PLAIN_SECRET) == PLAIN_SECRET.encode()
    assert webhooks.secret_bytes("naïve") == "naïve".encode()
    fresh = webhooks.new_secret()
    assert fresh.startswith("whsec_") and len(webhooks.secret_bytes(fresh)) == 32
    for bad in ("", "whsec_", "whsec_not*base64!" + SECRET):
        with pytest.raises(InvalidWebhook) as caught:
            webhooks.secret_bytes(bad)
        assert caught.value.field == "webhook"
        assert_no_secret(str(caught.value))


def test_sign_refuses_message_ids_that_blur_the_signed_fields() -> None:
    for msg_id in ("", "msg.1", "msg 1", "msg\n1", "msgé"):
        with pytest.raises(ValueError, match="msg_id"):
            webhooks.sign(SECRET, msg_id, 1, b"{}")
    assert "." not in webhooks.new_msg_id()


def signed_headers(secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {"webhook-id": MSG_ID, "webhook-timestamp": str(timestamp),
            "webhook-signature": webhooks.sign(secret, MSG_ID, timestamp, body)}


def test_verify_rejects_tampering_old_or_future_timestamps_and_wrong_keys() -> None:
    body = b'{"state":"succeeded"}'
    now = 1_700_000_000
    headers = signed_headers(SECRET, body, now)
    assert webhooks.verify(SECRET, headers, body, now=now + 299)
    assert not webhooks.verify(SECRET, headers, body + b" ", now=now)
    assert not webhooks.verify(SECRET, headers, b'{"state":"failed"}', now=now)
    assert not webhooks.verify(SECRET, headers, body, now=now + 301)
    assert not webhooks.verify(SECRET, headers, body, now=now - 301)
    assert not webhooks.verify(SECRET, headers, body, now=now + 30, tolerance=10)
    assert not webhooks.verify(PLAIN_SECRET, headers, body, now=now)
    # The timestamp and the id are signed too.
    assert not webhooks.verify(SECRET, {**headers, "webhook-timestamp": str(now + 1)}, body,
                               now=now)
    assert not webhooks.verify(SECRET, {**headers, "webhook-id": "msg_other"}, body, now=now)
    for missing in headers:
        assert not webhooks.verify(SECRET, {k: v for k, v in headers.items() if k != missing},
                                   body, now=now)
    for stamp in ("", "-1", "1e9", "１７００００００００", " 1700000000"):
        assert not webhooks.verify(SECRET, {**headers, "webhook-timestamp": stamp}, body, now=now)


def test_verify_accepts_any_of_several_v1_signatures_and_any_header_case() -> None:
    body = b"{}"
    now = 1_700_000_000
    good = signed_headers(SECRET, body, now)
    real = good["webhook-signature"]
    rotated = webhooks.sign(PLAIN_SECRET, MSG_ID, now, body)
    assert webhooks.verify(SECRET, {**good, "webhook-signature": f"{rotated} {real}"}, body,
                           now=now)
    assert webhooks.verify(SECRET, {**good, "webhook-signature": f"v1,AAAA {real} v1a,xyz"},
                           body, now=now)
    # Only v1 entries count, and the value must match exactly.
    assert not webhooks.verify(SECRET, {**good, "webhook-signature": "v1a" + real[2:]}, body,
                               now=now)
    assert not webhooks.verify(SECRET, {**good, "webhook-signature": real[3:]}, body, now=now)
    assert not webhooks.verify(SECRET, {**good, "webhook-signature": real + "x"}, body, now=now)
    assert not webhooks.verify(SECRET, {**good, "webhook-signature": "v1,ü"}, body, now=now)
    title_case = {key.title(): value for key, value in good.items()}
    assert webhooks.verify(SECRET, title_case, body, now=now)


# --------------------------------------------------------------------------- check_target


def fake_resolve(*addresses: str) -> Callable[[str, int], list[str]]:
    def resolve(_host: str, _port: int) -> list[str]:
        return list(addresses)
    return resolve


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook",
    "https://127.8.9.10/hook",
    "https://10.1.2.3/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://100.64.0.1/hook",
    "https://0.0.0.0/hook",
    "https://224.0.0.1/hook",
    "https://255.255.255.255/hook",
    "https://[::1]/hook",
    "https://[::]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:169.254.169.254]/hook",
    "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 for 169.254.169.254
    "https://[fd00::1]/hook",
    "https://[fe80::1]/hook",
    "https://[ff02::1]/hook",
    "https://[2001:db8::1]/hook",
    "https://[2002:7f00:1::]/hook",  # 6to4
])
def test_check_target_rejects_non_public_literal_addresses_for_users(url: str) -> None:
    with pytest.raises(InvalidWebhook, match="public address") as caught:
        webhooks.check_target(url, allow_private=False, resolve=fake_resolve(PUBLIC_IP))
    assert caught.value.field == "webhook"
    assert not caught.value.retryable


@pytest.mark.parametrize("answers", [
    ["127.0.0.1"], ["::1"], ["10.0.0.7"], ["169.254.169.254"], ["::ffff:10.0.0.1"],
    [PUBLIC_IP, "10.0.0.7"],  # one private answer is enough
])
def test_check_target_rejects_names_resolving_to_non_public_addresses(answers: list[str]) -> None:
    with pytest.raises(InvalidWebhook, match="non-public address"):
        webhooks.check_target("https://localhost/hook", allow_private=False,
                              resolve=fake_resolve(*answers))


@pytest.mark.parametrize(("url", "message"), [
    ("http://hooks.example.com/x", "https"),
    ("ftp://hooks.example.com/x", "https"),
    ("https://user:pass@hooks.example.com/x", "user name or password"),
    ("https://hooks.example.com@10.0.0.1/x", "user name or password"),
    ("https://hooks.example.com\\@10.0.0.1/x", "backslash"),
    ("https:///x", "no host"),
    ("hooks.example.com/x", "https"),
    ("https://hooks.example.com/a b", "whitespace"),
    ("https://hooks.example.com/\x00", "control"),
    ("https://hooks.exämple.com/", "ASCII"),
    ("https://hooks.example.com:0/", "port"),
    ("https://hooks.example.com:70000/", "port"),
    ("https://127.1/", "invalid host"),
    ("https://2130706433/", "invalid host"),
    ("https://0177.0.0.1/", "invalid host"),
    ("https://-bad-.example.com/", "invalid host"),
    ("https://[fe80::1%25eth0]/", "zone"),
    ("https://hooks.example.com/" + "a" * 2048, "2048"),
])
def test_check_target_rejects_malformed_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidWebhook, match=message) as caught:
        webhooks.check_target(url, allow_private=False, resolve=fake_resolve(PUBLIC_IP))
    assert "example" not in str(caught.value)  # the message never quotes the URL


def test_check_target_refuses_a_non_string() -> None:
    for value in (None, 5, ["https://hooks.example.com/"], b"https://hooks.example.com/", ""):
        with pytest.raises(InvalidWebhook, match="URL string"):
            webhooks.check_target(value, allow_private=True)


def test_check_target_accepts_public_https_and_normalises() -> None:
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return [PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]

    check = webhooks.check_target
    assert check("https://Hooks.Example.COM/cb?job=1#frag", allow_private=False,
                 resolve=resolve) == "https://hooks.example.com/cb?job=1"
    assert check("HTTPS://hooks.example.com.:443", allow_private=False,
                 resolve=resolve) == "https://hooks.example.com/"
    assert check("https://hooks.example.com:8443/x", allow_private=False,
                 resolve=resolve) == "https://hooks.example.com:8443/x"
    assert calls == [("hooks.example.com", 443)] * 2 + [("hooks.example.com", 8443)]
    assert check(f"https://{PUBLIC_IP}/x", allow_private=False,
                 resolve=resolve) == f"https://{PUBLIC_IP}/x"
    assert check("https://[2606:4700:0::1111]/x", allow_private=False) \
        == "https://[2606:4700::1111]/x"
    assert len(calls) == 3  # literal addresses are not resolved


def test_check_target_reports_an_unresolvable_host_as_retryable() -> None:
    def fail(_host: str, _port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for resolve in (fail, fake_resolve()):
        with pytest.raises(InvalidWebhook, match="could not be resolved") as caught:
            webhooks.check_target("https://hooks.example.com/", allow_private=False,
                                  resolve=resolve)
        assert caught.value.retryable
    with pytest.raises(InvalidWebhook, match="invalid address"):
        webhooks.check_target("https://hooks.example.com/", allow_private=False,
                              resolve=fake_resolve("not-an-ip"))


def test_admin_callers_may_target_private_http_hosts_without_resolving() -> None:
    def never(_host: str, _port: int) -> list[str]:
        raise AssertionError("admin targets are not resolved")

    for url in ("http://127.0.0.1:8080/hook", "http://internal-service:9000/cb",
                "https://10.0.0.5/x", "http://[::1]:8000/"):
        assert webhooks.check_target(url, allow_private=True, resolve=never).startswith("http")
    # The shape rules still hold for them.
    for url in ("ftp://internal/x", "http://u:p@internal/x", "http://internal/a b"):
        with pytest.raises(InvalidWebhook):
            webhooks.check_target(url, allow_private=True)


# --------------------------------------------------------------------------- deliveries


def test_delivery_is_signed_and_verifies_by_the_module_and_the_doc_snippet(
        receiver: Receiver) -> None:
    before = int(time.time())
    result = deliver_to(receiver.url("/ok?job=job_123"))
    assert result == DeliveryResult(ok=True, status=200, error=None, retry_after=None,
                                    retryable=False)
    [hit] = receiver.hits
    assert hit.path == "/ok?job=job_123"
    assert hit.body == json.dumps(PAYLOAD, separators=(",", ":")).encode()
    assert hit.body.isascii() and json.loads(hit.body) == PAYLOAD
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["user-agent"] == webhooks.USER_AGENT
    assert hit.headers["webhook-id"] == MSG_ID
    assert before <= int(hit.headers["webhook-timestamp"]) <= time.time()
    assert hit.headers["webhook-signature"].startswith("v1,")
    assert "authorization" not in hit.headers and "cookie" not in hit.headers

    assert webhooks.verify(SECRET, hit.headers, hit.body)
    verify_webhook = doc_verify()
    assert verify_webhook(SECRET, hit.headers, hit.body)
    # The snippet is a real check, not a rubber stamp.
    assert not verify_webhook(SECRET, hit.headers, hit.body.replace(b"succeeded", b"failed"))
    assert not verify_webhook(PLAIN_SECRET, hit.headers, hit.body)
    stale = {**hit.headers, "webhook-timestamp": str(before - 301)}
    assert not verify_webhook(SECRET, stale, hit.body)
    assert not webhooks.verify(SECRET, stale, hit.body)
    # An independent HMAC, straight from the spec's definition.
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{MSG_ID}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert hit.headers["webhook-signature"] == f"v1,{expected}"


def test_delivery_with_a_plain_secret_verifies_by_the_doc_snippet(receiver: Receiver) -> None:
    now = 1_700_000_123.9
    result = deliver_to(receiver.url("/accepted"), secret=PLAIN_SECRET, clock=lambda: now)
    assert result.ok and result.status == 202
    [hit] = receiver.hits
    assert hit.headers["webhook-timestamp"] == "1700000123"
    assert webhooks.verify(PLAIN_SECRET, hit.headers, hit.body, now=now)
    assert not webhooks.verify(SECRET, hit.headers, hit.body, now=now)
    fresh = deliver_to(receiver.url("/ok"), secret=PLAIN_SECRET)
    assert fresh.ok
    assert doc_verify()(PLAIN_SECRET, receiver.hits[-1].headers, receiver.hits[-1].body)


def test_a_5xx_is_retryable(receiver: Receiver) -> None:
    result = deliver_to(receiver.url("/fail"))
    assert (result.ok, result.status, result.retryable, result.retry_after) == (
        False, 500, True, None)
    assert result.error == "the receiver answered 500"
    assert webhooks.retry_delay(result, 1, jitter=lambda: 1.0) == 5.0
    assert webhooks.retry_delay(result, webhooks.MAX_ATTEMPTS) is None


def test_410_gone_is_permanent(receiver: Receiver) -> None:
    result = deliver_to(receiver.url("/gone"))
    assert (result.ok, result.status, result.retryable, result.retry_after) == (
        False, 410, False, None)
    assert result.gone
    assert result.error is not None and "410" in result.error
    assert webhooks.retry_delay(result, 1) is None


def test_a_redirect_is_a_failure_and_is_never_followed(receiver: Receiver) -> None:
    result = deliver_to(receiver.url("/redirect"))
    assert (result.ok, result.status) == (False, 302)
    assert result.error is not None and "redirect" in result.error
    assert receiver.paths() == ["/redirect"]  # the Location target was never hit


def test_429_retry_after_is_reported_and_honoured(receiver: Receiver) -> None:
    result = deliver_to(receiver.url("/limited"))
    assert (result.ok, result.status, result.retryable, result.retry_after) == (
        False, 429, True, 7.0)
    assert webhooks.retry_delay(result, 1, jitter=lambda: 0.0) == 7.0  # above the 2.5 s backoff
    assert webhooks.retry_delay(result, 4, jitter=lambda: 0.0) == 160.0  # backoff is longer
    huge = DeliveryResult(ok=False, status=429, error="x", retry_after=86400.0, retryable=True)
    assert webhooks.retry_delay(huge, 1) == 3600.0  # capped


def test_a_connection_error_is_retryable() -> None:
    result = deliver_to(f"http://127.0.0.1:{closed_port()}/hook")
    assert (result.ok, result.status, result.retryable) == (False, None, True)
    assert result.error == "could not connect to the receiver"


def test_deliver_rechecks_the_target_and_never_connects_to_a_rebound_address(
        receiver: Receiver) -> None:
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])

    def rebinding(_host: str, _port: int) -> list[str]:
        return next(answers)

    url = f"https://rebind.example.com:{receiver.port}/ok"
    accepted = webhooks.check_target(url, allow_private=False, resolve=rebinding)
    result = deliver_to(accepted, allow_private=False, resolve=rebinding)
    assert (result.ok, result.status, result.retryable) == (False, None, False)
    assert result.error == "webhook host resolves to a non-public address"
    assert receiver.hits == []


def test_deliver_refuses_private_and_http_targets_for_users(receiver: Receiver) -> None:
    for url in (receiver.url("/ok"), f"https://127.0.0.1:{receiver.port}/ok"):
        result = deliver_to(url, allow_private=False)
        assert not result.ok and not result.retryable and result.status is None
    assert receiver.hits == []


def test_deliver_raises_for_bugs_and_configuration_errors(receiver: Receiver) -> None:
    with pytest.raises(ValueError, match="msg_id"):
        deliver_to(receiver.url("/ok"), msg_id="a.b")
    with pytest.raises(InvalidWebhook) as caught:
        deliver_to(receiver.url("/ok"), secret="whsec_%%%")
    assert_no_secret(str(caught.value))
    with pytest.raises(ValueError):
        webhooks.deliver(receiver.url("/ok"), {"x": float("nan")}, secret=SECRET,
                         msg_id=MSG_ID, allow_private=True)
    assert receiver.hits == []


# --------------------------------------------------------------------------- pinned TLS


@pytest.fixture
def loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the public-only path target this machine, so it can be tested end to end."""
    real = targets._is_public

    def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return ip.is_loopback or real(ip)

    monkeypatch.setattr(targets, "_is_public", is_public)


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_user_delivery_connects_to_the_checked_address_with_the_host_name_for_tls(
        tls_receiver: Receiver, tls_cert: Path) -> None:
    # webhooks.invalid never resolves: the delivery can only arrive through the pinned address.
    # 127.0.0.2 refuses (nothing listens there), so the next checked address is tried.
    resolved: list[str] = []

    def resolve(host: str, _port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.2", "127.0.0.1"]

    session = webhooks.new_session()
    session.verify = str(tls_cert / "cert.pem")
    try:
        result = deliver_to(f"https://webhooks.invalid:{tls_receiver.port}/ok",
                            allow_private=False, resolve=resolve, session=session)
    finally:
        session.close()
    assert result.ok, result.error
    assert resolved == ["webhooks.invalid"]
    [hit] = tls_receiver.hits
    assert hit.headers["host"] == f"webhooks.invalid:{tls_receiver.port}"
    assert tls_receiver.sni == ["webhooks.invalid"]
    assert webhooks.verify(SECRET, hit.headers, hit.body)


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_pinned_tls_still_checks_the_certificate_against_the_host_name(
        tls_receiver: Receiver, tls_cert: Path) -> None:
    session = webhooks.new_session()
    session.verify = str(tls_cert / "cert.pem")
    try:
        # The certificate is for webhooks.invalid, not other.invalid.
        result = deliver_to(f"https://other.invalid:{tls_receiver.port}/ok", allow_private=False,
                            resolve=fake_resolve("127.0.0.1"), session=session)
        # A certificate nobody trusts fails too.
        untrusted = deliver_to(f"https://webhooks.invalid:{tls_receiver.port}/ok",
                               allow_private=False, resolve=fake_resolve("127.0.0.1"))
    finally:
        session.close()
    for failed in (result, untrusted):
        assert (failed.ok, failed.status, failed.retryable) == (False, None, True)
        assert failed.error is not None and "TLS" in failed.error
    assert tls_receiver.hits == []


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_and_is_capped() -> None:
    top = [webhooks.backoff(n, jitter=lambda: 1.0) for n in range(1, 9)]
    assert top == [5.0, 20.0, 80.0, 320.0, 1280.0, 3600.0, 3600.0, 3600.0]
    bottom = [webhooks.backoff(n, jitter=lambda: 0.0) for n in range(1, 9)]
    assert bottom == [d / 2 for d in top]
    assert webhooks.backoff(10_000, jitter=lambda: 1.0) == 3600.0
    assert webhooks.backoff(3, base=1.0, cap=10.0, factor=2.0, jitter=lambda: 1.0) == 4.0
    assert webhooks.backoff(9, base=1.0, cap=10.0, factor=2.0, jitter=lambda: 1.0) == 10.0
    for n in range(1, 30):
        assert 0 < webhooks.backoff(n) <= 3600.0
    for bad in (0, -1):
        with pytest.raises(ValueError):
            webhooks.backoff(bad)


def test_retry_delay_stops_on_success_and_after_the_last_attempt() -> None:
    ok = DeliveryResult(ok=True, status=200, error=None, retry_after=None)
    failed = DeliveryResult(ok=False, status=503, error="x", retry_after=None, retryable=True)
    assert webhooks.retry_delay(ok, 1) is None
    delays = [webhooks.retry_delay(failed, n, jitter=lambda: 1.0) for n in range(1, 9)]
    assert delays[:-1] == [5.0, 20.0, 80.0, 320.0, 1280.0, 3600.0, 3600.0]
    assert delays[-1] is None
    assert webhooks.retry_delay(failed, 2, max_attempts=2) is None


# --------------------------------------------------------------------------- secrecy


def test_no_error_text_ever_contains_the_secret(receiver: Receiver) -> None:
    texts: list[str | None] = []
    for secret in (SECRET, PLAIN_SECRET):
        for path in ("/fail", "/gone", "/redirect", "/limited", "/missing"):
            texts.append(deliver_to(receiver.url(path), secret=secret).error)
        texts.append(deliver_to(f"http://127.0.0.1:{closed_port()}/", secret=secret).error)
        texts.append(deliver_to(f"https://u:{secret}@hooks.example.com/", secret=secret,
                                allow_private=False, resolve=fake_resolve(PUBLIC_IP)).error)
        texts.append(deliver_to(f"https://hooks.example.com/?key={secret}", secret=secret,
                                allow_private=False, resolve=fake_resolve("10.0.0.1")).error)
    for secret in ("whsec_" + "%" * 30, "whsec_" + SECRET):
        with pytest.raises(InvalidWebhook) as caught:
            webhooks.secret_bytes(secret)
        texts.append(str(caught.value))
    assert_no_secret(*texts)
