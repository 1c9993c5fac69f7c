"""The Replicate simulator, driven by the real replicate 1.0.7 client (and raw httpx where the
client hides what a test needs: headers, exact bodies, GETs the client would retry)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import signal
import struct
import subprocess
import sys
import time
import wave
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta, timezone
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput

from replicate_generation.devtools.simulator import (
    CLOUDFLARE_502_HTML,
    ERROR_OOM,
    ERROR_SENSITIVE,
    ERROR_TRANSIENT,
    MODELS,
    SimConfig,
    Simulator,
    build_arg_parser,
    config_from_args,
    output_bytes,
    parse_cancel_after,
    parse_iso8601,
    parse_prefer_wait,
    pictures,
    run_seconds_for,
    token_hash,
    video,
)
from replicate_generation.devtools.simulator.web import ApiError

TOKEN = "r8_sim_test_token_one"
OTHER = "r8_sim_test_token_two"
FLUX = "black-forest-labs/flux-dev"
FLUX_VERSION = MODELS[FLUX].version_id
CREATE_PATH = f"/v1/models/{FLUX}/predictions"


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def live() -> Iterator[Simulator]:
    """A simulator on the real clock with short runs."""
    sim = Simulator(SimConfig(run_seconds=0.1, queue_seconds=0.02))
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def clocked(clock: FakeClock) -> Iterator[Simulator]:
    """A simulator on a fake clock: 1 s starting, 2 s processing."""
    sim = Simulator(SimConfig(run_seconds=2.0, queue_seconds=1.0), clock=clock)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., replicate.Client]]:
    """Build real replicate clients that poll fast; close their connection pools afterwards."""
    made: list[replicate.Client] = []

    def build(sim: Simulator, token: str | None = TOKEN) -> replicate.Client:
        client = replicate.Client(api_token=token, base_url=sim.base_url)
        client.poll_interval = 0.02
        made.append(client)
        return client

    yield build
    for client in made:
        client._client.close()


@pytest.fixture
def make_http() -> Iterator[Callable[..., httpx.Client]]:
    """Build raw httpx clients (optionally authenticated) against a simulator."""
    made: list[httpx.Client] = []

    def build(sim: Simulator, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=sim.base_url, headers=headers, timeout=10)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """Parse a PNG, checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = body
        pos += 12 + length
    return chunks


def _riff_chunks(data: bytes) -> list[bytes]:
    """Walk the chunks of a RIFF file (WebP, WAV), checking that their sizes add up."""
    kinds, pos = [], 12
    while pos < len(data):
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        kinds.append(data[pos : pos + 4])
        pos += 8 + size + size % 2
    assert pos == len(data)
    return kinds


def _mp4_boxes(data: bytes) -> list[bytes]:
    """Walk the top-level boxes of an ISO-BMFF file, checking that their sizes add up."""
    kinds, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += size
    assert pos == len(data)
    return kinds


def _jpeg_markers(data: bytes) -> list[int]:
    """Walk a JPEG's marker segments up to the scan (SOS), checking their lengths."""
    markers, pos = [], 2
    while data[pos + 1] != 0xDA:
        assert data[pos] == 0xFF
        markers.append(data[pos + 1])
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return markers


def assert_real_file(ext: str, data: bytes, padded: bool = False) -> None:
    """Check the container structure of each output format (tiny unless ``padded``)."""
    if ext == "png":
        chunks = _png_chunks(data)
        width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
        # One filter byte per line, then RGB pixels.
        assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
        assert list(chunks)[-1] == b"IEND" and (b"paDd" in chunks) == padded
    elif ext == "jpg":
        assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"
        markers = _jpeg_markers(data)
        assert markers[0] == 0xE0 and b"JFIF\x00" in data[:20] and 0xC0 in markers  # SOF0
    elif ext == "webp":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
        assert _riff_chunks(data) == ([b"VP8X", b"VP8L", b"PADD"] if padded else [b"VP8L"])
        assert data[data.index(b"VP8L") + 8] == 0x2F  # VP8L signature
    elif ext == "mp4":
        middle = b"moov" if b"moov" in data else b"free"  # a demo clip, or the tagged stub
        assert _mp4_boxes(data) == [b"ftyp", middle, b"mdat"] + ([b"free"] if padded else [])
    else:
        assert _riff_chunks(data)[-1] == (b"JUNK" if padded else b"data")
        with wave.open(io.BytesIO(data)) as audio:
            assert audio.getnchannels() == 1 and audio.getnframes() > 0
    # Small: benchmarks download thousands (a demo clip is raw I_PCM samples, a little more).
    assert 0 < len(data) and (padded or len(data) < (16384 if ext == "mp4" else 4096))


def post_create(http: httpx.Client, body: Any, **headers: str) -> httpx.Response:
    return http.post(CREATE_PATH, json=body, headers=headers)


# ------------------------------------------------------------------------------------------
# Lifecycle and prediction JSON


def test_prediction_lifecycle_follows_the_clock(
    clocked: Simulator, clock: FakeClock, make_client: Callable[..., replicate.Client]
) -> None:
    client = make_client(clocked)
    created = client.models.predictions.create(model=FLUX, input={"prompt": "a cat"})
    assert (created.status, created.version, created.model) == ("starting", "hidden", FLUX)
    assert created.output is None and created.logs == "" and created.started_at is None
    assert created.urls is not None and set(created.urls) == {"get", "cancel", "web"}
    assert created.urls["get"] == f"{clocked.base_url}/v1/predictions/{created.id}"

    clock.advance(1.0)
    running = client.predictions.get(created.id)
    assert running.status == "processing" and running.started_at is not None
    assert running.output == [] and running.completed_at is None
    assert running.logs is not None and "Using seed" in running.logs

    clock.advance(2.0)
    done = client.predictions.get(created.id)
    assert done.status == "succeeded" and done.error is None
    assert done.output == [f"{clocked.base_url}/_sim/outputs/{created.id}/0.webp"]
    assert done.metrics == {"predict_time": 2.0, "total_time": 3.0}
    assert done.completed_at is not None
    assert done.progress is not None and done.progress.percentage == 1.0


