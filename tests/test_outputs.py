"""outputs.py against a real HTTP server on 127.0.0.1 serving real magic-byte samples."""

from __future__ import annotations

import base64
import gzip
import io
import ipaddress
import socket
import struct
import threading
import time
import uuid
import wave
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

from replicate_generation.egress import EgressPolicy
from replicate_generation.errors import InvalidName
from replicate_generation.outputs import (
    DownloadError,
    SavedFile,
    default_stem,
    output_sources,
    safe_filename,
    save_outputs,
    sniff_extension,
)

# --------------------------------------------------------------------------- samples


def _png() -> bytes:
    """A valid 1x1 RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg() -> bytes:
    """SOI + JFIF APP0 + EOI: the header every JPEG encoder writes."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0 + b"\xff\xd9"


def _webp() -> bytes:
    payload = b"VP8L" + struct.pack("<I", 6) + b"\x2f\x00\x00\x00\x00\x00"
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


def _iso_media(brand: bytes) -> bytes:
    ftyp = b"ftyp" + brand + struct.pack(">I", 512) + brand + b"iso2"
    mdat = b"mdat" + bytes(16)
    return struct.pack(">I", 4 + len(ftyp)) + ftyp + struct.pack(">I", 4 + len(mdat)) + mdat


def _wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x01" * 80)
    return buffer.getvalue()


def _ebml(doctype: bytes) -> bytes:
    return b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82" + bytes([0x80 | len(doctype)]) + doctype


PNG = _png()
JPEG = _jpeg()
WEBP = _webp()
MP4 = _iso_media(b"isom")
MOV = _iso_media(b"qt  ")
M4A = _iso_media(b"M4A ")
WAV = _wav()
GIF = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + bytes(9) + b";"
WEBM = _ebml(b"webm")
MKV = _ebml(b"matroska")
FLAC = b"fLaC\x80\x00\x00\x22" + bytes(34)
OGG = b"OggS\x00\x02" + bytes(22)
MP3_ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(64)
MP3_SYNC = b"\xff\xfb\x90\x64" + bytes(64)
AAC = b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(32)
OPAQUE = b"\x00\x01\x02 no known signature here"

TOKEN = "r8_secret_token_value"  # a fake token: the tests look for it where it must not be


# --------------------------------------------------------------------------- server


