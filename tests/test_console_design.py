"""The console as a user meets it, in Debian's Chromium at a laptop's and a phone's size: live
progress from the event stream (no polling request once a page has loaded), the gallery's
placeholders, lightbox, zip, cancel and retry, the usage and keys pages; no page scrolls sideways
and axe-core finds no serious or critical violation on any of them. Screenshots of every page are
kept under the test's tmp dir when a test fails, or always with KEEP_SCREENSHOTS=1 (the path is
printed)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient

from conftest import ADMIN_KEY, USER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn
from test_console import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Watch,
    _chromium_or_skip,
    _only_local,
    _sign_in,
)

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

AXE = Path(__file__).resolve().parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"
VIEWPORTS = {"laptop": {"width": 1366, "height": 900}, "phone": {"width": 390, "height": 844}}
SMALLEST = 360
# Three items that end one after another: progress is seen arriving, not only its end.
PACED = [("dawn", "a lighthouse at dawn #slow=1"), ("noon", "a harbour at noon #slow=2.5"),
         ("dusk", "a pier at dusk #slow=4")]


class Shots:
    """Each page's screenshot, taken as the test goes; kept only when the test fails."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken: list[Path] = []

    def take(self, page: Any, name: str) -> None:
        path = self.folder / f"{len(self.taken):02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)


@pytest.fixture
def served(make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
           sim: Simulator) -> Gunicorn:
    """The service in two gunicorn workers: pages and streams may land on either."""
    return start_gunicorn(make_settings(), workers=2, SESSION_SECRET="console-test-secret")


@pytest.fixture(params=sorted(VIEWPORTS))
def phone_or_laptop(request: pytest.FixtureRequest, tmp_path: Path, served: Gunicorn
                    ) -> Iterator[tuple[Any, Any, Watch, Shots]]:
    """A browser at the viewport; closed (and the failure shot taken) before `served` stops."""
    with _browser(VIEWPORTS[request.param], tmp_path, request) as opened:
        yield opened


@pytest.fixture
def laptop(request: pytest.FixtureRequest, tmp_path: Path, served: Gunicorn
           ) -> Iterator[tuple[Any, Any, Watch, Shots]]:
    with _browser(VIEWPORTS["laptop"], tmp_path, request) as opened:
        yield opened


@contextmanager
def _browser(viewport: dict[str, int], tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[tuple[Any, Any, Watch, Shots]]:
    _chromium_or_skip()
    if not AXE.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{AXE} is missing under CI (.ci/run runs npm ci in tests/browser)")
        pytest.skip("axe-core is not installed (npm ci --prefix tests/browser)")
    watch = Watch()
    shots = Shots(tmp_path / "screenshots")
    shots.folder.mkdir()
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport=viewport)
        context.route("**/*", lambda route: _only_local(route, watch))
        page = context.new_page()
        page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
        failed_before = request.session.testsfailed
        yield context, page, watch, shots
        if request.session.testsfailed > failed_before or os.environ.get("KEEP_SCREENSHOTS"):
            shots.take(page, "at-end")
            print(f"\nscreenshots kept in {shots.folder}")
        else:
            for path in shots.taken:
                path.unlink()
        context.close()
        browser.close()


def _check_page(page: Any, shots: Shots, name: str) -> None:
    """No sideways scrolling, and no serious or critical axe-core violation."""
    shots.take(page, name)
    size = page.viewport_size
    widths = [size["width"], SMALLEST] if size["width"] < VIEWPORTS["laptop"]["width"] else [
        size["width"]]
    for width in widths:  # a phone's page is also laid out at the narrowest width served
        page.set_viewport_size({"width": width, "height": size["height"]})
        overflow = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
        assert overflow[0] <= overflow[1], f"{name}: {overflow[0]} px wide in {overflow[1]} px"
    page.set_viewport_size(size)
    page.evaluate(AXE.read_text())  # evaluated, not a <script>: the page's CSP stays strict
    violations = page.evaluate("""async () =>
        (await axe.run(document, {resultTypes: ["violations"]})).violations
        .filter((v) => ["serious", "critical"].includes(v.impact))
        .map((v) => v.id + ": " + v.nodes.map((n) => n.target.join(" ")).join(", "))""")
    assert not violations, f"{name}: {violations}"


