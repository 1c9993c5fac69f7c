"""Hostile and odd traffic (issue #10): every request gets a 4xx in the one JSON error shape,
nothing a client sends can forge a log line, file URLs serve their own file, and upstream error
text never carries the caller's token."""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, ADMIN_KEY, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn

SIMPLE = {"model_name": "flux-dev", "prompt": "x"}
DRY_RUN = '{"model_name":"flux-dev","prompt":"x","dry_run":true}'
JSON = {**ADMIN, "Content-Type": "application/json"}
FORGED = "2026-12-01 15:00:00,000 CRITICAL app: FORGED"
# Names that each need percent-encoding in a URL, and two that only quoting tells apart.
ODD_NAMES = ["a#b", "%2e%2e%2fx", "x%00", "a%20b", "a b", "é ü", "50%", "a;b=c&d"]


def post_raw(client: FlaskClient, path: str, raw: str | bytes,
             headers: dict[str, str] | None = None) -> Any:
    return client.post(path, data=raw, headers=headers or JSON)


def assert_error_shape(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    body = response.get_json()
    assert response.status_code == status, body
    assert isinstance(body["error"], str)
    if field is not None:
        assert body["field"] == field, body
    return dict(body)


def raw_http(server: Gunicorn, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (requests would fix them up); return the status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def admin_request(method: str, target: str, headers: bytes = b"", body: bytes = b"") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Admin-API-Key: {ADMIN_KEY}\r\n"
            "Connection: close\r\n").encode() + headers + b"\r\n" + body


# --------------------------------------------------------------------------- 6. null byte


def test_a_null_byte_in_a_file_path_is_a_404(client: FlaskClient) -> None:
    for path in ("/files/nothing%00", "/files/%00", "/files/req/x%00.png"):
        assert_error_shape(client.get(path, headers=ADMIN), 404)


def test_a_null_byte_in_a_file_path_is_a_404_through_gunicorn(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=1)
    status, body = raw_http(server, admin_request("GET", "/files/nothing%00"))
    assert status == 404 and b'"error"' in body


# --------------------------------------------------------------------------- 7. nesting


@pytest.mark.parametrize("raw", ["[" * 1000 + "]" * 1000,
                                 '{"a":' * 1000 + "1" + "}" * 1000,
                                 '{"model_name":"flux-dev","prompt":' + "[" * 50 + "]" * 50 + "}"])
def test_a_deeply_nested_body_is_a_400(client: FlaskClient, sim: Simulator, raw: str) -> None:
    body = assert_error_shape(post_raw(client, "/generate", raw), 400)
    assert "levels deep" in body["error"]
    assert sim.predictions() == []


# --------------------------------------------------------------------------- 8. surrogates

SURROGATE = "\\ud800"  # as the JSON escape a client sends
SURROGATE_BODIES = [
    ("/generate", '{"model_name":"flux-dev","prompt":"a%sb"}', "prompt"),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","webhook":"http://e.com/%s"}',
     "webhook"),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","custom_filename":"n%s"}',
     "custom_filename"),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","aspect_ratio":"%s"}', "aspect_ratio"),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","dry_run":true,"note%s":1}',
     "note\\ud800"),
    ("/generate-batch", '{"model_name":"flux-dev","prompts":["ok","b%s"]}', "prompts[1]"),
    ("/generate-batch", '{"model_name":"flux-dev","prompts":["a","b"],'
                        '"custom_filenames":["a","%s"]}', "custom_filenames[1]"),
    ("/generate-batch", '{"tasks":[{"model_name":"flux-dev","prompt":"%s"}]}', "tasks[0].prompt"),
    ("/configure", '{"concurrent_limit":"%s"}', "concurrent_limit"),
]