@dataclass
class Reply:
    status: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class SampleApp:
    """A WSGI app with one route per behaviour; counts hits and records auth headers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.auth: dict[str, str | None] = {}
        self.release = threading.Event()  # ends slow responses at teardown
        self.routes: dict[str, Callable[[dict[str, Any], int], Reply]] = {
            "/img/png": lambda env, n: ok(PNG, "image/png"),
            "/img/jpeg": lambda env, n: ok(JPEG, "image/jpeg"),
            "/img/webp-octet": lambda env, n: ok(WEBP, "application/octet-stream"),
            "/video": lambda env, n: ok(MP4, "video/mp4"),
            "/audio": lambda env, n: ok(WAV, "audio/wav"),
            "/misnamed.jpg": lambda env, n: ok(PNG, "image/jpeg"),
            "/opaque": lambda env, n: ok(OPAQUE, "application/octet-stream"),
            "/opaque.mp3": lambda env, n: ok(OPAQUE, "application/octet-stream"),
            "/text": lambda env, n: ok(b"hello", "text/plain; charset=utf-8"),
            "/flaky": lambda env, n: fail(500) if n <= 2 else ok(PNG, "image/png"),
            "/always500": lambda env, n: fail(500),
            "/throttled": lambda env, n: (
                fail(429, [("Retry-After", "0")]) if n == 1 else ok(PNG, "image/png")
            ),
            "/missing": lambda env, n: fail(404),
            "/slow": self._slow,
            "/trickle": self._trickle,
            "/auth": lambda env, n: ok(PNG, "image/png"),
            "/redirect": self._redirect,
            "/empty": lambda env, n: ok(b"", "image/png"),
            "/gzip": lambda env, n: Reply(
                "200 OK", [("Content-Encoding", "gzip")], [gzip.compress(WEBP)]
            ),
            "/chunked": lambda env, n: Reply("200 OK", [], iter([JPEG[:5], JPEG[5:]])),
            "/big": lambda env, n: ok(PNG + bytes(5000), "image/png"),
            "/big-chunked": lambda env, n: Reply(
                "200 OK", [("Content-Type", "image/png")], iter([PNG, bytes(5000)])
            ),
        }

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        # "/flaky/<key>": the first segment picks the behaviour, the full path counts hits
        path = environ["PATH_INFO"]
        route = "/" + path.split("/")[1]
        with self.lock:
            self.hits[path] += 1
            count = self.hits[path]
            self.auth[path] = environ.get("HTTP_AUTHORIZATION")
        handler = self.routes.get(route) or self.routes.get(path)
        reply = handler(environ, count) if handler else fail(404)
        start_response(reply.status, reply.headers)
        return reply.body

    def _slow(self, environ: dict[str, Any], n: int) -> Reply:
        self.release.wait(5)
        return ok(PNG, "image/png")

    def _trickle(self, environ: dict[str, Any], n: int) -> Reply:
        def body() -> Iterator[bytes]:
            for byte in PNG:
                if self.release.wait(0.05):
                    return
                yield bytes([byte])

        return Reply("200 OK", [("Content-Length", str(len(PNG)))], body())

    def _redirect(self, environ: dict[str, Any], n: int) -> Reply:
        target = parse_qs(environ["QUERY_STRING"])["to"][0]
        return Reply("302 Found", [("Location", target), ("Content-Length", "0")], [])


def ok(body: bytes, content_type: str) -> Reply:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    return Reply("200 OK", headers, [body])


def fail(code: int, extra: list[tuple[str, str]] | None = None) -> Reply:
    body = b"nope"
    headers = [("Content-Length", str(len(body))), *(extra or [])]
    return Reply(f"{code} Whatever", headers, [body])


class QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        """Keep test output clean."""


@dataclass
class Servers:
    app: SampleApp
    a: str  # two origins: same host, different ports
    b: str

    def key(self, route: str, origin: str | None = None) -> tuple[str, str]:
        """A fresh URL for a counting route, and the path its hits are counted under."""
        path = f"{route}/{uuid.uuid4().hex}"
        return f"{origin or self.a}{path}", path


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    app = SampleApp()
    running = []
    for _ in range(2):
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread))
    yield Servers(app, *(f"http://127.0.0.1:{s.server_port}" for s, _ in running))
    app.release.set()
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


# The sample servers listen on 127.0.0.1, which the egress policy refuses unless allowed.
LOOPBACK = EgressPolicy(allow_private=(ipaddress.ip_network("127.0.0.0/8"),))


def save(sources: Sequence[object], root: Path, stem: str = "car", **kw: Any) -> list[SavedFile]:
    kw.setdefault("deadline", time.time() + 10)
    kw.setdefault("policy", LOOPBACK)
    return save_outputs(sources, root / "req_abc", stem, root=root, **kw)


def listing(directory: Path) -> list[str]:
    """Every entry, hidden ones included: temp files start with '.'."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------- naming


def test_single_output_is_named_stem_with_real_extension(servers: Servers, root: Path) -> None:
    [saved] = save([f"{servers.a}/img/png"], root)
    assert saved.relative == "req_abc/car.png"
    assert saved.path == (root / "req_abc" / "car.png").resolve()
    assert saved.path.read_bytes() == PNG
    assert (saved.size, saved.content_type) == (len(PNG), "image/png")
    assert listing(root / "req_abc") == ["car.png"]