def _submit(page: Any, rows: list[tuple[str, str]]) -> str:
    """Submit `rows` from the form as CSV; the new job's id."""
    page.click("#new-generation details summary")
    page.fill("#csv", "\n".join(f"{name},{prompt}" for name, prompt in rows))
    page.click("#load-csv")
    page.click("#submit")
    return str(page.wait_for_selector("#new-job").text_content())


def test_console_flow(phone_or_laptop: tuple[Any, Any, Watch, Shots], served: Gunicorn) -> None:
    context, page, watch, shots = phone_or_laptop
    page.goto(served.url + "/")
    _check_page(page, shots, "sign-in")
    _sign_in(page, served.url, ADMIN_KEY, admin=True)
    expect(page.locator("#model")).to_have_value("flux-dev")  # not the alphabetical first
    expect(page.locator("#param-go_fast")).to_have_attribute("type", "checkbox")
    _check_page(page, shots, "console")
    job_id = _submit(page, PACED)
    _watch_live(page, job_id, watch, shots)
    _lightbox(page)
    _download_zip(page, [f"{name}.webp" for name, _ in PACED])
    _retry_failed(page, served.url, watch, shots)
    _cancel(page, served.url, shots)
    _usage(page, served.url, shots)
    _keys(page, served.url, shots)
    _media(page, served.url)
    _dark(page, served.url, shots)
    assert not watch.blocked, watch.blocked
    assert not watch.errors, watch.errors


def _watch_live(page: Any, job_id: str, watch: Watch, shots: Shots) -> None:
    """The job page loads once, then only its event stream (and the pictures) is fetched."""
    opened = len(watch.urls)
    page.click("#new-job")
    page.wait_for_load_state()
    expect(page.locator("#gallery .item")).to_have_count(len(PACED))
    names = page.locator("#gallery .file-name").all_text_contents()
    assert names[-1] == "dusk"  # the caller's name on the placeholder, before any file
    expect(page.locator('#gallery .item[data-index="2"] .spinner, '
                        '#gallery .item[data-index="2"] .skeleton')).to_have_count(1)
    loaded = len(watch.urls)
    progress = page.locator("#job-progress [role=progressbar]")
    expect(progress).to_have_attribute("aria-valuenow", "2", timeout=15000)
    # Shown while the stream is still open (it ends with the job): events pass unbuffered.
    assert page.get_attribute("#job-state", "data-state") == "running"
    _check_page(page, shots, "job-running")
    expect(progress).to_have_attribute("aria-valuenow", "3", timeout=15000)
    expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
    expect(page.locator("#gallery img")).to_have_count(len(PACED))
    assert page.locator("#job-cost").text_content() == "cost $0.08"  # 3 x $0.025, to the cent
    stream = f"/console/api/jobs/{job_id}/events"
    assert stream in [urlsplit(u).path for u in watch.urls[opened:]]
    after = [urlsplit(u).path for u in watch.urls[loaded:]]
    polled = [p for p in after if p != stream and not p.startswith("/console/api/files/")]
    assert not polled, f"requests after load besides the stream: {polled}"
    _check_page(page, shots, "job-done")


def _lightbox(page: Any) -> None:
    page.locator("#gallery .thumb").first.click()
    caption = page.locator("#lightbox .lightbox-caption")
    expect(caption).to_have_text(re.compile(r"^dawn\.webp \(1 of 3\)$"))
    page.keyboard.press("ArrowRight")
    expect(caption).to_have_text(re.compile(r"^noon\.webp \(2 of 3\)$"))
    page.click("#lightbox-prev")
    page.click("#lightbox-prev")
    expect(caption).to_have_text(re.compile(r"^dusk\.webp \(3 of 3\)$"))
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).not_to_be_visible()


