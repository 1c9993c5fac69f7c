"""The egress policy over HTTP (issue #20, findings 1, 3 and 4): a community model's outputs that
point inside the network, redirect there, drip, multiply, grow or inflate, served by the
simulator's prompt markers; each refused or bounded, the prediction id kept, saved files
reported."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import WSGIRequestHandler, make_server

from conftest import OTHER, OTHER_TOKEN, USER, USER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator, schema_models
from replicate_generation.egress import EgressPolicy
from replicate_generation.errors import SettingsError
from replicate_generation.models.schemas import ModelPolicy
from replicate_generation.outputs import DownloadError, save_outputs
from replicate_generation.settings import Settings
from servers import wait_for
from test_jobs import submit_async, wait_terminal

SCHNELL = schema_models.FLUX_SCHNELL
SECRET = b"internal-only: the metadata service's credentials"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
# Bounds small enough to reach in a test; each test names the one it is about.
FAST = {"model_policy": ModelPolicy("any"), "egress_stall_seconds": 0.5,
        "egress_min_bytes_per_second": 1000}


# --------------------------------------------------------------------------- an internal page


@dataclass
class Internal:
    """A page only this machine should read, and a redirect loop; counts every request."""

    url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    hosts: list[str] = field(default_factory=list)  # each request's Host header
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            self.hits[path] += 1
            self.hosts.append(environ.get("HTTP_HOST", ""))
        if path == "/loop":
            start_response("302 Found", [("Location", "/loop"), ("Content-Length", "0")])
            return [b""]
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(SECRET)))])
        return [SECRET]

    def seen(self) -> int:
        with self.lock:
            return sum(self.hits.values())


class _Quiet(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        """Keep test output clean."""


@pytest.fixture
def internal() -> Iterator[Internal]:
    page = Internal()
    server = make_server("127.0.0.1", 0, page, threaded=True, request_handler=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    page.url = f"http://127.0.0.1:{server.server_port}"
    yield page
    server.shutdown()
    server.server_close()
    thread.join(5)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def service(make_app: Callable[..., Flask]) -> Callable[..., FlaskClient]:
    def build(**overrides: Any) -> FlaskClient:
        return make_app(**{**FAST, **overrides}).test_client()
    return build


def generate(client: FlaskClient, prompt: str,
             headers: dict[str, str] = USER) -> tuple[int, dict[str, Any]]:
    response = client.post("/generate", json={"model_name": SCHNELL, "prompt": prompt},
                           headers=headers)
    return response.status_code, response.get_json()


def downloads_seen(sim: Simulator) -> list[tuple[str, int]]:
    """(path, status) of every output-file request the simulator answered, in order."""
    return [(e["path"], e["status"]) for e in sim.requests_log()
            if e["path"].startswith("/_sim/outputs/")]


def only_prediction(sim: Simulator, token: str = USER_TOKEN) -> dict[str, Any]:
    [prediction] = sim.predictions(token)
    assert prediction["status"] == "succeeded"  # paid for: its id must be kept
    return prediction


def assert_refused(status: int, body: dict[str, Any], prediction: dict[str, Any],
                   reason: str) -> None:
    assert status == 502, body
    assert body["error_type"] == "output_refused", body
    assert body["prediction_id"] == prediction["id"]
    assert reason in body["error"], body["error"]


def on_disk(root: Path) -> list[Path]:
    """Every file under the output root, temp files included."""
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- finding 1: SSRF


def test_an_output_pointing_inside_the_network_is_never_fetched(
        service: Callable[..., FlaskClient], sim: Simulator, internal: Internal,
        tmp_path: Path) -> None:
    status, body = generate(service(), f"a fox #output_url={internal.url}/secret")
    assert_refused(status, body, only_prediction(sim), "non-public address")
    assert internal.seen() == 0
    assert body["files"] == []
    assert not any(SECRET in p.read_bytes() for p in on_disk(tmp_path / "output"))


def test_the_same_output_is_read_when_the_operator_allows_that_range(
        service: Callable[..., FlaskClient], sim: Simulator, internal: Internal) -> None:
    # The finding as reported: without the policy the page is fetched and served back.
    client = service(egress_allow_private=LOOPBACK)
    status, body = generate(client, f"a fox #output_url={internal.url}/secret")
    assert status == 200, body
    assert internal.hits["/secret"] == 1
    served = client.get(body["urls"][0], headers=USER)
    assert served.data == SECRET
    served.close()


def test_a_redirect_into_the_network_is_refused_before_it_is_followed(
        service: Callable[..., FlaskClient], sim: Simulator, internal: Internal) -> None:
    status, body = generate(service(), f"a fox #redirect_to={internal.url}/secret")
    prediction = only_prediction(sim)
    assert_refused(status, body, prediction, "redirect 1 points to a non-public address")
    assert downloads_seen(sim) == [(f"/_sim/outputs/{prediction['id']}/0.webp", 302)]
    assert internal.seen() == 0


def test_a_host_name_resolving_inside_the_network_is_refused(
        service: Callable[..., FlaskClient], sim: Simulator, internal: Internal) -> None:
    port = internal.url.rsplit(":", 1)[1]
    status, body = generate(service(), f"a fox #output_url=http://localhost:{port}/secret")
    assert_refused(status, body, only_prediction(sim), "resolves to a non-public address")
    assert internal.seen() == 0


def test_redirects_are_followed_only_up_to_the_bound(
        service: Callable[..., FlaskClient], sim: Simulator, internal: Internal) -> None:
    client = service(egress_allow_private=LOOPBACK, egress_max_redirects=3)
    status, body = generate(client, f"a fox #redirect_to={internal.url}/loop")
    assert_refused(status, body, only_prediction(sim), "redirected more than 3 times")
    assert len(downloads_seen(sim)) == 1  # the simulator's 302, then the loop's hops
    assert internal.hits == Counter({"/loop": 3})


def test_an_output_is_fetched_from_the_address_that_was_checked(
        internal: Internal, tmp_path: Path) -> None:
    # outputs.invalid never resolves in DNS: the file can only arrive through the pinned address.
    resolved: list[str] = []

    def resolve(host: str, _port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    port = internal.url.rsplit(":", 1)[1]
    url = f"http://outputs.invalid:{port}/secret"
    root = tmp_path / "out"
    with pytest.raises(DownloadError, match="resolves to a non-public address") as refused:
        save_outputs([url], root / "r", "x", root=root, deadline=time.time() + 10,
                     policy=EgressPolicy(resolve=resolve))
    assert refused.value.refused and internal.seen() == 0
    [saved] = save_outputs([url], root / "r", "x", root=root, deadline=time.time() + 10,
                           policy=EgressPolicy(allow_private=LOOPBACK, resolve=resolve))
    assert saved.path.read_bytes() == SECRET
    assert resolved == ["outputs.invalid"] * 2
    assert internal.hosts == [f"outputs.invalid:{port}"]


# --------------------------------------------------------------------------- finding 4: slow drips


def test_a_slow_drip_is_cut_at_the_minimum_rate(
        service: Callable[..., FlaskClient], sim: Simulator) -> None:
    started = time.monotonic()
    status, body = generate(service(), "a fox #drip=50 #size=20000")  # 400 s at 50 B/s
    assert_refused(status, body, only_prediction(sim), "slower than 1000 bytes/s")
    assert time.monotonic() - started < 10
    assert len(downloads_seen(sim)) == 1  # refused, not retried


def test_a_body_that_stalls_for_a_whole_window_is_refused_as_too_slow_not_retried(
        service: Callable[..., FlaskClient], sim: Simulator) -> None:
    # One byte a second: the 0.5 s read timeout (the stall window) fires between bytes.
    status, body = generate(service(), "a fox #drip=1 #size=2000")
    assert_refused(status, body, only_prediction(sim), "slower than 1000 bytes/s")
    assert len(downloads_seen(sim)) == 1


def test_a_drip_above_the_rate_is_cut_at_the_download_deadline(
        service: Callable[..., FlaskClient], sim: Simulator) -> None:
    started = time.monotonic()
    client = service(egress_download_seconds=1.5, egress_min_bytes_per_second=100)
    status, body = generate(client, "a fox #drip=4000 #size=400000")  # 100 s at 4,000 B/s
    assert_refused(status, body, only_prediction(sim), "did not finish before the deadline")
    assert time.monotonic() - started < 10


def test_a_dripping_account_gives_the_runner_threads_back(
        service: Callable[..., FlaskClient], sim: Simulator) -> None:
    # Two runner threads, both taken by one account's dripping outputs (minutes each).
    client = service(dispatch_threads=2)
    prompts = ["a #drip=20 #size=20000", "b #drip=20 #size=20000"]  # 1,000 s each
    dripping = submit_async(client, {"model_name": SCHNELL, "prompts": prompts}, USER)
    wait_for(lambda: len(downloads_seen(sim)) == 2, 10, "both drips to start")
    other = submit_async(client, {"model_name": SCHNELL, "prompts": ["a quiet fox"]}, OTHER)
    done = wait_terminal(client, other["id"], OTHER, timeout=15)
    assert done["state"] == "succeeded", done
    assert [p["status"] for p in sim.predictions(OTHER_TOKEN)] == ["succeeded"]
    hostile = wait_terminal(client, dripping["id"], USER, timeout=15)
    assert [i["error_type"] for i in hostile["items"]] == ["output_refused"] * 2


def test_accounts_take_turns_for_runner_threads(
        held_sim: tuple[Simulator, HeldClock], make_app: Callable[..., Flask]) -> None:
    # Two threads held by one account's 4-item batch; the simulator's clock decides who ends.
    sim, clock = held_sim
    client = make_app(**FAST, dispatch_threads=2, replicate_base_url=sim.base_url,
                      sync_wait_seconds=0, poll_interval_seconds=0.05).test_client()
    prompts = ["u1 #slow=1", "u2 #slow=1000", "u3 #slow=1", "u4 #slow=1"]
    batch = submit_async(client, {"model_name": SCHNELL, "prompts": prompts}, USER)
    wait_for(lambda: len(sim.predictions(USER_TOKEN)) == 2, 10, "u1 and u2 to be created")
    other = submit_async(client, {"model_name": SCHNELL, "prompts": ["o1 #slow=1"]}, OTHER)
    clock.advance(2)  # u1 ends; u2 holds its thread for the rest of the test
    sim.wake_waiters()
    wait_for(lambda: len(sim.predictions(USER_TOKEN) + sim.predictions(OTHER_TOKEN)) == 3, 10,
             "a third create")
    # The thread u1 gave back goes to the other account, not to u3 behind it in the same batch.
    assert len(sim.predictions(OTHER_TOKEN)) == 1
    clock.release()
    sim.wake_waiters()
    assert wait_terminal(client, other["id"], OTHER, timeout=15)["state"] == "succeeded"
    assert client.post(f"/jobs/{batch['id']}/cancel", headers=USER).status_code == 200
    assert wait_terminal(client, batch["id"], USER, timeout=15)["state"] == "canceled"


# --------------------------------------------------------------------------- finding 3: bounds


def test_a_prediction_with_thousands_of_outputs_saves_only_the_bound(
        service: Callable[..., FlaskClient], sim: Simulator, tmp_path: Path) -> None:
    status, body = generate(service(output_max_files_per_prediction=5), "a fox #outputs=3000")
    prediction = only_prediction(sim)
    assert_refused(status, body, prediction, "more than 5 files for one prediction")
    assert "2994 later output(s) were not fetched" in body["error"]
    assert len(body["files"]) == 5 and body["count"] == 5
    assert len(downloads_seen(sim)) == 5
    assert sim.stats(USER_TOKEN)["downloads"] == 5
    assert len(on_disk(tmp_path / "output")) == 5


def test_a_prediction_s_bytes_are_bounded_in_total(
        service: Callable[..., FlaskClient], sim: Simulator, tmp_path: Path) -> None:
    client = service(output_max_bytes_per_prediction=1_000_000)
    status, body = generate(client, "a fox #outputs=4 #size=400000")
    assert_refused(status, body, only_prediction(sim), "more than 1000000 bytes for one prediction")
    assert len(body["files"]) == 2  # the third would pass the bound: it is not kept
    files = on_disk(tmp_path / "output")
    assert [p.name for p in files] == ["flux_schnell_1.webp", "flux_schnell_2.webp"]
    assert sum(p.stat().st_size for p in files) <= 1_000_000
    assert len(downloads_seen(sim)) == 3  # the fourth is never fetched


def test_a_gzip_bomb_is_refused_by_its_ratio(
        service: Callable[..., FlaskClient], sim: Simulator, tmp_path: Path) -> None:
    status, body = generate(service(), "a fox #gzip_bomb=100000000")  # 100 MB from ~100 kB
    assert_refused(status, body, only_prediction(sim), "inflates more than 100 times")
    assert on_disk(tmp_path / "output") == []


def test_inflated_bytes_count_against_the_file_cap(
        service: Callable[..., FlaskClient], sim: Simulator, tmp_path: Path) -> None:
    # Ratio check off: the cap still counts what the body inflates to, not what it weighed.
    client = service(egress_max_decompression_ratio=1e6, output_max_file_bytes=5_000_000)
    status, body = generate(client, "a fox #gzip_bomb=100000000")
    assert_refused(status, body, only_prediction(sim), "larger than the 5000000-byte limit")
    assert on_disk(tmp_path / "output") == []


def test_a_job_s_files_are_bounded_across_its_items(
        service: Callable[..., FlaskClient], sim: Simulator, tmp_path: Path) -> None:
    client = service(output_max_files_per_job=3, concurrent_limit=1)
    job = submit_async(client, {"model_name": SCHNELL,
                                "prompts": ["a #outputs=2", "b #outputs=2"]}, USER)
    done = wait_terminal(client, job["id"], USER)
    first, second = done["items"]
    assert (first["state"], first["count"]) == ("succeeded", 2)
    assert (second["error_type"], second["count"]) == ("output_refused", 1), second
    assert "more than 3 files for one job" in second["error"]
    assert second["prediction_id"] == sim.predictions(USER_TOKEN)[1]["id"]
    assert len(on_disk(tmp_path / "output")) == 3


# --------------------------------------------------------------------------- webhooks, settings


def test_user_webhooks_reach_a_private_range_only_when_the_operator_allows_it(
        service: Callable[..., FlaskClient], sim: Simulator) -> None:
    body = {"model_name": SCHNELL, "prompts": ["a fox"], "webhook": "https://127.0.0.1:9/hook"}
    headers = {**USER, "Prefer": "respond-async"}
    refused = service(webhook_signing_key="k" * 32).post("/generate-batch", json=body,
                                                         headers=headers)
    assert refused.status_code == 400, refused.get_json()
    assert refused.get_json()["field"] == "webhook"
    allowed = service(webhook_signing_key="k" * 32, egress_allow_private=LOOPBACK).post(
        "/generate-batch", json=body, headers=headers)
    assert allowed.status_code == 202, allowed.get_json()


def test_egress_settings_are_read_and_checked() -> None:
    settings = Settings.from_env({"EGRESS_ALLOW_PRIVATE": "10.0.0.0/8, fd00::/8",
                                  "OUTPUT_MAX_FILES_PER_PREDICTION": "7"})
    assert settings.egress_allow_private == (ipaddress.ip_network("10.0.0.0/8"),
                                             ipaddress.ip_network("fd00::/8"))
    assert settings.output_max_files_per_prediction == 7
    with pytest.raises(SettingsError, match="EGRESS_ALLOW_PRIVATE"):
        Settings.from_env({"EGRESS_ALLOW_PRIVATE": "10.0.0.0/33"})