def test_run_with_prefer_wait_needs_one_request(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    output = make_client(live).run(FLUX, input={"prompt": "a cat", "num_outputs": 2})
    assert isinstance(output, list) and len(output) == 2
    assert [entry["prefer"] for entry in live.requests_log()] == ["wait"]

    answer = post_create(make_http(live), {"input": {"prompt": "x"}}, Prefer="wait=5")
    assert answer.status_code == 201
    assert answer.headers["Preference-Applied"] == "wait=5"
    assert answer.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("model", "extra", "ext", "content_type"),
    [
        (FLUX, {}, "webp", "image/webp"),
        (FLUX, {"output_format": "png"}, "png", "image/png"),
        ("black-forest-labs/flux-kontext-max", {}, "png", "image/png"),
        ("qwen/qwen-image", {"output_format": "jpg"}, "jpg", "image/jpeg"),
        ("google/imagen-4-ultra", {}, "jpg", "image/jpeg"),
        ("google/nano-banana", {}, "jpg", "image/jpeg"),
        ("black-forest-labs/flux-1.1-pro-ultra", {}, "jpg", "image/jpeg"),
        ("google/veo-3-fast", {}, "mp4", "video/mp4"),
        ("kwaivgi/kling-v2.1-master", {}, "mp4", "video/mp4"),
        ("resemble-ai/chatterbox", {}, "wav", "audio/wav"),
    ],
)
def test_outputs_are_real_files_of_the_right_kind(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    model: str,
    extra: dict[str, Any],
    ext: str,
    content_type: str,
) -> None:
    live.configure(run_seconds=0.0, queue_seconds=0.0)
    output = make_client(live).run(model, input={"prompt": "x", **extra})
    if MODELS[model].kind == "image":
        assert isinstance(output, list) and len(output) == 1
        output = output[0]
    assert isinstance(output, str) and output.endswith(f"/0.{ext}")
    download = httpx.get(output, timeout=10)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == content_type
    assert_real_file(ext, download.content)


def test_every_output_is_distinct() -> None:
    for ext in ("png", "jpg", "webp", "mp4", "wav"):
        first, second = output_bytes(ext, "p1/0"), output_bytes(ext, "p1/1")
        assert first != second, ext
        assert first == output_bytes(ext, "p1/0"), ext  # deterministic: served on demand
        assert_real_file(ext, first)