def _download_zip(page: Any, names: list[str]) -> None:
    with page.expect_download() as download:
        page.click("#archive")
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        assert archive.namelist() == names


def _retry_failed(page: Any, url: str, watch: Watch, shots: Shots) -> None:
    """The jobs list follows the job live; a failed item says why (no "(no file yet)"); the
    fallback tried is named; retry opens a new job."""
    page.goto(url + "/")
    expect(page.locator("#jobs .job-row")).to_have_count(1)  # the list is read once, here
    loaded = len(watch.urls)
    job_id = _submit(page, [("broken", "this one fails #fail"),
                            ("saved", "a rescue #fail@flux-dev")])
    row = page.locator(f'#jobs .job-row[data-job-id="{job_id}"]')
    expect(row.locator(".state")).to_have_text("partially failed", timeout=15000)
    expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "2")
    after = {urlsplit(u).path for u in watch.urls[loaded:]}
    # The submission, and the status panel read once at the job's end; nothing polled.
    assert {p for p in after if not p.startswith("/console/api/files/")} <= {
        "/console/api/generate-batch", "/console/api/status"}, after
    page.click("#new-job")
    expect(page.locator("#job-state")).to_have_attribute("data-state", "partially_failed",
                                                         timeout=15000)
    failed = page.locator('#gallery .item[data-index="0"]')
    expect(failed).to_have_class(re.compile(r"\bstate-failed\b"))
    expect(failed.locator(".why")).not_to_be_empty()
    assert "no file yet" not in str(failed.text_content())
    rescued = page.locator('#gallery .item[data-index="1"]')
    expect(rescued.locator(".meta").first).to_contain_text("(fallback)")
    _check_page(page, shots, "job-partially-failed")
    first_job = page.get_attribute("#job", "data-job-id")
    page.click("#retry")
    page.wait_for_url(lambda at: "/console/jobs/job_" in at and str(first_job) not in at)
    expect(page.locator("#gallery .item")).to_have_count(1)  # only the failed item again


def _cancel(page: Any, url: str, shots: Shots) -> None:
    """Cancel is disabled once asked; canceled items look canceled, not failed; no zip."""
    page.goto(url + "/")
    _submit(page, [("stuck", "waits forever #hang"), ("later", "never starts #hang")])
    page.click("#new-job")
    expect(page.locator("#job-state")).to_have_attribute("data-state", re.compile("running|queued"))
    page.click("#cancel")
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#job-state")).to_have_attribute("data-state", "canceled", timeout=15000)
    expect(page.locator("#gallery .item.state-canceled")).to_have_count(2)
    expect(page.locator("#gallery .why")).to_have_count(0)
    expect(page.locator("#archive")).to_have_attribute("aria-disabled", "true")
    _check_page(page, shots, "job-canceled")
    page.goto(url + "/")
    expect(page.locator("#jobs .job-row")).to_have_count(4)
    expect(page.locator("#jobs .job-row img.job-thumb").first).to_be_visible()


def _usage(page: Any, url: str, shots: Shots) -> None:
    page.goto(url + "/console/usage")
    expect(page.locator("#usage-chart svg rect.bar").first).to_be_attached()
    expect(page.locator("#usage-by-model tbody tr").first).to_contain_text("flux-dev")
    _check_page(page, shots, "usage")


def _keys(page: Any, url: str, shots: Shots) -> None:
    """Mint (the secret shown once), rotate (a new one), revoke."""
    page.goto(url + "/console/keys")
    name = f"design-{time.monotonic_ns()}"
    page.fill("#mint-name", name)
    page.fill("#mint-budget", "5")
    page.click("#mint button[type=submit]")
    expect(page.locator("#secret")).to_have_text(re.compile(r"^rgk_"))
    first = page.text_content("#secret")
    row = page.locator("#keys .key-row", has_text=name)
    _check_page(page, shots, "keys")
    row.get_by_role("button", name="Rotate").click()
    row.get_by_role("button", name="Really rotate?").click()
    expect(page.locator("#secret")).not_to_have_text(str(first))
    page.click("#hide-secret")
    expect(page.locator("#secret-box")).to_be_hidden()
    row.get_by_role("button", name="Revoke").click()
    row.get_by_role("button", name="Really revoke?").click()
    expect(row.locator(".state")).to_have_text("revoked")
    assert first not in page.content()