@pytest.mark.parametrize(("path", "template", "field"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_any_string_is_a_400_naming_the_field(
        client: FlaskClient, sim: Simulator, path: str, template: str, field: str) -> None:
    response = post_raw(client, path, template % SURROGATE)
    assert_error_shape(response, 400, field)
    assert sim.predictions() == []


def test_a_lone_surrogate_as_raw_body_bytes_is_a_400(client: FlaskClient) -> None:
    # CESU-style bytes for U+D800: json.loads would take them as a lone surrogate.
    raw = b'{"model_name":"flux-dev","prompt":"\xed\xa0\x80"}'
    assert_error_shape(post_raw(client, "/generate", raw), 400)


def test_an_idempotency_key_that_is_not_ascii_is_a_400(client: FlaskClient) -> None:
    for key in ("\ud800", "é", "a\x00b"):
        for body in (SIMPLE, {**SIMPLE, "dry_run": True}):  # a dry run checks it too
            response = client.post("/generate", json=body, headers={**ADMIN,
                                                                    "Idempotency-Key": key})
            assert_error_shape(response, 400, "Idempotency-Key")


def test_a_webhook_the_server_cannot_send_is_a_400_for_a_dry_run_too(
        client: FlaskClient) -> None:
    body = {**SIMPLE, "dry_run": True, "webhook": "https://example.com/hook"}
    assert_error_shape(client.post("/generate", json=body, headers=ADMIN), 400, "webhook")


def test_odd_key_fields_and_usage_periods_get_a_400_or_an_answer_never_a_500(
        client: FlaskClient) -> None:
    for body, field in (({"name": "abc\n"}, "name"),
                        ({"name": "ok", "models": ["flux-dev\n"]}, "models"),
                        ({"name": "ok", "expires_at": "9999-12-31T23:59:59-23:59"},
                         "expires_at")):
        assert_error_shape(client.post("/keys", json=body, headers=ADMIN), 400, field)
    for query in ("to=9999-12-31", "from=9999-12-31T00:00:00Z&to=9999-12-31"):
        response = client.get(f"/usage?{query}", headers=ADMIN)
        assert response.status_code == 200, response.get_json()


# --------------------------------------------------------------------------- 9. log injection


def test_app_log_records_escape_control_characters(make_app: Callable[..., Flask]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        make_app()  # the logging setup installs its filters on the root's handlers
        log = logging.getLogger("replicate_generation.app")
        log.warning("unhandled error on GET %s", f"/x\n{FORGED}\r\x1b[2J\u2028")
        try:
            raise ValueError(f"bad\n{FORGED}")
        except ValueError:
            log.exception("failed on %s", "/y\n" + FORGED)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], lines
    (warning,) = [line for line in lines if "unhandled error on GET" in line]
    assert "\\n" + FORGED in warning and "\\x1b" in warning and "\\u2028" in warning


def test_a_forged_line_in_a_path_never_reaches_gunicorns_logs_as_a_line(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=1)
    forged_path = "/x%0a" + FORGED.replace(" ", "%20") + "%0d%0a" + FORGED.replace(" ", "%20")
    status, _ = raw_http(server, admin_request("GET", forged_path))
    assert status == 404
    server.stop()
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], lines[-20:]
    assert any("GET /x\\n" + FORGED + "\\r\\n" + FORGED in line for line in lines)


# --------------------------------------------------------------------------- 11. file URLs


def test_every_items_url_serves_exactly_its_own_file(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=1)
    body = {"model_name": "flux-dev", "prompts": [f"p{i}" for i in range(len(ODD_NAMES))],
            "custom_filenames": ODD_NAMES}
    answer = server.post("/generate-batch", body, ADMIN)
    assert answer.status_code == 200, answer.text
    items = answer.json()["results"]
    contents = []
    for item in items:
        (url,), (path,) = item["urls"], item["files"]
        served = requests.get(server.url + url, headers=ADMIN, timeout=30)
        assert served.status_code == 200, (url, served.text)
        assert served.content == Path(path).read_bytes(), url
        contents.append(served.content)
    assert len(set(contents)) == len(ODD_NAMES)  # distinct files, so no URL served another's


# --------------------------------------------------------------------------- 12. chunked body


def test_a_chunked_body_over_the_limit_is_a_413_through_gunicorn(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(max_request_bytes=4096), workers=1,
                            MAX_REQUEST_BYTES="4096")
    chunked_headers = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    big = b'{"model_name":"flux-dev","prompt":"' + b"x" * 8000 + b'","dry_run":true}'
    status, body = raw_http(server, admin_request("POST", "/generate", chunked_headers,
                                                  chunked(big)))
    assert status == 413 and b'"error"' in body
    small = b'{"model_name":"flux-dev","prompt":"x","dry_run":true}'
    status, body = raw_http(server, admin_request("POST", "/generate", chunked_headers,
                                                  chunked(small, 10)))
    assert status == 200, body


# --------------------------------------------------------------------------- 14. token echoes

ODD_TOKEN = "weird.Token~shape:42"  # a valid user key that looks nothing like r8_...


def _echoing_problem(token: str) -> dict[str, Any]:
    return {"title": f"Bad token {token}", "status": 422,
            "detail": f"Token {token} (Authorization: Bearer {token}) may not run this; "
                      f"r8_{'Z' * 37} neither"}


def _failed_prediction(token: str) -> dict[str, Any]:
    return {"id": "echoed", "model": "black-forest-labs/flux-dev", "version": "v",
            "status": "failed", "input": {}, "output": None, "logs": "", "metrics": {},
            "error": f"model crashed using {token}", "created_at": None, "started_at": None,
            "completed_at": None, "urls": {}}


def _state_bytes(settings: Settings) -> bytes:
    folder = settings.state_file.parent
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())


