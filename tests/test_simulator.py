"""The Replicate simulator, driven by the real replicate 1.0.7 client (and raw httpx where the
client hides what a test needs: headers, exact bodies, GETs the client would retry)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import wave
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput

from replicate_generation.devtools.simulator import (
    ERROR_OOM,
    ERROR_SENSITIVE,
    ERROR_TRANSIENT,
    MODELS,
    SimConfig,
    Simulator,
    build_arg_parser,
    config_from_args,
    output_bytes,
    parse_prefer_wait,
    token_hash,
)

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


def assert_real_file(ext: str, data: bytes) -> None:
    """Check the container structure of each output format."""
    if ext == "png":
        chunks = _png_chunks(data)
        assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (1, 1)
        assert len(zlib.decompress(chunks[b"IDAT"])) == 4  # filter byte + one RGB pixel
    elif ext == "jpg":
        assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"
        assert b"JFIF\x00" in data[:20] and b"\xff\xc0" in data  # baseline SOF0
    elif ext == "webp":
        assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8L"
        assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
        assert data[20] == 0x2F  # VP8L signature
    elif ext == "mp4":
        assert data[4:8] == b"ftyp"
    else:
        with wave.open(io.BytesIO(data)) as audio:
            assert audio.getnchannels() == 1 and audio.getnframes() > 0
    assert 0 < len(data) < 4096  # tiny: tests and benchmarks download thousands


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
    live: Simulator, make_http: Callable[..., httpx.Client]
) -> None:
    live.configure(run_seconds=1.0)
    http = make_http(live)
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(lambda i: post_create(http, {"input": {"prompt": f"{i}"}}), range(64))
        )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 64
    stats = live.stats(TOKEN)
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
    assert time.monotonic() - began < 1.0  # answered before the client's read timeout
    assert held.status == "starting" and held.output is None

    live.configure(prefer_wait_timeout_status="current")
    # Issue #385 reproduced: a "processing" reply makes run() return the empty list at once.
    assert client.run(FLUX, input={"prompt": "#hang"}, wait=1) == []
    assert [e["prefer"] for e in live.requests_log()] == ["wait=1", "wait=1"]


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
    )
    config = config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert (config.run_seconds, config.create_rate_per_minute, config.create_burst) == (2.0, 6, 1)