AUDIT = AXE.parents[2] / "audit.mjs"
LIGHTHOUSE = AXE.parents[1] / "lighthouse"
MIN_SCORE = 0.95


def test_lighthouse_scores(laptop: tuple[Any, Any, Watch, Shots], served: Gunicorn) -> None:
    """Lighthouse's accessibility and best-practices scores on the main pages, signed in."""
    node = shutil.which("node")
    if node is None or not LIGHTHOUSE.exists():
        if os.environ.get("CI"):
            pytest.fail("node or lighthouse is missing under CI (npm ci --prefix tests/browser)")
        pytest.skip("lighthouse is not installed (npm ci --prefix tests/browser)")
    context, page, _, _ = laptop
    _sign_in(page, served.url, ADMIN_KEY, admin=True)
    job_id = _submit(page, PACED[:1])
    page.click("#new-job")
    expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded", timeout=15000)
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())
    urls = [served.url + path for path in ("/", f"/console/jobs/{job_id}", "/console/usage",
                                            "/console/keys")]
    started = time.monotonic()
    audited = subprocess.run([node, str(AUDIT), json.dumps({"Cookie": cookie}), *urls],
                             env={**os.environ, "CHROME_PATH": CHROMIUM}, cwd=AUDIT.parent,
                             capture_output=True, text=True, timeout=240, check=True)
    results = json.loads(audited.stdout)
    print(f"\nlighthouse, {len(urls)} pages in {time.monotonic() - started:.0f} s: " +
          ", ".join(f"{urlsplit(u).path} {r['scores']}" for u, r in results.items()))
    for url, result in results.items():
        for category, score in result["scores"].items():
            assert score >= MIN_SCORE, f"{url} {category} {score}: failed {result['failed']}"


def _dark(page: Any, url: str, shots: Shots) -> None:
    """With the system in dark mode the console is dark, and still readable (axe's contrast)."""
    page.emulate_media(color_scheme="dark")
    for path in ("/", "/console/usage"):
        page.goto(url + path)
        page.wait_for_selector("#jobs .job-row, #usage-chart svg")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(18, 20, 24)"
        _check_page(page, shots, "dark" + path.replace("/", "-"))


def _media(page: Any, url: str) -> None:
    """chatterbox's reference is an audio file; its speech and kling's video play in place; the
    form then opens on the last model used."""
    page.goto(url + "/")
    page.select_option("#model", "chatterbox")
    picker = page.locator("#ref-audio_prompt")
    expect(picker).to_have_attribute("accept", "audio/*")
    expect(page.locator('label[for="ref-audio_prompt"]')).to_have_text(re.compile("audio"))
    _submit(page, [("voice", "hello there")])
    page.click("#new-job")
    expect(page.locator("#gallery audio[controls]")).to_have_count(1, timeout=15000)
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_value("chatterbox")
    page.select_option("#model", "kling-v2.1-master")
    _submit(page, [("clip", "waves on a beach")])
    page.click("#new-job")
    expect(page.locator("#gallery video[controls]")).to_have_count(1, timeout=15000)