def test_data_uri_mode_gives_file_outputs(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    live.configure(output_as_data_uri=True)
    output = make_client(live).run(FLUX, input={"prompt": "x", "output_format": "png"})
    assert isinstance(output, list) and isinstance(output[0], FileOutput)
    assert output[0].url.startswith("data:image/png;base64,")
    assert_real_file("png", output[0].read())


# ------------------------------------------------------------------------------------------
# Errors: 401, 402, 404, 422


def test_missing_or_invalid_token_is_401(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    live.config.invalid_tokens = {OTHER}
    with pytest.raises(ReplicateError) as caught:
        make_client(live, OTHER).models.predictions.create(model=FLUX, input={"prompt": "x"})
    assert caught.value.status == 401
    assert caught.value.title == "Unauthenticated"
    assert caught.value.detail == "You did not pass a valid authentication token"
    with pytest.raises(ReplicateError) as no_token:
        make_client(live, None).predictions.get("abc")  # env is clean: no header at all
    assert no_token.value.status == 401

    anonymous = post_create(make_http(live, None), {"input": {"prompt": "x"}})
    assert anonymous.headers["Content-Type"] == "application/problem+json"
    assert anonymous.json() == {
        "title": "Unauthenticated",
        "detail": "You did not pass a valid authentication token",
        "status": 401,
    }
    token_scheme = make_http(live, None).post(
        CREATE_PATH, json={"input": {"prompt": "x"}}, headers={"Authorization": f"Token {TOKEN}"}
    )
    assert token_scheme.status_code == 201
    assert live.predictions() != [] and live.predictions(OTHER) == []


def test_no_credit_is_402_on_creates_only(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    live.config.no_credit_tokens = {TOKEN}
    client = make_client(live)
    with pytest.raises(ReplicateError) as caught:
        client.models.predictions.create(model=FLUX, input={"prompt": "x"})
    assert caught.value.status == 402 and caught.value.title == "Insufficient credit"
    assert caught.value.detail is not None and "insufficient credit" in caught.value.detail
    assert client.accounts.current().username == "sim"
    assert live.stats(TOKEN)["creates_rejected"] == 1
    assert live.predictions() == []


def test_unknown_model_is_404_with_the_real_body(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    with pytest.raises(ReplicateError) as caught:
        make_client(live).models.predictions.create(model="acme/nope", input={"prompt": "x"})
    assert caught.value.status == 404
    assert caught.value.detail == "The requested resource could not be found."


def test_bad_bodies_and_inputs_are_422(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    client, http = make_client(live), make_http(live)
    with pytest.raises(ReplicateError) as caught:
        client.models.predictions.create(model=FLUX, input={"seed": 1})
    assert (caught.value.status, caught.value.title) == (422, "Input validation failed")
    assert caught.value.detail == "- input: prompt is required\n"

    imagen = "/v1/models/google/imagen-4-ultra/predictions"
    bad_format = http.post(imagen, json={"input": {"prompt": "x", "output_format": "webp"}})
    assert bad_format.json() == {
        "detail": '- input.output_format: output_format must be one of the following: "jpg", '
        '"png"\n',
        "status": 422,
        "title": "Input validation failed",
        "invalid_fields": [
            {
                "type": "enum",
                "field": "input.output_format",
                "description": 'output_format must be one of the following: "jpg", "png"',
            }
        ],
    }
    extra_key = post_create(http, {"input": {"prompt": "x"}, "model": FLUX}).json()
    assert (
        extra_key["invalid_fields"][0]["description"] == "Additional property model is not allowed"
    )
    assert post_create(http, {}).json()["invalid_fields"][0]["type"] == "required"
    too_many = post_create(http, {"input": {"prompt": "x", "num_outputs": 5}}).json()
    assert too_many["invalid_fields"][0]["type"] == "number_lte"

    with pytest.raises(ReplicateError) as bad_version:
        client.predictions.create(version="0" * 64, input={"prompt": "x"})
    assert bad_version.value.status == 422
    assert bad_version.value.title == "Invalid version or not permitted"
    assert live.predictions() == []
    assert live.stats(TOKEN)["creates_rejected"] == 6


def test_version_deployment_and_catalogue_calls(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    client = make_client(live)
    assert isinstance(client.run(f"{FLUX}:{FLUX_VERSION}", input={"prompt": "v"}), list)
    paths = [entry["path"] for entry in live.requests_log()]
    assert paths == ["/v1/predictions", f"/v1/models/{FLUX}/versions/{FLUX_VERSION}"]
    by_id = client.predictions.create(version=FLUX_VERSION, input={"prompt": "id"})
    assert by_id.version == FLUX_VERSION
    by_name = make_http(live).post(
        "/v1/predictions", json={"version": FLUX, "input": {"prompt": "n"}}
    )
    assert by_name.status_code == 201 and by_name.json()["version"] == "hidden"
    deployed = client.deployments.predictions.create("acme/flux-dev", input={"prompt": "d"})
    assert deployed.model == FLUX
    assert client.deployments.get("acme/flux-dev").current_release is not None
    model = client.models.get(FLUX)
    assert model.latest_version is not None and model.latest_version.id == FLUX_VERSION
    sources = sorted(p["source"] for p in live.predictions(TOKEN))
    assert sources == ["deployment", "version", "version", "version"]


# ------------------------------------------------------------------------------------------
# Rate limiting and counting


def test_create_bucket_admits_exactly_the_burst_then_429(
    clocked: Simulator,
    clock: FakeClock,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    clocked.configure(create_burst=5, create_rate_per_minute=60)
    client = make_client(clocked)
    for index in range(5):
        client.models.predictions.create(model=FLUX, input={"prompt": f"p{index}"})
    with pytest.raises(ReplicateError) as caught:
        client.models.predictions.create(model=FLUX, input={"prompt": "over"})
    assert caught.value.status == 429
    assert caught.value.detail == "Request was throttled. Your rate limit resets in ~1s."
    raw = post_create(make_http(clocked), {"input": {"prompt": "over"}})
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "1"
    assert raw.json()["retry_after"] == 1

    clock.advance(1.0)  # 60/min refills exactly one token per second
    client.models.predictions.create(model=FLUX, input={"prompt": "refilled"})
    with pytest.raises(ReplicateError):
        client.models.predictions.create(model=FLUX, input={"prompt": "over"})
    stats = clocked.stats(TOKEN)
    assert (stats["creates_accepted"], stats["creates_throttled"]) == (6, 3)
    assert len(clocked.predictions(TOKEN)) == 6


def test_retry_after_is_the_time_to_the_next_token(
    clocked: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    clocked.configure(create_burst=1, create_rate_per_minute=6)  # one token per 10 s
    http = make_http(clocked)
    assert post_create(http, {"input": {"prompt": "x"}}).status_code == 201
    throttled = post_create(http, {"input": {"prompt": "x"}})
    assert throttled.json()["detail"].endswith("resets in ~10s.")
    assert throttled.headers["Retry-After"] == "10"
    assert "ratelimit-remaining" in throttled.headers and "ratelimit-reset" in throttled.headers

    clocked.configure(retry_after_header=False, retry_after_body=False)
    bare = post_create(http, {"input": {"prompt": "x"}})
    assert bare.status_code == 429 and "Retry-After" not in bare.headers
    assert set(bare.json()) == {"detail", "status"}


def test_other_calls_have_their_own_bucket(
    clocked: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    clocked.configure(other_burst=2, other_rate_per_minute=60, create_burst=1)
    http = make_http(clocked)
    assert [http.get("/v1/account").status_code for _ in range(3)] == [200, 200, 429]
    assert post_create(http, {"input": {"prompt": "x"}}).status_code == 201
    stats = clocked.stats(TOKEN)
    assert (stats["other_calls"], stats["other_throttled"]) == (2, 1)
    assert make_http(clocked, OTHER).get("/v1/account").status_code == 200  # per token


def test_rolling_window_maxima_are_exact(
    clocked: Simulator, clock: FakeClock, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(clocked)
    expected = []
    for batch in (3, 3, 2):
        for _ in range(batch):
            assert post_create(http, {"input": {"prompt": "x"}}).status_code == 201
            expected.append(clock())
        clock.advance(30.0)
    assert clocked.create_times(TOKEN) == expected
    # Windows are half-open [t, t + W): the creates at t=0 and t=60 never share one.
    assert clocked.max_creates_in_window(TOKEN, 60) == 6
    assert clocked.max_creates_in_window(TOKEN, 30) == 3
    assert clocked.max_creates_in_window(TOKEN, 60.001) == 8
    assert clocked.max_creates_in_window(TOKEN, 60, since=expected[3]) == 5
    assert clocked.stats(TOKEN)["max_creates_in_60s"] == 6
    assert clocked.max_creates_in_window(OTHER, 60) == 0


def test_inflight_counts_follow_hang_cancel_and_completion(
    clocked: Simulator, clock: FakeClock, make_client: Callable[..., replicate.Client]
) -> None:
    client = make_client(clocked)
    start = clock()
    hung = [client.models.predictions.create(model=FLUX, input={"prompt": "#hang"}) for _ in "abc"]
    clock.advance(100.0)
    assert clocked.stats(TOKEN)["inflight_now"] == 3  # #hang never finishes on its own
    canceled = client.predictions.cancel(hung[0].id)
    assert canceled.status == "canceled" and canceled.output is None
    assert canceled.metrics is not None and canceled.completed_at is not None
    clock.advance(1.0)
    again = client.predictions.cancel(hung[0].id)  # terminal: 200 and unchanged
    assert (again.status, again.completed_at) == ("canceled", canceled.completed_at)
    assert clocked.stats(TOKEN)["inflight_now"] == 2

    mark = clock()
    normal = client.models.predictions.create(model=FLUX, input={"prompt": "ok"})
    assert clocked.max_inflight_at_create(TOKEN, since=mark) == 3
    clock.advance(3.0)
    assert client.predictions.cancel(normal.id).status == "succeeded"
    stats = clocked.stats(TOKEN)
    assert (stats["inflight_now"], stats["inflight_peak"], stats["cancels"]) == (2, 3, 3)
    assert clocked.max_inflight_at_create(TOKEN, since=start) == 3
    assert [p["canceled"] for p in clocked.predictions(TOKEN)] == [True, False, False, False]


def test_concurrent_creates_are_all_counted(
    clocked: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    # The clock stands still: no prediction can end while the others are still being created.
    http = make_http(clocked)
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(lambda i: post_create(http, {"input": {"prompt": f"{i}"}}), range(64))
        )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 64
    stats = clocked.stats(TOKEN)
    assert stats["creates_accepted"] == 64 and stats["inflight_peak"] == 64


# ------------------------------------------------------------------------------------------
# Prompt markers and Prefer: wait


@pytest.mark.parametrize(
    ("marker", "error"),
    [("#fail", ERROR_TRANSIENT), ("#nsfw", ERROR_SENSITIVE), ("#oom", ERROR_OOM)],
)
def test_failure_markers_raise_model_error(
    live: Simulator, make_client: Callable[..., replicate.Client], marker: str, error: str
) -> None:
    with pytest.raises(ModelError) as caught:
        make_client(live).run(FLUX, input={"prompt": f"a cat {marker}"})
    assert str(caught.value) == error
    assert caught.value.prediction.status == "failed"
    assert caught.value.prediction.logs is not None and error in caught.value.prediction.logs


def test_empty_marker_succeeds_with_no_output(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    assert make_client(live).run(FLUX, input={"prompt": "#empty"}) == []
    assert live.predictions()[0]["status"] == "succeeded"


def test_slow_marker_sets_the_run_time(
    clocked: Simulator, clock: FakeClock, make_client: Callable[..., replicate.Client]
) -> None:
    client = make_client(clocked)
    created = client.models.predictions.create(model=FLUX, input={"prompt": "x #slow=10"})
    clock.advance(1.0 + 9.9)
    assert client.predictions.get(created.id).status == "processing"
    clock.advance(0.1)
    assert client.predictions.get(created.id).status == "succeeded"


def test_prefer_wait_window_ends_as_starting_or_as_current(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    client = make_client(live)
    began = time.monotonic()
    held = client.models.predictions.create(model=FLUX, input={"prompt": "#hang"}, wait=1)
    assert time.monotonic() - began < 1.5  # answered before the client's read timeout
    assert held.status == "starting" and held.output is None

    live.configure(prefer_wait_timeout_status="current")
    # Issue #385 reproduced: a "processing" reply makes run() return the empty list at once.
    assert client.run(FLUX, input={"prompt": "#hang"}, wait=1) == []
    assert [e["prefer"] for e in live.requests_log()] == ["wait=1", "wait=1"]


@pytest.mark.parametrize(("header", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("2h", 7200.0), ("1m5s", 65.0),
    ("12", 12.0), ("5", 5.0), (" 7.5s ", 7.5), (None, None),
])
def test_cancel_after_takes_durations_and_bare_seconds(header: str | None,
                                                       seconds: float | None) -> None:
    assert parse_cancel_after(header) == seconds


@pytest.mark.parametrize("header", ["4s", "4", "0", "4.9s", "", "s", "abc", "5x", "-10s",
                                    "1m 5s", "30S", "m5"])
def test_cancel_after_under_5s_or_malformed_is_refused(header: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_cancel_after(header)
    assert caught.value.status == 422
    assert caught.value.body["invalid_fields"][0]["field"] == "Cancel-After"


def _raw(http: httpx.Client, prediction_id: str) -> dict[str, Any]:
    """GET a prediction as JSON (replicate 1.0.7 cannot parse `aborted`)."""
    return dict(http.get(f"/v1/predictions/{prediction_id}").json())


def test_cancel_after_aborts_a_queued_prediction_and_cancels_a_running_one(
    clocked: Simulator, clock: FakeClock, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(clocked)
    clocked.configure(queue_seconds=10.0)
    queued = post_create(http, {"input": {"prompt": "queued"}}, **{"Cancel-After": "5s"})
    assert queued.status_code == 201 and queued.json()["status"] == "starting"
    assert queued.json()["deadline"] == clocked._shared.iso(1005.0)
    clocked.configure(queue_seconds=1.0)
    running = http.post("/v1/deployments/acme/flux-dev/predictions",
                        json={"input": {"prompt": "running #slow=100"}},
                        headers={"Cancel-After": "1m"})
    by_version = http.post("/v1/predictions", headers={"Cancel-After": "6"},
                           json={"version": FLUX_VERSION, "input": {"prompt": "quick"}})
    plain = post_create(http, {"input": {"prompt": "no deadline"}})
    assert "deadline" not in plain.json()

    clock.advance(61.0)
    aborted = _raw(http, queued.json()["id"])
    assert aborted["status"] == "aborted" and "started_at" not in aborted
    assert aborted["metrics"]["predict_time"] == 0.0  # never started: nothing billed
    canceled = _raw(http, running.json()["id"])
    assert canceled["status"] == "canceled" and canceled["metrics"]["predict_time"] == 59.0
    assert _raw(http, by_version.json()["id"])["status"] == "succeeded"  # ended before 6 s
    assert _raw(http, plain.json()["id"])["status"] == "succeeded"
    summaries = {p["input"]["prompt"]: p for p in clocked.predictions(TOKEN)}
    assert [summaries[p]["cancel_after"] for p in ("queued", "running #slow=100", "quick",
                                                  "no deadline")] == [5.0, 60.0, 6.0, None]
    assert summaries["queued"]["billed_seconds"] == 0.0
    assert summaries["queued"]["started_at_clock"] is None
    logged = [e["cancel_after"] for e in clocked.requests_log() if e["method"] == "POST"]
    assert logged == ["5s", "1m", "6", None]


def test_a_bad_cancel_after_is_422_on_every_create_route_and_creates_nothing(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(live)
    routes = [(CREATE_PATH, {"input": {"prompt": "x"}}),
              ("/v1/deployments/acme/flux-dev/predictions", {"input": {"prompt": "x"}}),
              ("/v1/predictions", {"version": FLUX_VERSION, "input": {"prompt": "x"}})]
    for path, body in routes:
        for header in ("4s", "soon"):
            answer = http.post(path, json=body, headers={"Cancel-After": header})
            assert answer.status_code == 422, (path, header)
            assert answer.json()["invalid_fields"][0]["field"] == "Cancel-After"
    assert live.predictions() == []
    assert live.stats(TOKEN)["creates_rejected"] == 6


def test_outputs_expire_after_the_ttl(
    clocked: Simulator,
    clock: FakeClock,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    clocked.configure(output_ttl_seconds=60.0)
    client = make_client(clocked)
    created = client.models.predictions.create(model=FLUX, input={"prompt": "x"})
    clock.advance(3.0)
    output = client.predictions.get(created.id).output
    assert isinstance(output, list) and len(output) == 1
    url = output[0]
    assert make_http(clocked).get(url).status_code == 200
    clock.advance(60.0)
    expired = make_http(clocked).get(f"/v1/predictions/{created.id}").json()
    assert (expired["output"], expired["data_removed"], expired["input"]) == (None, True, {})
    assert make_http(clocked).get(url).status_code == 404


def test_download_knobs(live: Simulator, make_client: Callable[..., replicate.Client]) -> None:
    live.configure(run_seconds=0.0, queue_seconds=0.0, require_auth_for_files=True)
    (url,) = make_client(live).run(FLUX, input={"prompt": "x"})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=auth).status_code == 200
    live.configure(download_failures=2, download_delay_seconds=0.2)
    began = time.monotonic()
    assert [httpx.get(url, headers=auth).status_code for _ in range(3)] == [500, 500, 200]
    assert time.monotonic() - began >= 0.6
    assert live.stats(TOKEN)["downloads"] == 4


# ------------------------------------------------------------------------------------------
# Fault injection


def test_injected_faults_replace_the_next_matching_requests(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    client, http = make_client(live), make_http(live)
    live.inject("POST", r"/predictions$", 500)
    with pytest.raises(ReplicateError) as caught:
        client.models.predictions.create(model=FLUX, input={"prompt": "x"})
    assert (caught.value.status, caught.value.detail) == (500, "Internal server error")
    created = client.models.predictions.create(model=FLUX, input={"prompt": "x"})

    live.inject("POST", r"/predictions$", 429)
    throttled = post_create(http, {"input": {"prompt": "x"}})
    assert throttled.headers["Retry-After"] == "1"
    assert throttled.json() == {
        "detail": "Request was throttled. Your rate limit resets in ~1s.",
        "status": 429,
        "retry_after": 1,
    }
    # The client retries GETs on 503 (Retry-After "0" keeps this test fast).
    live.inject("GET", r"^/v1/predictions/", 503, headers={"Retry-After": "0"}, count=2)
    assert client.predictions.get(created.id).id == created.id
    live.inject("*", r"/v1/account", 502, body="<html>bad gateway</html>")
    gateway = http.get("/v1/account")
    assert gateway.status_code == 502 and gateway.text.startswith("<html>")
    assert http.get("/v1/account").status_code == 200

    assert live.stats(TOKEN)["injected"] == 5
    assert [e["status"] for e in live.requests_log() if e["injected"]] == [500, 429, 503, 503, 502]
    assert live.stats(TOKEN)["creates_accepted"] == 1


# ------------------------------------------------------------------------------------------
# Files, listing, control surface, hygiene


def test_files_api_and_uploaded_inputs(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    client = make_client(live)
    uploaded = client.files.create(io.BytesIO(b"hello"), metadata={"k": "v"})
    assert (uploaded.size, uploaded.metadata) == (5, {"k": "v"})
    assert uploaded.checksums["md5"] == hashlib.md5(b"hello", usedforsecurity=False).hexdigest()
    assert client.files.get(uploaded.id).id == uploaded.id
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert make_http(live).get(f"/v1/files/{uploaded.id}/download").content == b"hello"
    assert make_http(live, OTHER).get(f"/v1/files/{uploaded.id}").status_code == 404
    client.files.delete(uploaded.id)
    with pytest.raises(ReplicateError) as caught:
        client.files.get(uploaded.id)
    assert (caught.value.status, caught.value.detail) == (404, "File not found")

    kontext = "black-forest-labs/flux-kontext-max"
    client.run(kontext, input={"prompt": "x", "input_image": io.BytesIO(b"img")})
    (prediction,) = live.predictions(TOKEN)
    assert prediction["input"]["input_image"].startswith(f"{live.base_url}/v1/files/")


def test_predictions_list_is_paginated_newest_first(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    http = make_http(live)
    ids = [post_create(http, {"input": {"prompt": f"{i}"}}).json()["id"] for i in range(101)]
    client = make_client(live)
    first = client.predictions.list()
    assert [p.id for p in first.results] == ids[::-1][:100]
    assert first.next is not None
    second = client.predictions.list(first.next)
    assert [p.id for p in second.results] == [ids[0]] and second.next is None


def test_http_control_surface(live: Simulator, make_http: Callable[..., httpx.Client]) -> None:
    control, http = make_http(live, None), make_http(live)
    config = control.post("/_sim/config", json={"create_burst": 1, "invalid_tokens": [OTHER]})
    assert config.json()["invalid_tokens"] == [token_hash(OTHER)]  # hashes, never raw tokens
    assert control.post("/_sim/config", json={"nope": 1}).status_code == 400
    assert [post_create(http, {"input": {"prompt": "x"}}).status_code for _ in "ab"] == [201, 429]
    stats = control.get("/_sim/stats", params={"token_hash": token_hash(TOKEN)}).json()
    assert (stats["creates_accepted"], stats["creates_throttled"]) == (1, 1)
    creates = control.get("/_sim/creates", params={"token_hash": token_hash(TOKEN)}).json()
    assert creates["max_creates_in_window"] == 1 and len(creates["create_times"]) == 1
    injected = {"method": "GET", "path_regex": "/v1/account", "status": 500}
    assert control.post("/_sim/inject", json=injected).status_code == 200
    assert http.get("/v1/account").status_code == 500
    listed = control.get("/_sim/predictions", params={"token_hash": token_hash(TOKEN)}).json()
    assert len(listed) == 1 and listed[0]["model"] == FLUX
    assert len(control.get("/_sim/requests").json()) == 3
    assert control.post("/_sim/reset").json() == {"ok": True}
    assert control.get("/_sim/stats").json() == {}
    assert live.config.create_burst == 1  # reset keeps the config


def test_raw_tokens_never_appear_in_introspection(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    live.configure(no_credit_tokens={OTHER})
    make_client(live).run(FLUX, input={"prompt": "x"})
    with pytest.raises(ReplicateError):
        make_client(live, OTHER).run(FLUX, input={"prompt": "x"})
    dumped = json.dumps([live.requests_log(), live.stats(), live.predictions()])
    assert TOKEN not in dumped and OTHER not in dumped
    assert token_hash(TOKEN) in dumped
    assert set(live.stats()) == {token_hash(TOKEN), token_hash(OTHER)}


def test_every_api_response_has_rate_limit_headers_and_error_objects(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(live)
    for response in (
        post_create(http, {"input": {"prompt": "x"}}),
        http.get("/v1/predictions/unknown"),
        http.get("/v1/no-such-route"),
        make_http(live, None).get("/v1/account"),
    ):
        assert "ratelimit-remaining" in response.headers and "ratelimit-reset" in response.headers
        assert isinstance(response.json(), dict)
    missing = http.get("/v1/predictions/unknown")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "The requested resource could not be found.", "status": 404}
    assert missing.headers["Content-Type"] == "application/problem+json"


def test_pure_helpers_and_command_line() -> None:
    assert token_hash("abc") == hashlib.sha256(b"abc").hexdigest()[:16]
    assert parse_prefer_wait("wait") == (60, "wait")
    assert parse_prefer_wait("wait=5") == (5, "wait=5")
    assert parse_prefer_wait("respond-async, wait=100") == (60, "wait=60")
    assert parse_prefer_wait("respond-async") is None and parse_prefer_wait(None) is None
    args = build_arg_parser().parse_args(
        ["--port", "0", "--run-seconds", "2", "--create-rpm", "6", "--create-burst", "1"]
        + ["--run-seconds-spread", "3", "--output-bytes", "1000"]
    )
    config = config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert (config.run_seconds, config.create_rate_per_minute, config.create_burst) == (2.0, 6, 1)
    assert (config.run_seconds_spread, config.output_bytes) == (3.0, 1000)
    assert parse_iso8601("2024-10-04T20:07:33.1+02:00") == parse_iso8601("2024-10-04T18:07:33.1Z")
    assert parse_iso8601("2024-10-04T18:07:33 02:00").utcoffset() == timedelta(hours=2)


# ------------------------------------------------------------------------------------------
# Listing with created_after / created_before, and input retention (issue #9)


def _created_at(http: httpx.Client, prompt: str) -> tuple[str, str]:
    """Create a prediction; return its id and created_at."""
    body = post_create(http, {"input": {"prompt": prompt}}).json()
    return body["id"], body["created_at"]


def _listed_ids(client: replicate.Client, url: str) -> list[str]:
    return [p.id for p in client.predictions.list(url).results]


def test_list_filters_on_created_after_inclusive_and_created_before_exclusive(
    clocked: Simulator,
    clock: FakeClock,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    http, client = make_http(clocked), make_client(clocked)
    created = []
    for prompt in ("a", "b", "c"):
        created.append(_created_at(http, prompt))
        clock.advance(10.0)
    (first, _), (second, at), (third, _) = created
    make_http(clocked, OTHER).post(CREATE_PATH, json={"input": {"prompt": "theirs"}})
    assert _listed_ids(client, f"/v1/predictions?created_after={at}") == [third, second]
    assert _listed_ids(client, f"/v1/predictions?created_before={at}") == [first]
    moment = parse_iso8601(at)
    plus_two = moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    window = {"created_after": plus_two, "created_before": (moment + timedelta(seconds=1))}
    answer = http.get("/v1/predictions", params={k: str(v) for k, v in window.items()}).json()
    assert [p["id"] for p in answer["results"]] == [second]
    # An unescaped "+" arrives as a space; whole seconds and naive (UTC) times work too.
    assert _listed_ids(client, f"/v1/predictions?created_after={plus_two}") == [third, second]
    whole = moment.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%S")
    assert _listed_ids(client, f"/v1/predictions?created_before={whole}") == [first]
    with pytest.raises(ReplicateError) as caught:
        client.predictions.list("/v1/predictions?created_after=yesterday")
    assert caught.value.status == 400
    assert clocked.stats(TOKEN)["lists"] == 5


def test_list_results_have_the_list_shape(
    clocked: Simulator, clock: FakeClock, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(clocked)
    pid, _ = _created_at(http, "a cat")
    clock.advance(3.0)
    (item,) = http.get("/v1/predictions").json()["results"]
    got = http.get(f"/v1/predictions/{pid}").json()
    assert item == {key: value for key, value in got.items() if key != "logs"}  # the doc's shape
    required = {"id", "model", "version", "status", "input", "created_at", "urls", "source"}
    assert required <= set(item) and item["input"] == {"prompt": "a cat"}
    assert (item["status"], item["source"], item["data_removed"]) == ("succeeded", "api", False)
    assert http.get("/v1/predictions", params={"source": "web"}).json()["results"] == []


def test_list_pages_keep_filters_and_do_not_shift_when_creates_arrive(
    clocked: Simulator,
    clock: FakeClock,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    http, client = make_http(clocked), make_client(clocked)
    for index in range(5):
        post_create(http, {"input": {"prompt": f"old {index}"}})
    clock.advance(1.0)
    _, mark = _created_at(http, "new 0")
    with ThreadPoolExecutor(8) as pool:
        bodies = [{"input": {"prompt": f"new {i}"}} for i in range(1, 130)]
        list(pool.map(lambda body: post_create(http, body), bodies))
    first = client.predictions.list(f"/v1/predictions?created_after={mark}")
    assert len(first.results) == 100 and first.previous is None and first.next is not None
    assert first.next.startswith(f"{clocked.base_url}/v1/predictions?")
    assert "created_after=" in first.next and "cursor=" in first.next
    for index in range(3):  # newer predictions do not push page 2 around
        post_create(http, {"input": {"prompt": f"newest {index}"}})
    second = client.predictions.list(first.next)
    assert second.next is None and second.previous is not None
    seen = [p.id for p in first.results] + [p.id for p in second.results]
    assert len(seen) == len(set(seen)) == 130
    assert all(p.input["prompt"].startswith("new ") for p in first.results + second.results)
    back = client.predictions.list(second.previous)
    assert [p.id for p in back.results] == [p.id for p in first.results]
    with pytest.raises(ReplicateError) as caught:
        client.predictions.list("/v1/predictions?cursor=not-ours")
    assert caught.value.status == 400


def test_list_drops_inputs_after_the_retention_but_get_keeps_them(
    clocked: Simulator, clock: FakeClock, make_http: Callable[..., httpx.Client]
) -> None:
    clocked.configure(input_retention_seconds=60.0)
    http = make_http(clocked)
    pid, _ = _created_at(http, "a cat")
    clock.advance(59.5)
    assert http.get("/v1/predictions").json()["results"][0]["input"] == {"prompt": "a cat"}
    clock.advance(0.5)
    (item,) = http.get("/v1/predictions").json()["results"]
    assert (item["id"], item["input"], item["status"]) == (pid, {}, "succeeded")
    assert http.get(f"/v1/predictions/{pid}").json()["input"] == {"prompt": "a cat"}


# ------------------------------------------------------------------------------------------
# Run times that vary per prompt


def test_run_seconds_for_is_a_pure_function_of_prompt_and_seed() -> None:
    config = SimConfig(run_seconds=1.0, run_seconds_spread=4.0)
    times = [run_seconds_for(f"prompt {i}", config) for i in range(200)]
    assert all(1.0 <= t < 5.0 for t in times) and max(times) - min(times) > 3.0
    assert run_seconds_for("prompt 1", config) == times[1]
    assert run_seconds_for("x", config, seed=1) != run_seconds_for("x", config, seed=2)
    assert run_seconds_for("x #slow=7", config) == 7.0
    assert run_seconds_for("x #hang", config) == math.inf
    assert run_seconds_for("x #hang@qwen-image", config, model=FLUX) < 5.0
    assert run_seconds_for("x #hang@qwen-image", config, model="qwen/qwen-image") == math.inf
    assert run_seconds_for("prompt 1", SimConfig(run_seconds=1.0)) == 1.0


def test_predictions_run_for_their_computed_time(
    clocked: Simulator, clock: FakeClock, make_client: Callable[..., replicate.Client]
) -> None:
    clocked.configure(run_seconds_spread=10.0)
    client = make_client(clocked)
    inputs = [{"prompt": "a"}, {"prompt": "b", "seed": 3}]
    created = [client.models.predictions.create(model=FLUX, input=inp) for inp in inputs]
    expected = [run_seconds_for(i["prompt"], clocked.config, seed=i.get("seed")) for i in inputs]
    assert expected[0] != expected[1]
    for pred, run in sorted(zip(created, expected, strict=True), key=lambda pair: pair[1]):
        clock.t = 1000.0 + 1.0 + run - 0.001  # queue_seconds is 1.0
        assert client.predictions.get(pred.id).status == "processing"
        clock.t = 1000.0 + 1.0 + run
        done = client.predictions.get(pred.id)
        assert done.status == "succeeded" and done.metrics is not None
        assert done.metrics["predict_time"] == round(run, 6)


# ------------------------------------------------------------------------------------------
# Creates that lose their answer (issue #9)


def test_dropped_502_and_garbage_creates_still_create_exactly_once(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    client = make_client(live)
    live.inject_create_fault("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        client.models.predictions.create(model=FLUX, input={"prompt": "dropped"})
    live.inject_create_fault("502")
    with pytest.raises(ReplicateError) as gateway:
        client.predictions.create(version=FLUX_VERSION, input={"prompt": "gateway"})
    assert gateway.value.status == 502 and gateway.value.detail is None
    live.inject_create_fault("garbage")
    with pytest.raises(json.JSONDecodeError):  # default: the real answer, cut in half
        client.deployments.predictions.create("acme/flux-dev", input={"prompt": "cut"})
    http = make_http(live)
    live.inject_create_fault("garbage", body="<html>not json</html>")
    html = post_create(http, {"input": {"prompt": "html"}})
    assert (html.status_code, html.headers["Content-Type"]) == (201, "text/html; charset=utf-8")
    live.inject_create_fault("garbage", body="[1,2]")
    assert post_create(http, {"input": {"prompt": "list"}}).json() == [1, 2]
    assert post_create(http, {"input": {"prompt": "fine"}}).json()["status"] == "starting"

    names = ("dropped", "gateway", "cut", "html", "list", "fine")
    assert live.creates_by_prompt(TOKEN) == dict.fromkeys(names, 1)
    listed = {p.input["prompt"]: p.id for p in client.predictions.list().results}
    assert set(listed) == set(names)
    assert client.predictions.get(listed["dropped"]).id == listed["dropped"]
    stats = live.stats(TOKEN)
    assert (stats["creates_accepted"], stats["create_faults"], stats["injected"]) == (6, 5, 0)
    faults = [(e["status"], e["create_fault"]) for e in live.requests_log() if e["create_fault"]]
    assert faults == [(444, "drop"), (502, "502")] + [(201, "garbage")] * 3
    assert live.creates_by_input(TOKEN)['{"prompt": "fine"}'] == 1


def test_garbage_bodies_and_the_502_page_are_what_clients_choke_on(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    http = make_http(live)
    live.inject_create_fault("502")
    gateway = post_create(http, {"input": {"prompt": "x"}})
    assert gateway.text == CLOUDFLARE_502_HTML and "cloudflare" in gateway.text
    live.inject_create_fault("garbage")
    truncated = post_create(http, {"input": {"prompt": "x"}}).text
    assert truncated.startswith('{"id":"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated)
    with pytest.raises(ValueError, match="unknown create fault"):
        live.inject_create_fault("explode")


def test_create_faults_can_aim_at_one_token_and_be_set_over_http(
    live: Simulator,
    make_client: Callable[..., replicate.Client],
    make_http: Callable[..., httpx.Client],
) -> None:
    control = make_http(live, None)
    spec = {"kind": "502", "count": 2, "token_hash": token_hash(OTHER)}
    assert control.post("/_sim/create_fault", json=spec).json() == {"ok": True}
    assert control.post("/_sim/create_fault", json={"kind": "nope"}).status_code == 400
    assert post_create(make_http(live), {"input": {"prompt": "mine"}}).status_code == 201
    theirs = make_http(live, OTHER)
    codes = [post_create(theirs, {"input": {"prompt": "theirs"}}).status_code for _ in "abc"]
    assert codes == [502, 502, 201]
    creates = control.get("/_sim/creates", params={"token_hash": token_hash(OTHER)}).json()
    assert creates["by_prompt"] == {"theirs": 3}
    assert live.creates_by_prompt(TOKEN) == {"mine": 1}


def test_held_create_times_the_client_out_after_the_prediction_exists(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    live.inject_create_fault("hold")  # 65 s: past the 1.5 s read timeout of wait=1
    client = make_client(live)
    began = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.models.predictions.create(model=FLUX, input={"prompt": "held"}, wait=1)
    assert 1.4 < time.monotonic() - began < 3.0
    (listed,) = client.predictions.list().results
    assert listed.input == {"prompt": "held"}
    assert client.predictions.get(listed.id).status == "succeeded"  # it ran normally
    assert live.creates_by_prompt(TOKEN) == {"held": 1}
    began = time.monotonic()
    live.reset()  # ends the hold at once, so stop() leaves no thread behind
    assert time.monotonic() - began < 1.0


_KILLED_CLIENT = """
import socket, sys, time
body = b'{"input":{"prompt":"orphan #slow=0.4"}}'
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.sendall(
    b"POST /v1/models/black-forest-labs/flux-dev/predictions HTTP/1.1\\r\\n"
    b"Host: sim\\r\\nAuthorization: Bearer " + sys.argv[2].encode() + b"\\r\\n"
    b"Prefer: wait=5\\r\\nContent-Type: application/json\\r\\n"
    b"Content-Length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body
)
time.sleep(60)
"""


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_a_held_create_whose_client_is_killed_still_runs(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    port = live.base_url.rsplit(":", 1)[1]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, port, TOKEN])
    try:
        _wait_for(lambda: len(live.predictions(TOKEN)) == 1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    _wait_for(lambda: live.predictions(TOKEN)[0]["status"] == "succeeded")
    _wait_for(lambda: len(live.requests_log()) == 1)  # the hold ended; the write failed quietly
    assert live.creates_by_prompt(TOKEN) == {"orphan #slow=0.4": 1}
    assert make_http(live).get("/v1/predictions").json()["results"][0]["status"] == "succeeded"


# ------------------------------------------------------------------------------------------
# Prefer: wait timing


def _timed_create(http: httpx.Client, prompt: str, prefer: str) -> tuple[float, dict[str, Any]]:
    """Create with a Prefer header; return when the answer arrived (clock) and its body."""
    answer = post_create(http, {"input": {"prompt": prompt}}, Prefer=prefer)
    return time.monotonic(), answer.json()


def test_prefer_wait_answers_as_soon_as_the_prediction_finishes(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    live.configure(run_seconds=0.3, queue_seconds=0.02)
    http = make_http(live)
    answered, body = _timed_create(http, "x", "wait=5")
    assert body["status"] == "succeeded"
    finished = live.predictions(TOKEN)[0]["completed_at_clock"]  # the live clock is monotonic
    # Woken at the known finish time, not at the end of its 5 s window (slack for a busy CPU).
    assert 0 <= answered - finished < 0.5

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_timed_create, http, "#hang", "wait=5")
        _wait_for(lambda: len(live.predictions(TOKEN)) == 2)
        time.sleep(0.1)
        canceled_at = time.monotonic()
        http.post(f"/v1/predictions/{live.predictions(TOKEN)[1]['id']}/cancel")
        answered, body = held.result()
    assert body["status"] == "canceled" and answered - canceled_at < 0.5  # the cancel woke it


def test_prefer_wait_ends_within_its_window(
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    began = time.monotonic()
    answered, body = _timed_create(make_http(live), "#hang", "wait=1")
    assert body["status"] == "starting"
    assert 0.7 <= answered - began < 1.5  # before the client's read timeout of N + 0.5 s


def test_prefer_wait_on_a_fake_clock_follows_the_clock(
    clocked: Simulator, clock: FakeClock, make_http: Callable[..., httpx.Client]
) -> None:
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_timed_create, make_http(clocked), "x", "wait=5")
        _wait_for(lambda: len(clocked.predictions(TOKEN)) == 1)
        time.sleep(0.05)
        assert not held.done()
        moved_at = time.monotonic()
        clock.advance(3.0)
        clocked.wake_waiters()
        answered, body = held.result()
    assert body["status"] == "succeeded" and answered - moved_at < 0.5  # not its 5 s window


# ------------------------------------------------------------------------------------------
# Big outputs


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "mp4", "wav"])
def test_padded_outputs_stay_valid_files(ext: str) -> None:
    for size in (5_000, 200_001):
        data = output_bytes(ext, "p1/0", size)
        assert size - 4 <= len(data) <= size
        assert_real_file(ext, data, padded=True)
    assert output_bytes(ext, "p1/0", 10) == output_bytes(ext, "p1/0")


def test_output_bytes_knob_serves_big_files_that_stream(
    live: Simulator, make_client: Callable[..., replicate.Client]
) -> None:
    live.configure(run_seconds=0.0, queue_seconds=0.0, output_bytes=3_000_000)
    (url,) = make_client(live).run(FLUX, input={"prompt": "x", "output_format": "png"})
    chunks = []
    with httpx.stream("GET", url, timeout=10) as response:
        chunks = list(response.iter_bytes())
    data = b"".join(chunks)
    assert len(chunks) > 1 and 3_000_000 - 4 <= len(data) <= 3_000_000
    assert_real_file("png", data, padded=True)


@pytest.mark.parametrize(("ratio", "size"), [("16:9", (256, 144)), ("9:16", (144, 256)),
                                             ("1:1", (256, 256)), (None, (256, 256)),
                                             ("21:9", (256, 110)), ("nonsense", (256, 256))])
def test_demo_pictures_have_the_requested_shape_in_every_format(
        ratio: str | None, size: tuple[int, int]) -> None:
    assert pictures.size_for(ratio) == size
    width, height = size
    png = pictures.picture("png", "a red fox", ratio)
    assert png is not None and struct.unpack(">II", _png_chunks(png)[b"IHDR"][:8]) == size
    jpeg = pictures.picture("jpg", "a red fox", ratio)
    assert jpeg is not None
    sof = jpeg.index(b"\xff\xc0")
    assert struct.unpack(">HH", jpeg[sof + 5 : sof + 9]) == (height, width)
    webp = pictures.picture("webp", "a red fox", ratio)
    assert webp is not None
    bits = int.from_bytes(webp[21:25], "little")
    assert ((bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1) == size
    for ext, data in (("png", png), ("jpg", jpeg), ("webp", webp)):
        assert_real_file(ext, data)


def test_demo_pictures_differ_by_prompt_and_are_served_for_predictions(sim: Simulator) -> None:
    assert pictures.colour_of("a red fox") != pictures.colour_of("a blue whale")
    assert pictures.picture("png", "a red fox", "1:1") != pictures.picture("png", "x", "1:1")
    assert pictures.picture("mp4", "a red fox", "1:1") is None  # not an image: the usual file
    client = replicate.Client(api_token="r8_pictures", base_url=sim.base_url)
    prediction = client.models.predictions.create(
        model="black-forest-labs/flux-dev",
        input={"prompt": "a red fox", "aspect_ratio": "16:9", "output_format": "png"}, wait=5)
    (url,) = prediction.output
    served = httpx.get(url, timeout=10).content
    assert served == pictures.picture("png", "a red fox", "16:9")


def test_demo_videos_are_playable_mp4_clips_in_the_requested_shape(sim: Simulator) -> None:
    client = replicate.Client(api_token="r8_videos", base_url=sim.base_url)
    prediction = client.models.predictions.create(
        model="google/veo-3-fast", input={"prompt": "a red fox runs", "aspect_ratio": "16:9"},
        wait=5)
    served = httpx.get(str(prediction.output), timeout=10).content
    assert served == video.mp4("a red fox runs", "16:9")
    assert _mp4_boxes(served) == [b"ftyp", b"moov", b"mdat"]
    for box in (b"avc1", b"avcC", b"stsz", b"stco"):
        assert box in served  # one H.264 track a browser can play
    tkhd = served.index(b"tkhd")
    width, height = struct.unpack(">II", served[tkhd + 80 : tkhd + 88])
    assert (width >> 16, height >> 16) == (96, 48)
    stco = served.index(b"stco")
    (offset,) = struct.unpack(">I", served[stco + 12 : stco + 16])
    assert served[offset + 4] == 0x65  # the sample is the IDR slice the chunk offset points at