def test_several_outputs_are_numbered_in_input_order(servers: Servers, root: Path) -> None:
    routes = ["/img/png", "/img/jpeg", "/img/webp-octet", "/video", "/audio"]
    saved = save([servers.a + r for r in routes], root, stem="产品图_01")
    assert [s.relative for s in saved] == [
        "req_abc/产品图_01_1.png",
        "req_abc/产品图_01_2.jpg",
        "req_abc/产品图_01_3.webp",  # served as application/octet-stream
        "req_abc/产品图_01_4.mp4",
        "req_abc/产品图_01_5.wav",
    ]
    assert [s.path.read_bytes() for s in saved] == [PNG, JPEG, WEBP, MP4, WAV]
    assert [s.content_type for s in saved] == [
        "image/png", "image/jpeg", "image/webp", "video/mp4", "audio/wav",
    ]  # fmt: skip


def test_content_wins_over_content_type_and_url(servers: Servers, root: Path) -> None:
    [saved] = save([f"{servers.a}/misnamed.jpg"], root)
    assert saved.path.name == "car.png"


def test_headers_url_then_fallback_decide_when_content_is_opaque(
    servers: Servers, root: Path
) -> None:
    text, by_url, fallback, unknown = (
        save([f"{servers.a}/text"], root, stem="t")[0],
        save([f"{servers.a}/opaque.mp3"], root, stem="u")[0],
        save([f"{servers.a}/opaque"], root, stem="f", fallback_ext="webp")[0],
        save([f"{servers.a}/opaque"], root, stem="x")[0],
    )
    assert [p.path.name for p in (text, by_url, fallback, unknown)] == [
        "t.txt", "u.mp3", "f.webp", "x.bin",
    ]  # fmt: skip


def test_chunked_and_gzip_bodies_are_decoded(servers: Servers, root: Path) -> None:
    saved = save([f"{servers.a}/chunked", f"{servers.a}/gzip"], root)
    assert [s.path.read_bytes() for s in saved] == [JPEG, WEBP]
    assert [s.path.name for s in saved] == ["car_1.jpg", "car_2.webp"]


def test_existing_file_is_replaced(servers: Servers, root: Path) -> None:
    (root / "req_abc").mkdir(parents=True)
    (root / "req_abc" / "car.png").write_bytes(b"old")
    [saved] = save([f"{servers.a}/img/png"], root)
    assert saved.path.read_bytes() == PNG


def test_no_sources_writes_nothing(root: Path) -> None:
    assert save([], root) == []


# --------------------------------------------------------------------------- failures