@pytest.mark.parametrize("token", [USER_TOKEN, ODD_TOKEN])
def test_upstream_error_text_never_carries_the_callers_token(
        app: Flask, client: FlaskClient, sim: Simulator, caplog: pytest.LogCaptureFixture,
        token: str) -> None:
    caplog.set_level(logging.DEBUG)
    headers = {"X-Replicate-API-Key": token}
    body = {**SIMPLE, "fallback": False}
    sim.inject("POST", r"/predictions$", 422, _echoing_problem(token))
    refused = client.post("/generate", json=body, headers=headers)
    sim.config.run_seconds = 3.0  # still running after the create's hold: it gets polled
    sim.inject("GET", r"/predictions/[^/]+$", 200, _failed_prediction(token))
    failed = client.post("/generate", json=body, headers=headers)
    for response in (refused, failed):
        text = response.get_data(as_text=True)
        assert response.status_code >= 400 and "[redacted]" in text, text
        assert token not in text and "Z" * 37 not in text
    assert token.encode() not in _state_bytes(app.extensions["settings"])
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert token not in logged


# --------------------------------------------------------------------------- the sweep

ODD_BODIES: list[tuple[str, str | bytes, dict[str, str]]] = [
    ("/generate", '{"model_name":"flux-dev","prompt":"x","seed":1e999}', JSON),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","guidance":' + "9" * 400 + "}", JSON),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","guidance":NaN}', JSON),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","guidance":-Infinity}', JSON),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","seed":' + "9" * 5000 + "}", JSON),
    ("/configure", '{"concurrent_limit":1e999}', JSON),
    ("/configure", '{"burst":' + "9" * 400 + "}", JSON),
    ("/generate", '{"model_name":"flux-dev","prompt":"x","prompt":"y"}', JSON),
    ("/generate", '{"model_name":"flux-kontext-max","prompt":"x","input_image":"http://["}',
     JSON),
    ("/generate", b'{"model_name":"flux-dev","prompt":"\xff\xfe"}', JSON),
    ("/generate", b"", JSON),
    ("/generate", b"\x00\x00\x00", JSON),
    ("/generate", "null", JSON),
    ("/generate", "{}", {**ADMIN, "Content-Type": "multipart/form-data; boundary=x"}),
    ("/generate", "{}", {**ADMIN, "Content-Type": "application/json", "Prefer": "\x7f;;,"}),
]


@pytest.mark.parametrize(("path", "raw", "headers"), ODD_BODIES)
def test_no_odd_body_or_header_gets_a_500(client: FlaskClient, sim: Simulator, path: str,
                                          raw: str | bytes, headers: dict[str, str]) -> None:
    response = post_raw(client, path, raw, headers)
    assert 400 <= response.status_code < 500, response.get_data()
    assert isinstance(response.get_json()["error"], str)
    assert sim.predictions() == []


@pytest.mark.parametrize(("raw", "content_type"), [
    (DRY_RUN, "application/json; charset=\x01bogus"),
    (DRY_RUN.encode("utf-16"), "application/json; charset=latin-1"),
    (b"\xef\xbb\xbf" + DRY_RUN.encode(), "application/json; charset=utf-8"),
    (DRY_RUN.encode("utf-32-le"), "application/json"),
])
def test_the_charset_parameter_is_ignored_as_json_says(
        client: FlaskClient, raw: str | bytes, content_type: str) -> None:
    # RFC 8259: JSON is UTF-8 (or UTF-16/32, told apart by its first bytes), whatever the label.
    response = post_raw(client, "/generate", raw, {**ADMIN, "Content-Type": content_type})
    assert response.status_code == 200 and response.get_json()["dry_run"] is True


def test_strict_json_names_what_it_refuses(client: FlaskClient) -> None:
    duplicate = post_raw(client, "/generate", '{"model_name":"flux-dev","prompt":"x","prompt":1}')
    assert "twice" in assert_error_shape(duplicate, 400, "prompt")["error"]
    huge = post_raw(client, "/generate-batch", '{"tasks":[{"model_name":"flux-dev",'
                                               '"prompt":"x","guidance":1e999}]}')
    assert_error_shape(huge, 400, "tasks[0].guidance")
    assert_error_shape(post_raw(client, "/generate", '{"seed":NaN}'), 400)


@pytest.mark.parametrize("query", ["limit=" + "9" * 5000, "limit=%00", "limit=%D9%A1%D9%A2%D9%A3",
                                   "after=%ED%A0%80", "after=" + "x" * 3000])
def test_no_odd_query_gets_a_500(client: FlaskClient, query: str) -> None:
    response = client.get("/jobs?" + query, headers=USER)
    assert 200 <= response.status_code < 500 and response.status_code != 500
    assert response.is_json


def test_no_odd_file_path_or_key_header_gets_a_500(client: FlaskClient) -> None:
    for path in ("/files/%ff%fe", "/files/%ED%A0%80", "/files/" + "a/" * 200, "/files/..%2f..",
                 "/jobs/%00", "/jobs/%ED%A0%80/cancel"):
        method = client.post if path.endswith("/cancel") else client.get
        response = method(path, headers=ADMIN)
        assert response.status_code == 404 and response.is_json, path
    for headers in ({"X-Admin-API-Key": "\xe9\xff\x00"}, {"X-Replicate-API-Key": "\x00" * 10},
                    {"X-Replicate-API-Key": SERVER_TOKEN + "\u2028"}):
        assert_error_shape(client.post("/generate", json=SIMPLE, headers=headers), 401)