def test_a_refused_stream_comes_back(make_settings: Callable[..., Settings],
                                     start_gunicorn: Callable[..., Gunicorn], sim: Simulator,
                                     tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """One stream per caller: a second tab's job stream is refused (429), and once the first
    tab is gone it is opened again, from its last event, and the job is followed to its end."""
    server = start_gunicorn(make_settings(), workers=1, SESSION_SECRET="console-test-secret",
                            EVENT_STREAMS_PER_CALLER="1", EVENT_HEARTBEAT_SECONDS="0.2")
    with _browser(VIEWPORTS["laptop"], tmp_path, request) as (context, first, _, _):
        _sign_in(first, server.url, ADMIN_KEY, admin=True)
        job_id = _submit(first, [("slowest", "a long night #slow=8")])
        second = context.new_page()
        streams: list[int] = []
        second.on("response", lambda r: streams.append(r.status) if r.url.endswith(
            f"/jobs/{job_id}/events") or "/events?last_event_id=" in r.url else None)
        second.goto(f"{server.url}/console/jobs/{job_id}")
        expect(second.locator("#job-state")).to_have_attribute("data-state", "running")
        expect(second.locator("#gallery .spinner")).to_have_count(1)
        second.wait_for_timeout(300)
        assert streams == [429], streams  # the first tab holds the caller's one stream
        first.close()  # its stream's slot frees at the next heartbeat
        expect(second.locator("#job-state")).to_have_attribute("data-state", "succeeded",
                                                               timeout=20000)
        assert streams[-1] == 200, streams
        expect(second.locator("#gallery img")).to_have_count(1)


def _console_session(client: FlaskClient, kind: str, key: str) -> str:
    """Sign `client` in; the session's CSRF token."""
    page = client.get("/").get_data(as_text=True)
    pre = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert pre is not None
    assert client.post("/console/sign-in", data={"csrf_token": pre.group(1), "kind": kind,
                                                  "key": key}).status_code == 303
    signed_in = re.search(r'name="csrf-token" content="([^"]+)"',
                          client.get("/").get_data(as_text=True))
    assert signed_in is not None
    return signed_in.group(1)


def test_the_forwarder_keeps_the_apis_authorization(client: FlaskClient) -> None:
    """/keys through the console answers as the API does: the admin's, never a token's; a
    revocation needs the CSRF token; usage answers either."""
    csrf = _console_session(client, "replicate", USER_TOKEN)
    assert client.get("/console/api/keys").status_code == 403
    assert client.post("/console/api/keys", json={"name": "nope"},
                       headers={"X-CSRF-Token": csrf}).status_code == 403
    assert client.get("/console/api/usage").status_code == 200
    assert "Only the admin" in client.get("/console/keys").get_data(as_text=True)
    assert client.get("/console/api/configure").status_code == 404  # never forwarded

    admin = client.application.test_client()
    admin_csrf = _console_session(admin, "admin", ADMIN_KEY)
    minted = admin.post("/console/api/keys", json={"name": "forwarded"},
                        headers={"X-CSRF-Token": admin_csrf})
    assert minted.status_code == 201 and minted.get_json()["key"].startswith("rgk_")
    key_id = minted.get_json()["id"]
    assert admin.delete(f"/console/api/keys/{key_id}").status_code == 403  # no CSRF header
    assert admin.get(f"/console/api/keys/{key_id}").get_json()["state"] == "active"
    revoked = admin.delete(f"/console/api/keys/{key_id}", headers={"X-CSRF-Token": admin_csrf})
    assert revoked.get_json()["state"] == "revoked"


def test_the_status_panel_shows_the_back_off(laptop: tuple[Any, Any, Watch, Shots],
                                             served: Gunicorn, sim: Simulator) -> None:
    """A 429 from Replicate puts the account in back-off: the panel says how long is left
    (from /status's backoff_remaining)."""
    _, page, watch, _ = laptop
    _sign_in(page, served.url, ADMIN_KEY, admin=True)
    expect(page.locator("#status dd").last).to_have_text("none")
    sim.inject("POST", r"/predictions$", 429, headers={"Retry-After": "6"})
    _submit(page, [("patient", "worth the wait")])
    backoff = page.locator("#status dd").last
    deadline = time.monotonic() + 10
    while not re.fullmatch(r"\d+ s left", str(backoff.text_content())):
        assert time.monotonic() < deadline, backoff.text_content()
        page.click("#refresh-status")
        page.wait_for_timeout(200)
    assert not watch.errors, watch.errors
