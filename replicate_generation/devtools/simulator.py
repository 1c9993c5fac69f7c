"""A local, threaded simulator of Replicate's HTTP API.

It follows /work/shared/reference/replicate-api.md section 4: the same endpoints, bodies,
error payloads, 429 shape, prediction lifecycle, files and output URLs as the real API, so the
real ``replicate`` client (and the service built on it) runs against it unchanged.

Three uses:

* tests: ``sim = Simulator(SimConfig(...), clock=fake); sim.start()`` and then introspect it
  directly (``sim.stats(token)``, ``sim.max_creates_in_window(...)``, ``sim.inject(...)``);
* benchmarks and other processes: the same introspection over HTTP under ``/_sim/``;
* a demo: ``replicate-generation simulator --port 5055`` and point
  ``REPLICATE_BASE_URL`` at it (any non-empty token is accepted).

The lifecycle is computed lazily from the clock (no background thread), so an injected fake
clock makes timing tests deterministic. All state sits behind one lock, and nothing sleeps while
holding it. Raw tokens are never logged or reported: accounts are keyed by ``token_hash``.

Prompt markers (fault injection per prediction): ``#fail``, ``#nsfw``, ``#oom`` (failed with the
real error strings), ``#empty`` (succeeded with ``[]``), ``#hang`` (never terminal until
canceled), ``#slow=<seconds>`` (that processing time). Any of them written ``#fail@flux-dev``
applies only to that model, so one model of a fallback chain can fail while the next succeeds.
Without ``#slow``, the run time is ``run_seconds + run_seconds_spread * u`` with u in [0, 1) a
hash of the prompt and the ``seed`` input (``run_seconds_for``), so a benchmark can compute the
ideal makespan from its prompts alone.

Ambiguous creates (issue #9): ``inject_create_fault(kind, count, token=...)`` makes the next
accepted creates exist (counted, listed, readable) and then lose their answer: ``"drop"`` closes
the connection without a response, ``"502"`` answers a Cloudflare HTML 502, ``"garbage"`` answers
201 with a body that is not a prediction, ``"hold"`` sits on the answer past the client's read
timeout. ``creates_by_prompt(token)`` then tells whether each item was created exactly once.

``GET /v1/predictions`` filters on ``created_after`` (inclusive) and ``created_before``
(exclusive), ISO 8601 with ``Z``, offsets or fractional seconds, newest first, 100 a page, with
absolute ``next``/``previous`` URLs that carry an opaque keyset cursor and the same filters. Its
results are prediction objects without ``logs`` (the shape of the API reference's example). API
inputs are dropped from that listing ``input_retention_seconds`` (default 3600) after the
prediction was created: the entry stays, with ``input: {}`` (the key is required by the OpenAPI
schema, and ``{}`` is what a data-removed prediction shows), so a client can no longer match it by
input. ``GET /v1/predictions/{id}`` keeps following ``output_ttl_seconds`` only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import math
import re
import secrets
import socket
import struct
import threading
import time
import wave
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from replicate_generation.devtools import pictures, schema_models, video

__all__ = [
    "CREATE_FAULT_KINDS",
    "MODELS",
    "ModelSpec",
    "SimConfig",
    "Simulator",
    "main",
    "output_bytes",
    "parse_iso8601",
    "parse_prefer_wait",
    "run_seconds_for",
    "token_hash",
]

# --------------------------------------------------------------------------------------------
# Exact real bodies (replicate-api.md §4.7, §4.8)

UNAUTHENTICATED: dict[str, Any] = {
    "title": "Unauthenticated",
    "detail": "You did not pass a valid authentication token",
    "status": 401,
}
INSUFFICIENT_CREDIT: dict[str, Any] = {
    "title": "Insufficient credit",
    "detail": (
        "You have insufficient credit to run this model. Go to "
        "https://replicate.com/account/billing#billing to purchase credit. Once you purchase "
        "credit, please wait a few minutes before trying again."
    ),
    "status": 402,
}
NOT_FOUND: dict[str, Any] = {"detail": "The requested resource could not be found.", "status": 404}
INVALID_VERSION: dict[str, Any] = {
    "title": "Invalid version or not permitted",
    "detail": (
        "The specified version does not exist (or perhaps you don't have permission to use it?)"
    ),
    "status": 422,
}
FILE_NOT_FOUND: dict[str, Any] = {"detail": "File not found"}
FILE_TOO_BIG: dict[str, Any] = {"detail": "Files must be less than 100MB in size"}
INTERNAL_ERROR: dict[str, Any] = {"detail": "Internal server error"}

ERROR_TRANSIENT = "Director: unexpected error handling prediction (E6716)"
ERROR_SENSITIVE = "The input or output was flagged as sensitive. (E005)"
ERROR_OOM = (
    "CUDA out of memory. Tried to allocate 5.92 GiB (GPU 0; 23.69 GiB total capacity; "
    "17.28 GiB already allocated; 4.94 GiB free; 17.42 GiB reserved in total by PyTorch)"
)

# What Cloudflare answers when the origin behind it fails (replicate-api.md §4.7, "gateway").
CLOUDFLARE_502_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Faults that hit a create after the prediction exists (see Simulator.inject_create_fault).
CREATE_FAULT_KINDS = ("drop", "502", "garbage", "hold")

_MAX_FILE_BYTES = 100 * 1024 * 1024
_PAGE_SIZE = 100
_LOG_LIMIT = 200_000
# Answer a Prefer-wait create this long before the window ends: the client's read timeout is
# only window + 0.5 s, and a late answer becomes a ReadTimeout on a prediction that exists.
_WAIT_MARGIN_S = 0.2
_WAIT_POLL_S = 0.02  # how often a held create re-reads a clock that does not run in real time
_WAKE_SLACK_S = 0.001  # sleep this past a known finish time, so the clock has surely reached it
# Longer than any read timeout the client sets (wait + 0.5 s, at most 60.5 s).
_DEFAULT_HOLD_S = 65.0
_REAL_CLOCKS: tuple[Callable[[], float], ...] = (time.monotonic, time.perf_counter, time.time)
_DROPPED_STATUS = 444  # logged for a dropped create (nginx's "no response"); never sent
_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"replicate-simulator-secret!").decode()

_CREATE_PATH = re.compile(r"^/v1/(?:(?:models|deployments)/[^/]+/[^/]+/)?predictions/?$")
_PREFER_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$")
_LIST_FILTERS = ("created_after", "created_before", "source")
# An unescaped "+" of a UTC offset arrives as a space in a query string.
_SPACED_OFFSET = re.compile(r"T.* (\d{2}(?::?\d{2})?)$")
_SLOW_MARKER = re.compile(r"#slow=(\d+(?:\.\d+)?)")
_SCOPED_MARKER = re.compile(r"(#(?:fail|nsfw|oom|empty|hang))@([\w.\-/]+)")
_FAIL_MARKERS = (("#fail", ERROR_TRANSIENT), ("#nsfw", ERROR_SENSITIVE), ("#oom", ERROR_OOM))
_MODEL_BODY_KEYS = frozenset(
    {"input", "webhook", "webhook_completed", "webhook_events_filter", "stream"}
)
_VERSION_BODY_KEYS = _MODEL_BODY_KEYS | {"version"}


def token_hash(token: str) -> str:
    """Return the account key for a token; the raw token is never stored or reported."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Model registry (upstream-defects.md §4)


@dataclass(frozen=True)
class ModelSpec:
    """An official model the simulator knows: its output kind and formats."""

    ref: str
    kind: str  # "image" (list of files), "video" or "audio" (one file)
    default_format: str
    formats: tuple[str, ...] = ()  # allowed input.output_format values; () = no such input

    @property
    def version_id(self) -> str:
        """Return a stable 64-hex version id, so version-based calls can be tested."""
        return hashlib.sha256(self.ref.encode()).hexdigest()

    @property
    def owner(self) -> str:
        return self.ref.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.ref.split("/", 1)[1]


MODELS: dict[str, ModelSpec] = {
    spec.ref: spec
    for spec in (
        ModelSpec("black-forest-labs/flux-dev", "image", "webp", ("webp", "jpg", "png")),
        ModelSpec("black-forest-labs/flux-kontext-max", "image", "png", ("jpg", "png")),
        ModelSpec("qwen/qwen-image", "image", "webp", ("webp", "jpg", "png")),
        ModelSpec("google/imagen-4-ultra", "image", "jpg", ("jpg", "png")),
        ModelSpec("google/nano-banana", "image", "jpg", ("jpg", "png")),
        ModelSpec("black-forest-labs/flux-1.1-pro-ultra", "image", "jpg", ("jpg", "png")),
        ModelSpec("google/veo-3-fast", "video", "mp4"),
        ModelSpec("kwaivgi/kling-v2.1-master", "video", "mp4"),
        ModelSpec("resemble-ai/chatterbox", "audio", "wav"),
    )
}

# Non-curated models with cog-shaped schemas (served beside MODELS, not listed with them).
SCHEMA_MODELS: dict[str, ModelSpec] = {
    ref: ModelSpec(ref, kind, fmt, schema_models.FORMATS.get(ref, ()))
    for ref, (kind, fmt) in schema_models.KINDS.items()
}


def _lookup(ref: str) -> ModelSpec | None:
    return MODELS.get(ref) or SCHEMA_MODELS.get(ref)

# --------------------------------------------------------------------------------------------
# Output files: real, tiny, valid, and distinct per (prediction, index) so that a test can tell
# which output landed in which file.

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
    "wav": "audio/wav",
}