def test_failure_leaves_no_temp_file(servers: Servers, root: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        save([f"{servers.a}/missing"], root)
    assert listing(root / "req_abc") == []


def test_partial_failure_keeps_and_reports_saved_files(servers: Servers, root: Path) -> None:
    sources = [f"{servers.a}/img/png", f"{servers.a}/missing", f"{servers.a}/audio"]
    with pytest.raises(DownloadError, match="output 2") as info:
        save(sources, root)
    assert [s.relative for s in info.value.saved] == [
        "req_abc/car_1.png",
        "req_abc/car_3.wav",
    ]
    assert listing(root / "req_abc") == ["car_1.png", "car_3.wav"]


def test_empty_output_is_an_error(servers: Servers, root: Path) -> None:
    with pytest.raises(DownloadError, match="output 1 was empty"):
        save([f"{servers.a}/empty"], root)
    assert listing(root / "req_abc") == []


@pytest.mark.parametrize("route", ["/big", "/big-chunked"])
def test_max_bytes_is_enforced(servers: Servers, root: Path, route: str) -> None:
    with pytest.raises(DownloadError, match="1000-byte limit"):
        save([servers.a + route], root, max_bytes=1000)
    assert listing(root / "req_abc") == []


@pytest.mark.parametrize(
    "source",
    ["file:///etc/passwd", "/etc/passwd", "ftp://127.0.0.1/x", "", "javascript:1"],
)
def test_only_http_and_data_urls_are_followed(root: Path, source: str) -> None:
    with pytest.raises(DownloadError, match="not an http"):
        save([source], root)
    assert listing(root / "req_abc") == []


def test_unsupported_source_type_is_an_error(root: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported type: int"):
        save([42], root)


def test_error_messages_hide_tokens_and_signed_query(servers: Servers, root: Path) -> None:
    url = f"{servers.a}/missing/x.png?X-Amz-Signature=supersecret&token=abc#frag"
    with pytest.raises(DownloadError) as info:
        save([url], root, auth_token=TOKEN, auth_origin=servers.a)
    message = str(info.value)
    assert f"{servers.a}/missing/x.png" in message
    for secret in ("supersecret", "token=abc", "frag", TOKEN):
        assert secret not in message


# --------------------------------------------------------------------------- retries


def test_5xx_is_retried_until_success(servers: Servers, root: Path) -> None:
    url, path = servers.key("/flaky")
    [saved] = save([url], root)
    assert saved.path.read_bytes() == PNG
    assert servers.app.hits[path] == 3


def test_429_is_retried(servers: Servers, root: Path) -> None:
    url, path = servers.key("/throttled")
    [saved] = save([url], root)
    assert saved.path.name == "car.png"
    assert servers.app.hits[path] == 2


def test_gives_up_after_attempts(servers: Servers, root: Path) -> None:
    url, path = servers.key("/always500")
    with pytest.raises(DownloadError, match=r"after 3 attempt\(s\): HTTP 500"):
        save([url], root)
    assert servers.app.hits[path] == 3
    assert listing(root / "req_abc") == []


def test_4xx_is_not_retried(servers: Servers, root: Path) -> None:
    url, path = servers.key("/missing")
    with pytest.raises(DownloadError, match="HTTP 404"):
        save([url], root)
    assert servers.app.hits[path] == 1


def test_connection_errors_are_retried_then_reported(root: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"after 2 attempt\(s\): connection failed"):
        save([f"http://127.0.0.1:{port}/x"], root, attempts=2)
    assert time.monotonic() - started >= 0.2  # one backoff


# --------------------------------------------------------------------------- deadline


def test_deadline_bounds_a_server_that_never_answers(servers: Servers, root: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        save([f"{servers.a}/slow"], root, deadline=time.time() + 0.4)
    assert time.monotonic() - started < 1.5
    assert listing(root / "req_abc") == []


def test_deadline_bounds_a_server_that_trickles(servers: Servers, root: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError, match="did not finish before the deadline"):
        save([f"{servers.a}/trickle"], root, deadline=time.time() + 0.4)
    assert time.monotonic() - started < 1.5
    assert listing(root / "req_abc") == []


def test_no_request_once_the_deadline_has_passed(servers: Servers, root: Path) -> None:
    url, path = servers.key("/auth")
    with pytest.raises(DownloadError, match="deadline passed"):
        save([url], root, deadline=100.0, clock=lambda: 200.0)
    assert servers.app.hits[path] == 0


def test_retry_is_skipped_when_backoff_would_pass_the_deadline(
    servers: Servers, root: Path
) -> None:
    url, path = servers.key("/always500")
    with pytest.raises(DownloadError, match=r"after 1 attempt\(s\)"):
        save([url], root, deadline=time.time() + 0.1)
    assert servers.app.hits[path] == 1


# --------------------------------------------------------------------------- auth


def test_token_goes_only_to_the_auth_origin(servers: Servers, root: Path) -> None:
    own_url, own = servers.key("/auth")
    other_url, other = servers.key("/auth", servers.b)
    hop_url, hop = servers.key("/auth", servers.b)
    redirect = f"{servers.a}/redirect?to={hop_url}"
    save(
        [own_url, other_url, redirect],
        root,
        auth_token=TOKEN,
        auth_origin=servers.a + "/",
    )
    assert servers.app.auth[own] == f"Bearer {TOKEN}"
    assert servers.app.auth[other] is None  # same host, other port: other origin
    assert servers.app.hits[hop] == 1
    assert servers.app.auth[hop] is None  # redirect off the origin drops it


def test_no_token_without_an_auth_origin(servers: Servers, root: Path) -> None:
    url, path = servers.key("/auth")
    save([url], root, auth_token=TOKEN)
    assert servers.app.hits[path] == 1
    assert servers.app.auth[path] is None


# --------------------------------------------------------------------------- sources


def test_data_uris(root: Path) -> None:
    octet = "data:application/octet-stream;base64," + base64.b64encode(PNG).decode()
    unpadded = "data:;base64," + base64.b64encode(WAV).decode().rstrip("=")
    text = "data:text/plain,hello%20world"
    saved = save([octet, unpadded, text], root)
    assert [s.path.name for s in saved] == ["car_1.png", "car_2.wav", "car_3.txt"]
    assert [s.path.read_bytes() for s in saved] == [PNG, WAV, b"hello world"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64,@@not base64@@", "invalid base64"),
        ("data:image/png;base64", "malformed"),
        ("data:image/png;base64,", "was empty"),
    ],
)
def test_bad_data_uris(root: Path, uri: str, message: str) -> None:
    with pytest.raises(DownloadError, match=message):
        save([uri], root)
    assert listing(root / "req_abc") == []


class FakeFileOutput:
    """Like replicate.helpers.FileOutput; read() would leak the token, so must not run."""

    def __init__(self, url: str) -> None:
        self.url = url

    def read(self) -> bytes:
        raise AssertionError("read() must not be used when .url exists")


class Reader:
    def __init__(self, data: object) -> None:
        self.data = data

    def read(self) -> object:
        if isinstance(self.data, Exception):
            raise self.data
        return self.data


def test_file_output_objects_and_readers(servers: Servers, root: Path) -> None:
    sources: list[object] = [FakeFileOutput(f"{servers.a}/video"), Reader(JPEG)]
    saved = save(sources, root)
    assert [s.path.name for s in saved] == ["car_1.mp4", "car_2.jpg"]


@pytest.mark.parametrize(
    ("reader", "message"),
    [(Reader(RuntimeError("boom")), "could not be read"), (Reader("text"), "not bytes")],
)
def test_bad_readers(root: Path, reader: Reader, message: str) -> None:
    with pytest.raises(DownloadError, match=message):
        save([reader], root)


def test_output_sources_normalises_every_shape() -> None:
    file_output = FakeFileOutput("https://x/a.png")
    reader = Reader(b"x")
    assert output_sources(None) == []
    assert output_sources([]) == []
    assert output_sources("https://x/v.mp4") == ["https://x/v.mp4"]
    assert output_sources(file_output) == ["https://x/a.png"]
    assert output_sources(("a", ["b", None, file_output])) == ["a", "b", "https://x/a.png"]
    assert output_sources({"audio": "u1", "extra": ["u2"]}) == ["u1", "u2"]
    assert output_sources([reader]) == [reader]


@pytest.mark.parametrize("bad", [42, b"\x89PNG", {1, 2}, object()])
def test_output_sources_rejects_other_types(bad: object) -> None:
    with pytest.raises(DownloadError, match="unsupported output"):
        output_sources(bad)


# --------------------------------------------------------------------------- confinement


def test_dest_dir_outside_root_is_refused(tmp_path: Path, root: Path) -> None:
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for dest in (outside, root / ".." / "escape", root / "link" / "req", Path("/tmp")):
        with pytest.raises(DownloadError, match="outside the output root"):
            save_outputs(["data:,x"], dest, "car", root=root, deadline=time.time() + 5)
    assert listing(outside) == []
    assert not (tmp_path / "escape").exists()


def test_dest_dir_is_created(root: Path) -> None:
    dest = root / "a" / "b"
    save_outputs(["data:,x"], dest, "car", root=root, deadline=time.time() + 5)
    assert listing(dest) == ["car.bin"]  # no MIME and no magic: nothing to go on


@pytest.mark.parametrize("stem", ["", "../x", "a/b", ".hidden"])
def test_a_bad_stem_is_a_programming_error(root: Path, stem: str) -> None:
    with pytest.raises(ValueError, match="stem"):
        save(["data:,x"], root, stem=stem)


def test_threads_share_nothing_but_the_server(servers: Servers, root: Path) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            save([f"{servers.a}/img/png", f"{servers.a}/audio"], root, stem=f"t{i}")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert len(listing(root / "req_abc")) == 12


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("car_image_001", "car_image_001"),
        ("产品图_01", "产品图_01"),
        ("a.b-c", "a.b-c"),
        ("car.PNG", "car"),
        ("clip.mp4", "clip"),
        ("my car.jpeg", "my car"),
        ("notes.txt", "notes.txt"),  # not a media extension: kept
    ],
)
def test_safe_filename_accepts(name: str, stem: str) -> None:
    assert safe_filename(name, "custom_filename") == stem