def _colour(tag: bytes) -> tuple[int, int, int]:
    digest = hashlib.sha256(tag).digest()
    return digest[0], digest[1], digest[2]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(tag: bytes) -> bytes:
    """Build a 1x1 truecolour PNG whose colour and tEXt comment come from the tag."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    scanline = b"\x00" + bytes(_colour(tag))  # filter type 0, then one RGB pixel
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", b"Comment\x00" + tag),
            _png_chunk(b"IDAT", zlib.compress(scanline)),
            _png_chunk(b"IEND", b""),
        )
    )


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _jpeg(tag: bytes) -> bytes:
    """Build a baseline 1x1 grey JPEG (one DC-only block) with the tag as a COM segment."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table with one 1-bit code: symbol 0
    return b"".join(
        (
            b"\xff\xd8",
            _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _jpeg_segment(0xFE, tag),
            _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
            _jpeg_segment(0xC0, b"\x08\x00\x01\x00\x01\x01\x01\x11\x00"),
            _jpeg_segment(0xC4, b"\x00" + one_code),  # DC table 0
            _jpeg_segment(0xC4, b"\x10" + one_code),  # AC table 0 (symbol 0 = EOB)
            _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            b"\x3f",  # DC difference 0 ("0"), EOB ("0"), padded with 1 bits
            b"\xff\xd9",
        )
    )


def _webp(tag: bytes) -> bytes:
    """Build a lossless (VP8L) 1x1 WebP whose pixel colour comes from the tag."""
    red, green, blue = _colour(tag)
    acc, nbits = 0, 0
    # VP8L bits are LSB-first: no transform, no colour cache, no meta prefix codes, then five
    # one-symbol "simple" prefix codes (green, red, blue, alpha with 8-bit symbols; distance).
    fields_ = [(0, 1), (0, 1), (0, 1)]
    for value in (green, red, blue, 255):
        fields_ += [(1, 1), (0, 1), (1, 1), (value, 8)]
    fields_ += [(1, 1), (0, 1), (0, 1), (0, 1)]
    for value, width in fields_:
        acc |= value << nbits
        nbits += width
    # Signature 0x2f, then 14-bit width-1, 14-bit height-1, alpha hint, 3-bit version: all 0.
    payload = b"\x2f" + b"\x00" * 4 + acc.to_bytes((nbits + 7) // 8, "little")
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _mp4_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _mp4(tag: bytes) -> bytes:
    """Build a minimal ISO-BMFF file: ftyp, a free box carrying the tag, an empty mdat."""
    ftyp = b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41"
    return _mp4_box(b"ftyp", ftyp) + _mp4_box(b"free", tag) + _mp4_box(b"mdat", b"")


def _wav(tag: bytes) -> bytes:
    """Build a 0.1 s mono 16-bit WAV tone whose pitch comes from the tag."""
    rate, frames = 8000, 800
    pitch = 200 + _colour(tag)[0] * 2
    samples = [int(3000 * math.sin(2 * math.pi * pitch * i / rate)) for i in range(frames)]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{frames}h", *samples))
    return buffer.getvalue()


_BUILDERS: dict[str, Callable[[bytes], bytes]] = {
    "png": _png,
    "jpg": _jpeg,
    "webp": _webp,
    "mp4": _mp4,
    "wav": _wav,
}


def _pad_png(data: bytes, extra: int) -> bytes:
    """Add a private, safe-to-copy ancillary chunk (``paDd``) before IEND; decoders skip it."""
    iend = len(data) - 12
    return data[:iend] + _png_chunk(b"paDd", bytes(max(0, extra - 12))) + data[iend:]


def _pad_jpeg(data: bytes, extra: int) -> bytes:
    """Add COM segments (at most 64 KiB each) after the JFIF header; decoders skip comments."""
    head = 20  # SOI (2) + APP0 marker, length and 14-byte JFIF payload (18)
    segments = []
    while extra > 4:
        payload = min(0xFFFF - 2, extra - 4)
        segments.append(_jpeg_segment(0xFE, bytes(payload)))
        extra -= payload + 4
    return data[:head] + b"".join(segments) + data[head:]


def _pad_webp(data: bytes, extra: int) -> bytes:
    """Switch to the extended layout (VP8X, the image's canvas), where unknown chunks are
    skipped."""
    header = int.from_bytes(data[21:25], "little")  # after the 0x2f signature: 14+14 bits
    width, height = (header & 0x3FFF) + 1, (header >> 14 & 0x3FFF) + 1
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas  # no feature flags
    size = max(0, extra - 18 - 8) & ~1  # chunk payloads have even sizes
    body = b"WEBP" + vp8x + data[12:] + b"PADD" + struct.pack("<I", size) + bytes(size)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pad_mp4(data: bytes, extra: int) -> bytes:
    """Append a ``free`` box, which players skip."""
    return data + _mp4_box(b"free", bytes(max(0, extra - 8)))


def _pad_wav(data: bytes, extra: int) -> bytes:
    """Append a RIFF ``JUNK`` chunk after the samples and fix the RIFF size."""
    size = max(0, extra - 8) & ~1
    padded = data + b"JUNK" + struct.pack("<I", size) + bytes(size)
    return padded[:4] + struct.pack("<I", len(padded) - 8) + padded[8:]


_PADDERS: dict[str, Callable[[bytes, int], bytes]] = {
    "png": _pad_png,
    "jpg": _pad_jpeg,
    "webp": _pad_webp,
    "mp4": _pad_mp4,
    "wav": _pad_wav,
}


def _picture_of(pred: _Prediction) -> dict[str, Any]:
    """What a demo picture of this prediction shows: its prompt, in its aspect ratio."""
    return {"prompt": str(pred.input.get("prompt") or ""),
            "aspect_ratio": pred.input.get("aspect_ratio")}


def output_bytes(ext: str, tag: str, size: int = 0, *, prompt: str | None = None,
                 aspect_ratio: object = None) -> bytes:
    """Return the file served for one output: format ``ext``, content unique to ``tag``.

    With ``prompt``, an image is a demo picture of the prompt in the requested aspect ratio
    (devtools.pictures) and a video a one-second playable clip (devtools.video). With ``size``,
    the file is padded with a chunk its decoders skip to about that many bytes (never more), so it
    stays valid; 0 (or less than the file) pads nothing.
    """
    drawn = None
    if prompt is not None:
        drawn = video.mp4(prompt, aspect_ratio) if ext == "mp4" else \
            pictures.picture(ext, prompt, aspect_ratio)
    data = drawn if drawn is not None else _BUILDERS[ext](tag.encode())
    extra = size - len(data)
    return _PADDERS[ext](data, extra) if extra > 0 else data


# --------------------------------------------------------------------------------------------
# Small pure helpers


def parse_prefer_wait(header: str | None) -> tuple[int, str] | None:
    """Parse ``Prefer: wait`` / ``wait=N`` into (seconds, Preference-Applied value).

    Bare ``wait`` means 60 s; N is clamped to the documented 1..60.
    """
    for part in (header or "").split(","):
        match = _PREFER_WAIT.match(part)
        if match is None:
            continue
        if match.group(1) is None:
            return 60, "wait"
        seconds = min(max(int(match.group(1)), 1), 60)
        return seconds, f"wait={seconds}"
    return None


def parse_iso8601(text: str) -> datetime:
    """Parse an ISO 8601 date-time: ``Z``, ``+02:00`` and fractional seconds; naive means UTC.

    Raises ValueError. A ``+`` that arrived unescaped in a query string (as a space) is restored.
    """
    text = text.strip()
    spaced = _SPACED_OFFSET.search(text)
    if spaced is not None:
        text = f"{text[: spaced.start(1) - 1]}+{spaced.group(1)}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _encode_cursor(direction: str, seq: int) -> str:
    """Return an opaque cursor: list the predictions ``older`` or ``newer`` than number seq."""
    return base64.urlsafe_b64encode(f"{direction}:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    """Invert _encode_cursor; a cursor we did not make is a 400."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, _, seq = raw.partition(":")
        if direction in ("older", "newer"):
            return direction, int(seq)
    except ValueError:
        pass
    raise _ApiError(400, {"detail": "Invalid cursor", "status": 400})


def _bearer_token(header: str) -> str | None:
    """Extract the token of ``Bearer <t>`` or ``Token <t>`` (both are accepted by the API)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token") or not value.strip():
        return None
    return value.strip()


def _new_id() -> str:
    """Return a 26-character lowercase id shaped like Replicate's."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def _max_in_window(times: list[float], seconds: float) -> int:
    """Return the most events inside any half-open window [t, t + seconds)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def _field_error(kind: str, name: str, description: str) -> dict[str, str]:
    return {"type": kind, "field": name, "description": description}


def _validation_problem(errors: list[dict[str, str]]) -> dict[str, Any]:
    """Build the real 422 "Input validation failed" body from its invalid fields."""
    detail = "".join(f"- {e['field'] or '(root)'}: {e['description']}\n" for e in errors)
    return {
        "detail": detail,
        "status": 422,
        "title": "Input validation failed",
        "invalid_fields": errors,
    }


def _default_problem(status: int) -> dict[str, Any]:
    if status == 500:
        return INTERNAL_ERROR
    return {"detail": HTTP_STATUS_CODES.get(status, "Error"), "status": status}


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _json_response(
    status: int, body: Any, headers: Mapping[str, str] | None = None, *, problem: bool = False
) -> Response:
    mimetype = "application/problem+json" if problem else "application/json"
    response = Response(json.dumps(body, separators=(",", ":")), status, mimetype=mimetype)
    response.headers.update(headers or {})
    return response


def _problem(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    """Return an RFC 7807 error; always an object, because the client calls .get() on it."""
    return _json_response(status, body, headers, problem=True)


def _throttle_response(seconds: int, *, in_header: bool, in_body: bool) -> Response:
    """Return the real 429 body (and Retry-After header), as the knobs ask."""
    body: dict[str, Any] = {
        "detail": f"Request was throttled. Your rate limit resets in ~{seconds}s.",
        "status": 429,
    }
    if in_body:
        body["retry_after"] = seconds
    return _problem(429, body, {"Retry-After": str(seconds)} if in_header else None)


def _is_simulated_path(path: str) -> bool:
    """Tell API and output-file paths (logged, injectable) from the /_sim control surface."""
    return path.startswith("/v1/") or path.startswith("/_sim/outputs/")


def _shut_client_socket() -> None:
    """Shut the client's socket so it gets no answer (httpx: RemoteProtocolError).

    Werkzeug then fails to write the response and treats that as a dropped connection,
    quietly. Under a WSGI transport there is no socket: the 444 response is sent instead.
    """
    conn = request.environ.get("werkzeug.socket")
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


def _request_token() -> str | None:
    return _bearer_token(request.headers.get("Authorization", ""))


def _base_url() -> str:
    """Return the origin the caller used, so URLs we hand out work from its side."""
    return request.host_url.rstrip("/")


# --------------------------------------------------------------------------------------------
# Configuration and internal records


@dataclass
class SimConfig:
    """Knobs; tests change them between steps (``Simulator.configure`` takes the lock)."""

    run_seconds: float = 0.5  # time in "processing"
    queue_seconds: float = 0.05  # time in "starting"
    create_rate_per_minute: float = 600.0  # token bucket per token for creates
    create_burst: int = 600
    other_rate_per_minute: float = 3000.0  # bucket per token for every other API call
    other_burst: int = 3000
    retry_after_header: bool = True  # send Retry-After header on 429
    retry_after_body: bool = True  # include "retry_after": N in 429 body
    invalid_tokens: set[str] = field(default_factory=set)  # 401
    no_credit_tokens: set[str] = field(default_factory=set)  # 402 on create
    prefer_wait_timeout_status: str = "starting"  # or "current" (reproduces issue #385)
    output_ttl_seconds: float = 3600.0
    require_auth_for_files: bool = False
    download_delay_seconds: float = 0.0
    download_failures: int = 0  # the next N output downloads answer 500
    output_as_data_uri: bool = False  # outputs as data: URIs instead of URLs
    input_retention_seconds: float = 3600.0  # then GET /v1/predictions lists input as {}
    run_seconds_spread: float = 0.0  # run time = run_seconds + spread * u(prompt, seed)
    output_bytes: int = 0  # pad output files to about this many bytes (0: tiny files)


_TOKEN_SET_FIELDS = ("invalid_tokens", "no_credit_tokens")


@dataclass(frozen=True)
class _Behaviour:
    """What the prompt markers ask this prediction to do."""

    error: str | None = None  # set: the prediction fails with this error
    run_seconds: float | None = None  # #slow=N
    hang: bool = False
    empty: bool = False


def _behaviour(prompt: str, ref: str = "") -> _Behaviour:
    """Read the markers; ``#fail@<name>`` (any marker) applies only to models whose ref
    (``owner/name``) ends with that name, so a test can fail one model of a fallback chain."""
    name = ref.rsplit("/", 1)[-1]
    applies = {m.group(0) for m in _SCOPED_MARKER.finditer(prompt) if m.group(2) in (name, ref)}
    plain = _SCOPED_MARKER.sub(lambda m: m.group(1) if m.group(0) in applies else "", prompt)
    slow = _SLOW_MARKER.search(plain)
    error = next((text for marker, text in _FAIL_MARKERS if marker in plain), None)
    return _Behaviour(
        error=error,
        run_seconds=float(slow.group(1)) if slow else None,
        hang="#hang" in plain,
        empty="#empty" in plain,
    )


def _spread_fraction(prompt: str, seed: Any) -> float:
    """Return u in [0, 1) from the prompt and the seed input only, the same in every run."""
    key = json.dumps([prompt, seed], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def run_seconds_for(prompt: str, config: SimConfig, *, seed: Any = None, model: str = "") -> float:
    """Return the processing time a prediction of this prompt gets (``math.inf`` for #hang).

    ``#slow=N`` wins; otherwise ``run_seconds + run_seconds_spread * u`` where u in [0, 1)
    hashes the prompt and the ``seed`` input, so a benchmark can compute the ideal makespan
    from its prompts alone (add ``queue_seconds`` for the time to terminal). ``model`` (an
    ``owner/name`` ref) resolves scoped markers such as ``#hang@flux-dev``.
    """
    behaviour = _behaviour(prompt, model)
    if behaviour.hang:
        return math.inf
    if behaviour.run_seconds is not None:
        return behaviour.run_seconds
    if config.run_seconds_spread <= 0:
        return config.run_seconds
    return config.run_seconds + config.run_seconds_spread * _spread_fraction(prompt, seed)


@dataclass
class _Prediction:
    """One prediction; its status is a pure function of the clock (no background thread)."""

    id: str
    spec: ModelSpec
    version: str  # "hidden" for official-model calls, else the 64-hex id
    input: dict[str, Any]
    token_hash: str
    source: str  # which endpoint created it: model, version, deployment
    created: float
    queue_s: float
    run_s: float | None  # None: hangs until canceled
    error: str | None
    empty: bool
    n_outputs: int
    ext: str
    canceled_at: float | None = None
    seq: int = 0  # creation order across all tokens: ties on a fake clock, list cursors

    def start_time(self) -> float | None:
        """Return when it started processing, or None if it was canceled before that."""
        start = self.created + self.queue_s
        if self.canceled_at is not None and self.canceled_at < start:
            return None
        return start

    def terminal_time(self) -> float | None:
        if self.canceled_at is not None:
            return self.canceled_at
        if self.run_s is None:
            return None
        return self.created + self.queue_s + self.run_s

    def status(self, now: float) -> str:
        end = self.terminal_time()
        if end is not None and now >= end:
            if self.canceled_at is not None:
                return "canceled"
            return "failed" if self.error else "succeeded"
        return "starting" if now < self.created + self.queue_s else "processing"

    def in_flight(self, now: float) -> bool:
        end = self.terminal_time()
        return self.created <= now and (end is None or now < end)

    def progress(self, now: float) -> float:
        """Return the fraction of the run done at ``now``, for the tqdm-style logs."""
        start = self.start_time()
        if start is None or now <= start:
            return 0.0
        if self.run_s is None:
            return min(0.75, (now - start) / 10.0)  # a hung run creeps, never finishes
        return 1.0 if self.run_s <= 0 else min(1.0, (now - start) / self.run_s)


@dataclass
class _Bucket:
    """A token bucket whose capacity and rate are read from the config at each call."""

    tokens: float
    updated: float

    def take(self, now: float, per_minute: float, burst: int) -> float:
        """Take one token; return 0.0 on success, else the seconds until one is available."""
        per_second = per_minute / 60.0
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(burst), self.tokens + elapsed * per_second)
        self.updated = now
        if self.tokens >= 1.0 - 1e-9:  # tolerate float drift from many small refills
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return 60.0 if per_second <= 0 else (1.0 - self.tokens) / per_second

    def headers(self, per_minute: float, burst: int) -> tuple[int, int]:
        """Return (ratelimit-remaining, ratelimit-reset seconds until full)."""
        per_second = per_minute / 60.0
        missing = max(0.0, burst - self.tokens)
        reset = 60 if per_second <= 0 else max(1, math.ceil(missing / per_second))
        return int(self.tokens + 1e-9), reset


# Counters kept per account, on top of the derived figures in _STATS_KEYS.
_COUNTERS = (
    "creates_throttled",
    "creates_rejected",
    "gets",
    "cancels",
    "other_calls",
    "other_throttled",
    "injected",
    "downloads",
    "lists",
    "create_faults",
)
# The order of Simulator.stats(): the brief's keys first, then the extra counters.
_STATS_KEYS = (
    "creates_accepted",
    "creates_throttled",
    "creates_rejected",
    "inflight_now",
    "inflight_peak",
    "max_creates_in_60s",
    "gets",
    "cancels",
    "predictions",
    "other_calls",
    "other_throttled",
    "injected",
    "downloads",
    "lists",
    "create_faults",
)


@dataclass
class _Account:
    """Everything counted per token hash."""

    create_bucket: _Bucket
    other_bucket: _Bucket
    create_times: list[float] = field(default_factory=list)
    inflight_at_create: list[tuple[float, int]] = field(default_factory=list)
    active: set[str] = field(default_factory=set)  # ids that may still be in flight
    prediction_ids: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))


@dataclass
class _Fault:
    method: str  # upper case, or "*"
    pattern: re.Pattern[str]
    status: int
    body: dict[str, Any] | str | None
    headers: dict[str, str]
    remaining: int


@dataclass
class _CreateFault:
    """A fault for the next ``remaining`` accepted creates (of one token hash, or of all)."""

    kind: str  # one of CREATE_FAULT_KINDS
    key: str | None
    remaining: int
    body: str | None  # 502 page or garbage body; None: the default for the kind
    hold_seconds: float


@dataclass
class _StoredFile:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict[str, Any]
    created: float
    token_hash: str


def _bucket_for(account: _Account, cfg: SimConfig, create: bool) -> tuple[_Bucket, float, int]:
    """Return the bucket a request draws from, with its current rate and burst."""
    if create:
        return account.create_bucket, cfg.create_rate_per_minute, cfg.create_burst
    return account.other_bucket, cfg.other_rate_per_minute, cfg.other_burst


class _ApiError(Exception):
    """Raised by a view to answer with a problem+json body (and count rejected creates)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


# --------------------------------------------------------------------------------------------
# Server plumbing


class _QuietHandler(WSGIRequestHandler):
    """Drop the per-request access log: benchmarks make tens of thousands of requests."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class _BigBacklogServer(ThreadedWSGIServer):
    """What ``make_server(threaded=True)`` builds, with a listen backlog of 2048.

    The default of 128 drops connects when hundreds of clients arrive at once
    (replicate-api.md §4.1); make_server has no parameter for it.
    """

    request_queue_size = 2048


# --------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """Replicate's HTTP API on 127.0.0.1, with counters and fault injection for tests."""

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self.base_url = ""
        self._clock = clock
        self._lock = threading.RLock()
        # Held creates wait on this; cancel, configure, reset, stop and wake_waiters notify it.
        self._changed = threading.Condition(self._lock)
        self._generation = 0  # bumped by reset and stop: every held create answers at once
        self._real_time_clock = clock in _REAL_CLOCKS
        self._seq = 0
        self._create_faults: list[_CreateFault] = []
        # Map the (possibly fake) clock onto wall time for the ISO timestamps.
        self._wall0 = time.time()
        self._clock0 = clock()
        self._predictions: dict[str, _Prediction] = {}
        self._accounts: dict[str, _Account] = {}
        self._faults: list[_Fault] = []
        self._files: dict[str, _StoredFile] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=_LOG_LIMIT)
        self._server: _BigBacklogServer | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # ---- lifecycle of the server ----

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a daemon thread; return the base URL (without /v1)."""
        if self._server is not None:
            return self.base_url
        server = _BigBacklogServer(host, port, self.app, handler=_QuietHandler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="replicate-simulator",
            daemon=True,
        )
        self._thread.start()
        self.base_url = f"http://{host}:{server.server_port}"
        return self.base_url

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        self._release_holds()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ---- public introspection and control ----

    def now(self) -> float:
        """Return the simulator clock."""
        return self._clock()

    def reset(self) -> None:
        """Forget predictions, counters, faults, buckets, files and the request log.

        The config is kept: it was chosen by whoever built the simulator.
        """
        with self._lock:
            self._predictions.clear()
            self._accounts.clear()
            self._faults.clear()
            self._create_faults.clear()
            self._files.clear()
            self._log.clear()
        schema_models.clear_overrides()
        self._release_holds()

    def wake_waiters(self) -> None:
        """Make held Prefer-wait creates re-read the clock now (call after moving a fake one)."""
        with self._changed:
            self._changed.notify_all()

    def _release_holds(self) -> None:
        """End every held create (Prefer: wait and "hold" faults): they answer at once."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def configure(self, **changes: Any) -> None:
        """Change config knobs atomically; unknown names raise ValueError."""
        known = {f.name for f in fields(SimConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown SimConfig fields: {', '.join(unknown)}")
        with self._changed:
            for name, value in changes.items():
                setattr(self.config, name, set(value) if name in _TOKEN_SET_FIELDS else value)
            self._changed.notify_all()

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` matching requests with this response instead.

        ``method`` may be "*". A 429 without a body looks like a real throttle
        (Retry-After from ``headers`` or 1 s). A str body is sent as text/html (gateway pages).
        """
        fault = _Fault(
            method=method.upper(),
            pattern=re.compile(path_regex),
            status=status,
            body=body,
            headers=dict(headers or {}),
            remaining=count,
        )
        with self._lock:
            self._faults.append(fault)

    def inject_create_fault(
        self,
        kind: str,
        count: int = 1,
        *,
        token: str | None = None,
        body: str | None = None,
        hold_seconds: float = _DEFAULT_HOLD_S,
    ) -> None:
        """Make the next ``count`` accepted creates (of ``token``, or of any) lose their answer.

        The prediction is created first in every case: counted, listed, readable, running.

        * ``"drop"``: the connection is closed without a response (the client raises
          httpx.RemoteProtocolError); needs the real server, not a WSGI transport.
        * ``"502"``: a Cloudflare HTML 502 (``body`` replaces the page).
        * ``"garbage"``: 201 with ``body`` (``"<html>..."``, ``"[1,2]"``...; sent as text/html if
          it starts with ``<``, else as JSON); None sends the real answer cut in half.
        * ``"hold"``: the answer is held ``hold_seconds`` of real time (default 65 s, past any
          read timeout the client sets), then sent; reset() and stop() end the hold early.
        """
        self._add_create_fault(
            kind, count, token_hash(token) if token else None, body, hold_seconds
        )

    def _add_create_fault(
        self, kind: str, count: int, key: str | None, body: str | None, hold_seconds: float
    ) -> None:
        if kind not in CREATE_FAULT_KINDS:
            raise ValueError(f"unknown create fault {kind!r}: use one of {CREATE_FAULT_KINDS}")
        if count < 1:
            raise ValueError("count must be at least 1")
        fault = _CreateFault(kind, key, count, body, float(hold_seconds))
        with self._lock:
            self._create_faults.append(fault)

    def creates_by_prompt(self, token: str) -> dict[str, int]:
        """Return how many accepted creates each input prompt got ("exactly one per item")."""
        inputs = self._inputs_of(token_hash(token))
        return dict(Counter(str(inp.get("prompt")) for inp in inputs))

    def creates_by_input(self, token: str) -> dict[str, int]:
        """Return how many accepted creates each whole input got, keyed by its canonical JSON."""
        inputs = self._inputs_of(token_hash(token))
        return dict(Counter(json.dumps(inp, sort_keys=True, default=str) for inp in inputs))

    def _inputs_of(self, key: str) -> list[dict[str, Any]]:
        with self._lock:
            account = self._accounts.get(key)
            ids = list(account.prediction_ids) if account else []
            return [dict(self._predictions[pid].input) for pid in ids]

    def stats(self, token: str | None = None) -> dict[str, Any]:
        """Return the counters of one token, or of every token keyed by its hash."""
        with self._lock:
            if token is not None:
                return self._stats_locked(token_hash(token))
            return {key: self._stats_locked(key) for key in self._accounts}

    def max_creates_in_window(self, token: str, seconds: float, since: float | None = None) -> int:
        """Return the most accepted creates in any rolling window of ``seconds``."""
        with self._lock:
            times = self._create_times_locked(token_hash(token))
        if since is not None:
            times = [t for t in times if t >= since]
        return _max_in_window(times, seconds)

    def max_inflight_at_create(self, token: str, since: float) -> int:
        """Return the largest in-flight count (the new one included) at a create at >= since."""
        with self._lock:
            account = self._accounts.get(token_hash(token))
            samples = list(account.inflight_at_create) if account else []
        return max((n for t, n in samples if t >= since), default=0)

    def create_times(self, token: str) -> list[float]:
        """Return the clock times of the token's accepted creates."""
        with self._lock:
            return self._create_times_locked(token_hash(token))

    def predictions(self, token: str | None = None) -> list[dict[str, Any]]:
        """Return a summary of every prediction (of one token, if given), oldest first."""
        wanted = token_hash(token) if token is not None else None
        return self._predictions_by_hash(wanted)

    def requests_log(self) -> list[dict[str, Any]]:
        """Return every API/output request seen: method, path, token_hash, json, status..."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    # ---- state helpers (callers hold the lock) ----

    def _account_locked(self, key: str) -> _Account:
        account = self._accounts.get(key)
        if account is None:
            now, cfg = self.now(), self.config
            account = _Account(
                create_bucket=_Bucket(float(cfg.create_burst), now),
                other_bucket=_Bucket(float(cfg.other_burst), now),
            )
            self._accounts[key] = account
        return account

    def _count_locked(self, key: str | None, counter: str) -> None:
        if key is not None:
            self._account_locked(key).counters[counter] += 1

    def _create_times_locked(self, key: str) -> list[float]:
        account = self._accounts.get(key)
        return list(account.create_times) if account else []

    def _inflight_locked(self, account: _Account, now: float) -> int:
        """Count in-flight predictions, dropping the ones that finished from the active set."""
        account.active = {pid for pid in account.active if self._predictions[pid].in_flight(now)}
        return len(account.active)

    def _stats_locked(self, key: str) -> dict[str, Any]:
        account = self._accounts.get(key)
        if account is None:
            return dict.fromkeys(_STATS_KEYS, 0)
        derived = {
            "creates_accepted": len(account.create_times),
            "inflight_now": self._inflight_locked(account, self.now()),
            "inflight_peak": max((n for _, n in account.inflight_at_create), default=0),
            "max_creates_in_60s": _max_in_window(account.create_times, 60.0),
            "predictions": len(account.prediction_ids),
        }
        return {key: derived.get(key, account.counters.get(key, 0)) for key in _STATS_KEYS}

    def _predictions_by_hash(self, key: str | None) -> list[dict[str, Any]]:
        with self._lock:
            now = self.now()
            return [
                self._summary(pred, now)
                for pred in self._predictions.values()
                if key is None or pred.token_hash == key
            ]

    @staticmethod
    def _summary(pred: _Prediction, now: float) -> dict[str, Any]:
        end = pred.terminal_time()
        return {
            "id": pred.id,
            "model": pred.spec.ref,
            "version": pred.version,
            "input": dict(pred.input),
            "status": pred.status(now),
            "token_hash": pred.token_hash,
            "created_at_clock": pred.created,
            "started_at_clock": pred.start_time(),
            "completed_at_clock": end if end is not None and now >= end else None,
            "canceled": pred.canceled_at is not None,
            "error": pred.error,
            "source": pred.source,
            "num_outputs": 0 if pred.empty else pred.n_outputs,
        }

    def _wall(self, moment: float) -> datetime:
        """Map a clock reading onto UTC wall time, to the microsecond (what created_at shows)."""
        return datetime.fromtimestamp(self._wall0 + (moment - self._clock0), tz=UTC)

    def _iso(self, moment: float) -> str:
        return self._wall(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    # ---- rendering predictions ----

    def _render_locked(
        self, pred: _Prediction, base: str, *, as_starting: bool = False
    ) -> dict[str, Any]:
        """Render the prediction JSON of replicate-api.md §4.2 at the current clock."""
        now = self.now()
        status = "starting" if as_starting else pred.status(now)
        end = pred.terminal_time()
        removed = (
            status in TERMINAL_STATUSES
            and end is not None
            and now >= end + self.config.output_ttl_seconds
        )
        body: dict[str, Any] = {
            "id": pred.id,
            "model": pred.spec.ref,
            "version": pred.version,
            "input": {} if removed else dict(pred.input),
            "logs": "" if removed else self._logs(pred, status, now),
            "output": None if removed else self._output_locked(pred, status, base),
            "data_removed": removed,
            "error": pred.error if status == "failed" else None,
            "source": "api",
            "status": status,
            "created_at": self._iso(pred.created),
            "urls": {
                "get": f"{base}/v1/predictions/{pred.id}",
                "cancel": f"{base}/v1/predictions/{pred.id}/cancel",
                "web": f"https://replicate.com/p/{pred.id}",
            },
        }
        if not as_starting:
            body.update(self._timing(pred, status))
        return body

    def _timing(self, pred: _Prediction, status: str) -> dict[str, Any]:
        """Return started_at, and completed_at plus metrics once terminal."""
        timing: dict[str, Any] = {}
        start = pred.start_time()
        if status != "starting" and start is not None:
            timing["started_at"] = self._iso(start)
        end = pred.terminal_time()
        if status in TERMINAL_STATUSES and end is not None:
            timing["completed_at"] = self._iso(end)
            timing["metrics"] = {
                "predict_time": round(end - start, 6) if start is not None else 0.0,
                "total_time": round(end - pred.created, 6),
            }
        return timing

    @staticmethod
    def _logs(pred: _Prediction, status: str, now: float) -> str | None:
        """Return tqdm-style logs that the client's Prediction.progress can parse."""
        if status == "starting":
            return ""
        if pred.start_time() is None:
            return None  # canceled before it started: the real cancel reply has logs null
        end = pred.terminal_time()
        moment = min(now, end) if end is not None else now
        steps = 4
        done = int(pred.progress(moment) * steps + 1e-9)
        seed = int(pred.id.encode().hex()[:6], 16)
        lines = [f"Using seed: {seed}"]
        for step in range(done + 1):
            bar = ("\u2588" * (step * 10 // steps)).ljust(10)
            lines.append(
                f"{step * 100 // steps:3d}%|{bar}| {step}/{steps} [00:0{step}<00:00,  7.80it/s]"
            )
        if status == "failed" and pred.error:
            lines.append(pred.error)
        return "\n".join(lines) + "\n"

    def _output_locked(self, pred: _Prediction, status: str, base: str) -> Any:
        """Return the output: a list for image models, one string for video/audio."""
        if status == "processing" and pred.spec.kind == "image":
            return []  # list outputs fill in while processing (what issue #385 trips over)
        if status != "succeeded":
            return None
        if pred.empty:
            return []
        if pred.spec.kind == "text":
            return schema_models.output("text", [])
        refs = [self._output_ref(pred, index, base) for index in range(pred.n_outputs)]
        if pred.spec.kind == "dict":
            return schema_models.output("dict", refs)
        return refs if pred.spec.kind == "image" else refs[0]

    def _output_ref(self, pred: _Prediction, index: int, base: str) -> str:
        if self.config.output_as_data_uri:
            raw = output_bytes(pred.ext, f"{pred.id}/{index}", self.config.output_bytes,
                               **_picture_of(pred))
            data = base64.b64encode(raw).decode()
            return f"data:{CONTENT_TYPES[pred.ext]};base64,{data}"
        return f"{base}/_sim/outputs/{pred.id}/{index}.{pred.ext}"

    # ---- the Flask app ----

    def _build_app(self) -> Flask:
        app = Flask("replicate_simulator")
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(_ApiError, self._on_api_error)
        app.register_error_handler(HTTPException, self._on_http_error)
        self._add_prediction_routes(app)
        self._add_catalogue_routes(app)
        self._add_file_routes(app)
        self._add_control_routes(app)
        return app

    def _add_prediction_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route(
            "/v1/models/<owner>/<name>/predictions",
            view_func=self._create_for_model,
            methods=["POST"],
        )
        route(
            "/v1/deployments/<owner>/<name>/predictions",
            view_func=self._create_for_deployment,
            methods=["POST"],
        )
        route("/v1/predictions", view_func=self._create_for_version, methods=["POST"])
        route("/v1/predictions", view_func=self._list_predictions, methods=["GET"])
        route("/v1/predictions/<pid>", view_func=self._get_prediction, methods=["GET"])
        route("/v1/predictions/<pid>/cancel", view_func=self._cancel_prediction, methods=["POST"])
        route("/_sim/outputs/<pid>/<filename>", view_func=self._serve_output, methods=["GET"])

    def _add_catalogue_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/v1/models/<owner>/<name>", view_func=self._get_model, methods=["GET"])
        route("/v1/models/<owner>/<name>/versions", view_func=self._list_versions, methods=["GET"])
        route(
            "/v1/models/<owner>/<name>/versions/<vid>", view_func=self._get_version, methods=["GET"]
        )
        route("/v1/deployments/<owner>/<name>", view_func=self._get_deployment, methods=["GET"])
        route("/v1/account", view_func=self._get_account, methods=["GET"])
        route("/v1/webhooks/default/secret", view_func=self._get_webhook_secret, methods=["GET"])

    def _add_file_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/v1/files", view_func=self._upload_file, methods=["POST"])
        route("/v1/files", view_func=self._list_files, methods=["GET"])
        route("/v1/files/<fid>", view_func=self._get_file, methods=["GET"])
        route("/v1/files/<fid>", view_func=self._delete_file, methods=["DELETE"])
        route("/v1/files/<fid>/download", view_func=self._download_file, methods=["GET"])

    def _add_control_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/", view_func=self._ctl_index, methods=["GET"])
        route("/_sim/stats", view_func=self._ctl_stats, methods=["GET"])
        route("/_sim/creates", view_func=self._ctl_creates, methods=["GET"])
        route("/_sim/reset", view_func=self._ctl_reset, methods=["POST"])
        route("/_sim/config", view_func=self._ctl_config, methods=["GET", "POST"])
        route("/_sim/inject", view_func=self._ctl_inject, methods=["POST"])
        route("/_sim/create_fault", view_func=self._ctl_create_fault, methods=["POST"])
        route("/_sim/predictions", view_func=self._ctl_predictions, methods=["GET"])
        route("/_sim/requests", view_func=self._ctl_requests, methods=["GET"])

    # ---- request gate: injection, auth, rate limit ----

    def _before_request(self) -> Response | None:
        """Apply injected faults, auth and the token buckets before any API view runs."""
        if not _is_simulated_path(request.path):
            return None
        g.arrived = self.now()
        g.arrived_real = time.monotonic()  # Prefer-wait windows are real seconds
        token = _request_token()
        g.token_hash = token_hash(token) if token else None
        fault = self._take_fault(request.method, request.path, g.token_hash)
        if fault is not None:
            g.injected = True
            return fault
        if not request.path.startswith("/v1/"):
            return None  # output files: auth is optional and checked by the view
        if token is None or self._token_invalid(token):
            return _problem(401, UNAUTHENTICATED)
        return self._throttle(
            g.token_hash, _CREATE_PATH.match(request.path) is not None and request.method == "POST"
        )

    def _token_invalid(self, token: str) -> bool:
        with self._lock:
            return token in self.config.invalid_tokens

    def _throttle(self, key: str, create: bool) -> Response | None:
        """Take a token from the create or the other bucket; answer 429 when it is empty."""
        with self._lock:
            account, cfg = self._account_locked(key), self.config
            bucket, rate, burst = _bucket_for(account, cfg, create)
            wait = bucket.take(self.now(), rate, burst)
            g.ratelimit = bucket.headers(rate, burst)
            if wait == 0.0:
                if not create:  # accepted creates are counted when the prediction exists
                    account.counters["other_calls"] += 1
                return None
            account.counters["creates_throttled" if create else "other_throttled"] += 1
            seconds = max(1, math.ceil(wait - 1e-9))
            return _throttle_response(
                seconds, in_header=cfg.retry_after_header, in_body=cfg.retry_after_body
            )

    def _take_fault(self, method: str, path: str, key: str | None) -> Response | None:
        """Consume the first matching injected fault, if any, and build its response."""
        with self._lock:
            for fault in self._faults:
                if fault.method in ("*", method) and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    self._count_locked(key, "injected")
                    return self._fault_response(fault)
        return None

    def _fault_response(self, fault: _Fault) -> Response:
        if fault.status == 429 and fault.body is None:
            given = fault.headers.get("Retry-After", "1")
            seconds = int(given) if given.isdigit() else 1
            response = _throttle_response(
                seconds,
                in_header=self.config.retry_after_header,
                in_body=self.config.retry_after_body,
            )
        elif isinstance(fault.body, str):
            response = Response(fault.body, fault.status, mimetype="text/html")
        elif fault.body is None and fault.status in (502, 503, 504):
            response = Response(b"", fault.status)  # gateway errors: empty body, like Cloudflare
        elif fault.body is None:
            response = _problem(fault.status, _default_problem(fault.status))
        else:
            response = _problem(fault.status, fault.body)
        response.headers.update(fault.headers)
        return response

    def _after_request(self, response: Response) -> Response:
        """Add the rate-limit headers and record the request."""
        if not _is_simulated_path(request.path):
            return response
        if request.path.startswith("/v1/"):
            remaining, reset = g.get("ratelimit") or (self.config.other_burst, 1)
            response.headers["ratelimit-remaining"] = str(remaining)
            response.headers["ratelimit-reset"] = str(reset)
        entry = {
            "t": g.get("arrived", self.now()),
            "method": request.method,
            "path": request.path,
            "query": request.query_string.decode(errors="replace"),
            "token_hash": g.get("token_hash"),
            "json": request.get_json(silent=True),
            "prefer": request.headers.get("Prefer"),
            "status": response.status_code,
            "injected": bool(g.get("injected", False)),
            "create_fault": g.get("create_fault"),
        }
        with self._lock:
            self._log.append(entry)
        if entry["create_fault"] == "drop":
            _shut_client_socket()  # only now: the client's next request must be logged after this
        return response

    def _on_api_error(self, error: _ApiError) -> Response:
        if request.method == "POST" and _CREATE_PATH.match(request.path):
            with self._lock:
                self._count_locked(g.get("token_hash"), "creates_rejected")
        return _problem(error.status, error.body)

    @staticmethod
    def _on_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 404:
            return _problem(404, NOT_FOUND)
        detail = INTERNAL_ERROR["detail"] if status >= 500 else error.description
        return _problem(status, {"detail": detail, "status": status})

    # ---- creating predictions ----

    def _create_for_model(self, owner: str, name: str) -> Response:
        """POST /v1/models/{owner}/{name}/predictions: run an official model."""
        spec = _lookup(f"{owner}/{name}")
        if spec is None:
            raise _ApiError(404, NOT_FOUND)
        body = _create_body(_MODEL_BODY_KEYS, required=("input",))
        return self._create(spec, "hidden", "model", body)

    def _create_for_deployment(self, owner: str, name: str) -> Response:
        """POST /v1/deployments/{owner}/{name}/predictions: a deployment named like a model."""
        spec = _deployment_model(owner, name)
        if spec is None:
            raise _ApiError(404, NOT_FOUND)
        body = _create_body(_MODEL_BODY_KEYS, required=("input",))
        return self._create(spec, spec.version_id, "deployment", body)

    def _create_for_version(self) -> Response:
        """POST /v1/predictions: version id, owner/name or owner/name:version."""
        body = _create_body(_VERSION_BODY_KEYS, required=("version", "input"))
        spec, version = _resolve_version(body["version"])
        return self._create(spec, version, "version", body)

    def _create(self, spec: ModelSpec, version: str, source: str, body: dict[str, Any]) -> Response:
        """Validate the input, record the prediction and answer (holding it for Prefer: wait)."""
        if spec.ref in SCHEMA_MODELS:
            _check_schema_input(spec, version, body["input"])
        else:
            _check_input(spec, body["input"])
        token = _request_token() or ""
        with self._lock:
            no_credit = token in self.config.no_credit_tokens
        if no_credit:
            raise _ApiError(402, INSUFFICIENT_CREDIT)
        wait = parse_prefer_wait(request.headers.get("Prefer"))
        base = _base_url()
        with self._lock:
            pred = self._add_prediction_locked(spec, version, source, body["input"], g.token_hash)
            fault = self._take_create_fault_locked(g.token_hash)
        if fault is not None:
            return self._faulty_create_response(fault, pred, base)
        if wait is None:
            with self._lock:
                return _json_response(201, self._render_locked(pred, base))
        payload = self._hold(pred, wait[0], base)
        return _json_response(201, payload, {"Preference-Applied": wait[1]})

    def _take_create_fault_locked(self, key: str) -> _CreateFault | None:
        """Consume the first create fault aimed at this token (or at every token)."""
        for fault in self._create_faults:
            if fault.key in (None, key):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._create_faults.remove(fault)
                self._count_locked(key, "create_faults")
                return fault
        return None

    def _faulty_create_response(
        self, fault: _CreateFault, pred: _Prediction, base: str
    ) -> Response:
        """Lose the answer to a create that succeeded, the way the fault's kind says."""
        g.create_fault = fault.kind
        if fault.kind == "drop":
            return Response(b"", _DROPPED_STATUS)  # _after_request shuts the socket, once logged
        if fault.kind == "502":
            return Response(fault.body or CLOUDFLARE_502_HTML, 502, mimetype="text/html")
        if fault.kind == "garbage":
            return self._garbage_response(fault.body, pred, base)
        return self._held_response(pred, fault.hold_seconds, base)

    def _garbage_response(self, body: str | None, pred: _Prediction, base: str) -> Response:
        """Answer 201 with a body that is not a prediction (default: the real one, truncated)."""
        if body is None:
            with self._lock:
                full = json.dumps(self._render_locked(pred, base), separators=(",", ":"))
            body = full[: len(full) // 2]
        mimetype = "text/html" if body.lstrip().startswith("<") else "application/json"
        return Response(body, 201, mimetype=mimetype)

    def _held_response(self, pred: _Prediction, seconds: float, base: str) -> Response:
        """Sit on the answer for ``seconds`` of real time (past the read timeout), then send it."""
        deadline = time.monotonic() + seconds
        with self._changed:
            generation = self._generation
            while self._generation == generation and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return _json_response(201, self._render_locked(pred, base))

    def _add_prediction_locked(
        self, spec: ModelSpec, version: str, source: str, inp: dict[str, Any], key: str
    ) -> _Prediction:
        """Create the record and count the accepted create with its in-flight level."""
        now, cfg = self.now(), self.config
        prompt = str(inp.get("prompt", ""))
        behaviour = _behaviour(prompt, spec.ref)
        run_s = run_seconds_for(prompt, cfg, seed=inp.get("seed"), model=spec.ref)
        self._seq += 1
        pred = _Prediction(
            id=_new_id(),
            spec=spec,
            version=version,
            input=dict(inp),
            token_hash=key,
            source=source,
            created=now,
            queue_s=cfg.queue_seconds,
            run_s=None if math.isinf(run_s) else run_s,
            error=behaviour.error,
            empty=behaviour.empty,
            n_outputs=_output_count(spec, inp),
            ext=_output_ext(spec, inp),
            seq=self._seq,
        )
        self._predictions[pred.id] = pred
        account = self._account_locked(key)
        inflight = self._inflight_locked(account, now) + 1
        account.active.add(pred.id)
        account.prediction_ids.append(pred.id)
        account.create_times.append(now)
        account.inflight_at_create.append((now, inflight))
        return pred

    def _hold(self, pred: _Prediction, seconds: int, base: str) -> dict[str, Any]:
        """Keep a Prefer-wait create open until terminal or the window ends (waiting unlocked).

        The window counts from the request's arrival. The wait ends at the prediction's known
        finish time, or when cancel, configure, wake_waiters, reset or stop notify.
        """
        deadline = g.get("arrived_real", time.monotonic()) + max(0.0, seconds - _WAIT_MARGIN_S)
        with self._changed:
            generation = self._generation
            while self._generation == generation:
                if pred.status(self.now()) in TERMINAL_STATUSES:
                    return self._render_locked(pred, base)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(self._nap_seconds(pred, left))
            as_starting = self.config.prefer_wait_timeout_status == "starting"
            return self._render_locked(pred, base, as_starting=as_starting)

    def _nap_seconds(self, pred: _Prediction, left: float) -> float:
        """Return how long a held create may wait before it must look at the clock again."""
        if not self._real_time_clock:
            return min(left, _WAIT_POLL_S)  # a fake clock moves without telling us
        end = pred.terminal_time()
        if end is None:
            return left  # hangs: only a cancel (which notifies) or the window ends it
        return min(left, max(0.0, end - self.now()) + _WAKE_SLACK_S)

    # ---- reading and canceling predictions ----

    def _owned_prediction_locked(self, pid: str) -> _Prediction:
        pred = self._predictions.get(pid)
        if pred is None or pred.token_hash != g.token_hash:
            raise _ApiError(404, NOT_FOUND)
        return pred

    def _get_prediction(self, pid: str) -> Response:
        """GET /v1/predictions/{id}: the polling hot path."""
        base = _base_url()
        with self._lock:
            self._count_locked(g.token_hash, "gets")
            pred = self._owned_prediction_locked(pid)
            return _json_response(200, self._render_locked(pred, base))

    def _cancel_prediction(self, pid: str) -> Response:
        """POST /v1/predictions/{id}/cancel: 200; a terminal prediction is left unchanged."""
        base = _base_url()
        with self._lock:
            self._count_locked(g.token_hash, "cancels")
            pred = self._owned_prediction_locked(pid)
            now = self.now()
            if pred.status(now) not in TERMINAL_STATUSES:
                pred.canceled_at = now
                self._changed.notify_all()  # a held create of it answers now
            return _json_response(200, self._render_locked(pred, base))

    def _list_predictions(self) -> Response:
        """GET /v1/predictions: the caller's predictions, filtered, newest first, 100 a page.

        ``next``/``previous`` are absolute URLs with a keyset cursor (stable while new
        predictions arrive) and the same filters. Results lack ``logs``, and their ``input``
        is ``{}`` once ``input_retention_seconds`` have passed since the create.
        """
        base, filters = _base_url(), _list_filters()
        cursor = request.args.get("cursor")
        position = _decode_cursor(cursor) if cursor else None
        with self._lock:
            self._count_locked(g.token_hash, "lists")
            matches = self._listed_locked(g.token_hash, filters)
            page, older, newer = _select_page(matches, position)
            results = [self._list_item_locked(pred, base) for pred in page]
        return _json_response(
            200,
            {
                "next": _page_link(base, filters, older),
                "previous": _page_link(base, filters, newer),
                "results": results,
            },
        )

    def _listed_locked(self, key: str, filters: _ListFilters) -> list[_Prediction]:
        """Return the token's predictions that pass the filters, newest first."""
        account = self._accounts.get(key)
        ids = account.prediction_ids if account else []
        preds = (self._predictions[pid] for pid in reversed(ids))
        return [pred for pred in preds if filters.admits(self._wall(pred.created), "api")]

    def _list_item_locked(self, pred: _Prediction, base: str) -> dict[str, Any]:
        """Render a prediction the way the list shows it: no logs; input gone after retention."""
        item = self._render_locked(pred, base)
        item.pop("logs", None)
        if self.now() >= pred.created + self.config.input_retention_seconds:
            item["input"] = {}
        return item

    # ---- output files ----

    def _serve_output(self, pid: str, filename: str) -> Response:
        """GET /_sim/outputs/{id}/{n}.{ext}: the bytes of one output, until the TTL ends."""
        token = _request_token()
        with self._lock:
            cfg = self.config
            if cfg.require_auth_for_files and (token is None or token in cfg.invalid_tokens):
                return _problem(401, UNAUTHENTICATED)
            pred, ext = self._output_lookup_locked(pid, filename)
            self._count_locked(pred.token_hash, "downloads")
            fail = cfg.download_failures > 0
            if fail:
                cfg.download_failures -= 1
            delay = cfg.download_delay_seconds
        if delay > 0:
            time.sleep(delay)
        if fail:
            return _problem(500, INTERNAL_ERROR)
        data = output_bytes(ext, f"{pid}/{filename.split('.')[0]}", cfg.output_bytes,
                            **_picture_of(pred))
        return Response(data, 200, mimetype=CONTENT_TYPES[ext])

    def _output_lookup_locked(self, pid: str, filename: str) -> tuple[_Prediction, str]:
        """Return the prediction and extension behind an output URL, or raise 404."""
        pred = self._predictions.get(pid)
        index, _, ext = filename.partition(".")
        if pred is None or ext != pred.ext or not index.isdigit():
            raise _ApiError(404, NOT_FOUND)
        now = self.now()
        end = pred.terminal_time()
        alive = (
            pred.status(now) == "succeeded"
            and end is not None
            and now < end + self.config.output_ttl_seconds
        )
        if not alive or pred.empty or int(index) >= pred.n_outputs:
            raise _ApiError(404, NOT_FOUND)
        return pred, ext

    # ---- models, versions, deployments, account ----

    def _get_model(self, owner: str, name: str) -> Response:
        """GET /v1/models/{owner}/{name}."""
        return _json_response(200, _model_json(_known_model(owner, name)))

    def _list_versions(self, owner: str, name: str) -> Response:
        """GET /v1/models/{owner}/{name}/versions."""
        spec = _known_model(owner, name)
        return _json_response(
            200, {"next": None, "previous": None, "results": [_version_json(spec)]}
        )

    def _get_version(self, owner: str, name: str, vid: str) -> Response:
        """GET /v1/models/{owner}/{name}/versions/{id}: run() calls it for version refs."""
        spec = _known_model(owner, name)
        if not _has_version(spec, vid):
            raise _ApiError(404, NOT_FOUND)
        if spec.ref in SCHEMA_MODELS:
            return _json_response(200, schema_models.version_json(spec.ref, vid))
        return _json_response(200, _version_json(spec))

    def _get_deployment(self, owner: str, name: str) -> Response:
        """GET /v1/deployments/{owner}/{name}."""
        spec = _deployment_model(owner, name)
        if spec is None:
            raise _ApiError(404, NOT_FOUND)
        return _json_response(200, _deployment_json(owner, name, spec))

    @staticmethod
    def _get_account() -> Response:
        """GET /v1/account."""
        return _json_response(
            200, {"type": "user", "username": "sim", "name": "Sim", "github_url": None}
        )

    @staticmethod
    def _get_webhook_secret() -> Response:
        """GET /v1/webhooks/default/secret (no webhooks are delivered)."""
        return _json_response(200, {"key": _WEBHOOK_SECRET})

    # ---- files API ----

    def _upload_file(self) -> Response:
        """POST /v1/files: multipart ``content`` (+ ``metadata`` JSON); 201 File."""
        part = request.files.get("content")
        if part is None:
            raise _ApiError(
                422,
                _validation_problem([_field_error("required", "content", "content is required")]),
            )
        data = part.read()
        if len(data) >= _MAX_FILE_BYTES:
            raise _ApiError(413, FILE_TOO_BIG)
        stored = _StoredFile(
            id=_new_id(),
            name=part.filename or "file",
            content_type=part.mimetype or "application/octet-stream",
            data=data,
            metadata=_parse_metadata(request.form.get("metadata")),
            created=self.now(),
            token_hash=g.token_hash,
        )
        with self._lock:
            self._files[stored.id] = stored
        return _json_response(201, self._file_json(stored, _base_url()))

    def _owned_file(self, fid: str) -> _StoredFile:
        with self._lock:
            stored = self._files.get(fid)
        if stored is None or stored.token_hash != g.token_hash:
            raise _ApiError(404, FILE_NOT_FOUND)
        return stored

    def _get_file(self, fid: str) -> Response:
        """GET /v1/files/{id}."""
        return _json_response(200, self._file_json(self._owned_file(fid), _base_url()))

    def _list_files(self) -> Response:
        """GET /v1/files."""
        base = _base_url()
        with self._lock:
            mine = [f for f in self._files.values() if f.token_hash == g.token_hash]
        return _json_response(
            200,
            {"next": None, "previous": None, "results": [self._file_json(f, base) for f in mine]},
        )

    def _delete_file(self, fid: str) -> Response:
        """DELETE /v1/files/{id}: 204 (the client checks for exactly 204)."""
        stored = self._owned_file(fid)
        with self._lock:
            self._files.pop(stored.id, None)
        return Response(b"", 204)

    def _download_file(self, fid: str) -> Response:
        """GET /v1/files/{id}/download: the uploaded bytes."""
        stored = self._owned_file(fid)
        return Response(stored.data, 200, mimetype=stored.content_type)

    def _file_json(self, stored: _StoredFile, base: str) -> dict[str, Any]:
        md5 = hashlib.md5(stored.data, usedforsecurity=False).hexdigest()
        return {
            "id": stored.id,
            "name": stored.name,
            "content_type": stored.content_type,
            "size": len(stored.data),
            "etag": md5,
            "checksums": {"sha256": hashlib.sha256(stored.data).hexdigest(), "md5": md5},
            "metadata": stored.metadata,
            "created_at": self._iso(stored.created),
            "expires_at": self._iso(stored.created + 24 * 3600),
            "urls": {"get": f"{base}/v1/files/{stored.id}"},
        }

    # ---- /_sim control surface (for other processes: benchmarks, demo) ----

    @staticmethod
    def _ctl_index() -> Response:
        """GET /: what this server is, for people trying the demo."""
        return _json_response(
            200,
            {"simulator": "replicate", "models": sorted(MODELS), "api": "/v1", "control": "/_sim"},
        )

    def _ctl_stats(self) -> Response:
        """GET /_sim/stats[?token_hash=]: counters of one account, or of all."""
        key = request.args.get("token_hash")
        with self._lock:
            if key:
                return _json_response(200, self._stats_locked(key))
            return _json_response(200, {k: self._stats_locked(k) for k in self._accounts})

    def _ctl_creates(self) -> Response:
        """GET /_sim/creates?token_hash=&seconds=60&since=: create times and window maxima.

        ``by_prompt`` counts the accepted creates per prompt since the last reset (not ``since``).
        """
        key = request.args.get("token_hash", "")
        seconds = float(request.args.get("seconds", "60"))
        since = float(request.args.get("since", "-inf"))
        with self._lock:
            times = [t for t in self._create_times_locked(key) if t >= since]
            account = self._accounts.get(key)
            samples = list(account.inflight_at_create) if account else []
        by_prompt = Counter(str(inp.get("prompt")) for inp in self._inputs_of(key))
        return _json_response(
            200,
            {
                "now": self.now(),
                "create_times": times,
                "max_creates_in_window": _max_in_window(times, seconds),
                "max_inflight_at_create": max((n for t, n in samples if t >= since), default=0),
                "by_prompt": dict(by_prompt),
            },
        )

    def _ctl_reset(self) -> Response:
        """POST /_sim/reset."""
        self.reset()
        return _json_response(200, {"ok": True})

    def _ctl_config(self) -> Response:
        """GET or POST /_sim/config: read or change SimConfig fields (JSON)."""
        if request.method == "POST":
            try:
                self.configure(**(request.get_json(force=True, silent=True) or {}))
            except (TypeError, ValueError) as exc:
                return _problem(400, {"detail": str(exc), "status": 400})
        with self._lock:
            return _json_response(200, _config_json(self.config))

    def _ctl_inject(self) -> Response:
        """POST /_sim/inject: {method, path_regex, status, body?, headers?, count?}."""
        spec = request.get_json(force=True, silent=True) or {}
        try:
            self.inject(
                str(spec.get("method", "*")),
                str(spec["path_regex"]),
                int(spec["status"]),
                spec.get("body"),
                spec.get("headers"),
                int(spec.get("count", 1)),
            )
        except (KeyError, TypeError, ValueError, re.error) as exc:
            return _problem(400, {"detail": f"bad injection: {exc}", "status": 400})
        return _json_response(200, {"ok": True})

    def _ctl_create_fault(self) -> Response:
        """POST /_sim/create_fault: {kind, count?, token_hash?, body?, hold_seconds?}."""
        spec = request.get_json(force=True, silent=True) or {}
        try:
            self._add_create_fault(
                str(spec["kind"]),
                int(spec.get("count", 1)),
                spec.get("token_hash"),
                spec.get("body"),
                float(spec.get("hold_seconds", _DEFAULT_HOLD_S)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return _problem(400, {"detail": f"bad create fault: {exc}", "status": 400})
        return _json_response(200, {"ok": True})

    def _ctl_predictions(self) -> Response:
        """GET /_sim/predictions[?token_hash=]."""
        return _json_response(200, self._predictions_by_hash(request.args.get("token_hash")))

    def _ctl_requests(self) -> Response:
        """GET /_sim/requests: the request log."""
        return _json_response(200, self.requests_log())


# --------------------------------------------------------------------------------------------
# Request-body validation and catalogue JSON (pure, raise _ApiError)


def _create_body(allowed: frozenset[str], *, required: tuple[str, ...]) -> dict[str, Any]:
    """Parse a create body; 400 for bad JSON, 422 for missing/unknown top-level keys."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _ApiError(400, {"detail": "JSON parse error", "status": 400}) from None
    if not isinstance(body, dict):
        error = f"Invalid type. Expected: object, given: {_json_type(body)}"
        raise _ApiError(422, _validation_problem([_field_error("invalid_type", "", error)]))
    errors = [
        _field_error("required", "", f"{key} is required") for key in required if key not in body
    ]
    errors += [
        _field_error(
            "additional_property_not_allowed", "", f"Additional property {key} is not allowed"
        )
        for key in sorted(set(body) - allowed)
    ]
    if "input" in body and not isinstance(body["input"], dict):
        given = _json_type(body["input"])
        errors.append(
            _field_error("invalid_type", "input", f"Invalid type. Expected: object, given: {given}")
        )
    if errors:
        raise _ApiError(422, _validation_problem(errors))
    return body


def _check_input(spec: ModelSpec, inp: dict[str, Any]) -> None:
    """Validate the fields the simulator models: prompt, output_format, num_outputs."""
    errors: list[dict[str, str]] = []
    if "prompt" not in inp:
        errors.append(_field_error("required", "input", "prompt is required"))
    elif not isinstance(inp["prompt"], str):
        given = _json_type(inp["prompt"])
        errors.append(
            _field_error(
                "invalid_type", "input.prompt", f"Invalid type. Expected: string, given: {given}"
            )
        )
    fmt = inp.get("output_format")
    if "output_format" in inp and spec.formats and fmt not in spec.formats:
        allowed = ", ".join(f'"{f}"' for f in spec.formats)
        errors.append(
            _field_error(
                "enum",
                "input.output_format",
                f"output_format must be one of the following: {allowed}",
            )
        )
    errors += _num_outputs_errors(inp)
    if errors:
        raise _ApiError(422, _validation_problem(errors))


def _num_outputs_errors(inp: dict[str, Any]) -> list[dict[str, str]]:
    if "num_outputs" not in inp:
        return []
    value = inp["num_outputs"]
    name = "input.num_outputs"
    if not isinstance(value, int) or isinstance(value, bool):
        return [
            _field_error(
                "invalid_type", name, f"Invalid type. Expected: integer, given: {_json_type(value)}"
            )
        ]
    if value > 4:
        return [_field_error("number_lte", name, "Must be less than or equal to 4")]
    if value < 1:
        return [_field_error("number_gte", name, "Must be greater than or equal to 1")]
    return []


def _output_count(spec: ModelSpec, inp: dict[str, Any]) -> int:
    if spec.kind == "dict":
        return 2
    return int(inp.get("num_outputs", 1) or 1) if spec.kind == "image" else 1


def _check_schema_input(spec: ModelSpec, version: str, inp: dict[str, Any]) -> None:
    """422 for what the model's own schema refuses (unknown fields are dropped silently)."""
    errors = [_field_error(kind, f"input.{name}", f"{name}: {kind}")
              for name, kind in schema_models.input_errors(spec.ref, version, inp)]
    if errors:
        raise _ApiError(422, _validation_problem(errors))


def _output_ext(spec: ModelSpec, inp: dict[str, Any]) -> str:
    fmt = inp.get("output_format")
    return fmt if spec.formats and fmt in spec.formats else spec.default_format


def _resolve_version(value: Any) -> tuple[ModelSpec, str]:
    """Resolve ``version``: a 64-hex id, ``owner/name`` or ``owner/name:id`` (else 422)."""
    text = value if isinstance(value, str) else ""
    ref, _, vid = text.partition(":")
    if "/" in ref:
        spec = _lookup(ref)
        if spec is not None and (not vid or _has_version(spec, vid)):
            return spec, vid or "hidden"
        raise _ApiError(422, INVALID_VERSION)
    for spec in [*MODELS.values(), *SCHEMA_MODELS.values()]:
        if _has_version(spec, text):
            return spec, text
    raise _ApiError(422, INVALID_VERSION)


def _has_version(spec: ModelSpec, vid: str) -> bool:
    if spec.ref in SCHEMA_MODELS:
        return schema_models.has_version(spec.ref, vid)
    return vid == spec.version_id


def _known_model(owner: str, name: str) -> ModelSpec:
    spec = _lookup(f"{owner}/{name}")
    if spec is None:
        raise _ApiError(404, NOT_FOUND)
    return spec


def _deployment_model(owner: str, name: str) -> ModelSpec | None:
    """Any deployment named like a known model (``acme/flux-dev``) runs that model."""
    exact = MODELS.get(f"{owner}/{name}")
    return exact or next((s for s in MODELS.values() if s.name == name), None)


@dataclass(frozen=True)
class _ListFilters:
    """The filters of GET /v1/predictions, parsed, and as given (carried into next/previous)."""

    after: datetime | None
    before: datetime | None
    source: str | None
    raw: dict[str, str]

    def admits(self, created: datetime, source: str) -> bool:
        """created_after is inclusive and created_before exclusive, as Replicate documents."""
        if self.after is not None and created < self.after:
            return False
        if self.before is not None and created >= self.before:
            return False
        return self.source is None or self.source == source


def _list_filters() -> _ListFilters:
    """Read the list filters from the query string; a date that is not ISO 8601 is a 400."""
    raw = {name: request.args[name] for name in _LIST_FILTERS if request.args.get(name)}
    return _ListFilters(
        after=_date_arg(raw, "created_after"),
        before=_date_arg(raw, "created_before"),
        source=raw.get("source"),
        raw=raw,
    )


def _date_arg(raw: Mapping[str, str], name: str) -> datetime | None:
    if name not in raw:
        return None
    try:
        return parse_iso8601(raw[name])
    except ValueError:
        detail = f"{name} must be an ISO 8601 date-time"
        raise _ApiError(400, {"detail": detail, "status": 400}) from None


def _page_link(base: str, filters: _ListFilters, cursor_at: tuple[str, int] | None) -> str | None:
    """Return the absolute URL of a neighbouring page, with the same filters as given."""
    if cursor_at is None:
        return None
    query = {**filters.raw, "cursor": _encode_cursor(*cursor_at)}
    return f"{base}/v1/predictions?{urlencode(query)}"


def _select_page(
    newest_first: list[_Prediction], cursor: tuple[str, int] | None
) -> tuple[list[_Prediction], tuple[str, int] | None, tuple[str, int] | None]:
    """Return one page (newest first) and the cursors of the older and the newer pages."""
    if cursor is None:
        page = newest_first[:_PAGE_SIZE]
    elif cursor[0] == "older":
        page = [p for p in newest_first if p.seq < cursor[1]][:_PAGE_SIZE]
    else:
        page = [p for p in newest_first if p.seq > cursor[1]][-_PAGE_SIZE:]
    if page:
        low, high = page[-1].seq, page[0].seq
    elif cursor is None:
        return page, None, None
    else:  # an empty page keeps the way back to where the cursor pointed
        seq = cursor[1]
        low, high = (seq, seq - 1) if cursor[0] == "older" else (seq + 1, seq)
    older = ("older", low) if any(p.seq < low for p in newest_first) else None
    newer = ("newer", high) if any(p.seq > high for p in newest_first) else None
    return page, older, newer


def _parse_metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _ApiError(
            422,
            _validation_problem(
                [_field_error("invalid_type", "metadata", "metadata must be a JSON object")]
            ),
        )
    return value


def _version_json(spec: ModelSpec) -> dict[str, Any]:
    """Return a version whose Output schema is not an iterator (so run() returns a value)."""
    if spec.ref in SCHEMA_MODELS:
        return schema_models.version_json(spec.ref)
    properties: dict[str, Any] = {"prompt": {"type": "string", "title": "Prompt", "x-order": 0}}
    if spec.formats:
        properties["output_format"] = {
            "type": "string",
            "enum": list(spec.formats),
            "default": spec.default_format,
            "x-order": 1,
        }
    uri = {"type": "string", "format": "uri"}
    output = {"type": "array", "items": uri} if spec.kind == "image" else uri
    schemas = {
        "Input": {
            "type": "object",
            "title": "Input",
            "required": ["prompt"],
            "properties": properties,
        },
        "Output": {**output, "title": "Output"},
    }
    return {
        "id": spec.version_id,
        "created_at": "2025-01-01T00:00:00.000000Z",
        "cog_version": "0.14.0",
        "openapi_schema": {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "components": {"schemas": schemas},
        },
    }


def _model_json(spec: ModelSpec) -> dict[str, Any]:
    return {
        "url": f"https://replicate.com/{spec.ref}",
        "owner": spec.owner,
        "name": spec.name,
        "description": f"Simulated {spec.kind} model",
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version_json(spec),
    }


def _deployment_json(owner: str, name: str, spec: ModelSpec) -> dict[str, Any]:
    return {
        "owner": owner,
        "name": name,
        "current_release": {
            "number": 1,
            "model": spec.ref,
            "version": spec.version_id,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "created_by": {"type": "user", "username": "sim", "name": "Sim", "github_url": None},
            "configuration": {"hardware": "gpu-a100-large", "min_instances": 0, "max_instances": 1},
        },
    }


def _config_json(config: SimConfig) -> dict[str, Any]:
    """Return the config as JSON; token sets are shown as hashes, never raw."""
    out: dict[str, Any] = {}
    for f in fields(SimConfig):
        value = getattr(config, f.name)
        out[f.name] = sorted(token_hash(t) for t in value) if f.name in _TOKEN_SET_FIELDS else value
    return out


# --------------------------------------------------------------------------------------------
# Command line (the one-command demo)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Local simulator of Replicate's HTTP API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--run-seconds", type=float, default=SimConfig.run_seconds)
    parser.add_argument("--queue-seconds", type=float, default=SimConfig.queue_seconds)
    parser.add_argument("--create-rpm", type=float, default=SimConfig.create_rate_per_minute)
    parser.add_argument("--create-burst", type=int, default=SimConfig.create_burst)
    parser.add_argument("--other-rpm", type=float, default=SimConfig.other_rate_per_minute)
    parser.add_argument("--other-burst", type=int, default=SimConfig.other_burst)
    parser.add_argument("--run-seconds-spread", type=float, default=SimConfig.run_seconds_spread)
    parser.add_argument("--output-bytes", type=int, default=SimConfig.output_bytes)
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        run_seconds=args.run_seconds,
        queue_seconds=args.queue_seconds,
        create_rate_per_minute=args.create_rpm,
        create_burst=args.create_burst,
        other_rate_per_minute=args.other_rpm,
        other_burst=args.other_burst,
        run_seconds_spread=args.run_seconds_spread,
        output_bytes=args.output_bytes,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the simulator in the foreground until Ctrl-C."""
    args = build_arg_parser().parse_args(argv)
    sim = Simulator(config_from_args(args))
    url = sim.start(args.host, args.port)
    print(f"Replicate simulator on {url} (any non-empty token works)")
    print(f"  export REPLICATE_BASE_URL={url} REPLICATE_API_TOKEN=r8_demo")
    print(f"  control: {url}/_sim/stats  {url}/_sim/predictions  POST {url}/_sim/config")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