@pytest.mark.parametrize(
    "name",
    [
        "../x", "/etc/passwd", "a/b", "a\\b", "..", ".", ".hidden", "x\x00y", "x\ny",
        "", "a" * 500, "C:evil", " lead", "trail ", "a..b", "x\u202egnp.exe",
        "x\u200by", ".png", "abc.", "名" * 100, 7,
    ],
)  # fmt: skip
def test_safe_filename_rejects(name: Any) -> None:
    with pytest.raises(InvalidName) as info:
        safe_filename(name, "custom_filenames[2]")
    assert info.value.field == "custom_filenames[2]"
    assert str(info.value).startswith("custom_filenames[2] must be a plain file name: ")


def test_default_stem() -> None:
    assert default_stem("flux-dev", None) == "flux_dev"
    assert default_stem("flux-dev", 0) == "flux_dev_001"
    assert default_stem("black-forest-labs/flux-dev", 2) == "flux_dev_003"
    assert default_stem("qwen-image", 1233) == "qwen_image_1234"
    with pytest.raises(ValueError, match="index"):
        default_stem("flux-dev", -1)


# --------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("head", "ext"),
    [
        (PNG, ".png"), (JPEG, ".jpg"), (WEBP, ".webp"), (GIF, ".gif"), (MP4, ".mp4"),
        (MOV, ".mov"), (M4A, ".m4a"), (WEBM, ".webm"), (MKV, ".mkv"), (WAV, ".wav"),
        (MP3_ID3, ".mp3"), (MP3_SYNC, ".mp3"), (AAC, ".aac"), (FLAC, ".flac"),
        (OGG, ".ogg"),
    ],
)  # fmt: skip
def test_sniff_magic_bytes_beat_every_hint(head: bytes, ext: str) -> None:
    assert sniff_extension(head, "image/jpeg", "https://x/y.gif", "png") == ext


@pytest.mark.parametrize(
    ("content_type", "url", "fallback", "ext"),
    [
        ("image/jpeg", None, None, ".jpg"),
        ("Image/WEBP; charset=binary", "https://x/a.png", None, ".webp"),
        ("application/octet-stream", "https://x/a.JPEG?sig=1", None, ".jpg"),
        ("binary/octet-stream", "https://x/a", "webp", ".webp"),
        (None, "https://x/a.exe", ".jpeg", ".jpg"),
        (None, None, None, ".bin"),
    ],
)
def test_sniff_falls_back_in_order(
    content_type: str | None, url: str | None, fallback: str | None, ext: str
) -> None:
    assert sniff_extension(OPAQUE, content_type, url, fallback) == ext


def test_sniff_rejects_a_malformed_fallback() -> None:
    with pytest.raises(ValueError, match="fallback"):
        sniff_extension(OPAQUE, fallback="../png")
