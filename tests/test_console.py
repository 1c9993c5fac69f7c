"""The web console end to end: headless Chromium (Debian's, via Playwright) against real gunicorn
and the simulator. Every request the page makes is checked to stay on 127.0.0.1."""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import ADMIN_KEY, OTHER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--metrics-recording-only"]
PROMPTS = [(f"shot_{i}", f"a painted scene number {i}") for i in range(1, 7)]


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing under CI (.ci/run installs Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


class Watch:
    """Every URL the page asked for, and every console error it logged."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.blocked: list[str] = []


@pytest.fixture
def browser_page(tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, Watch]]:
    _chromium_or_skip()
    watch = Watch()
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True)
        context.route("**/*", lambda route: _only_local(route, watch))
        page = context.new_page()
        page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
        failed_before = request.session.testsfailed
        yield context, page, watch
        if request.session.testsfailed > failed_before:  # a screenshot only for a failure
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        context.close()
        browser.close()


def _only_local(route: Any, watch: Watch) -> None:
    url = route.request.url
    watch.urls.append(url)
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1":
        route.continue_()
    else:
        watch.blocked.append(url)
        route.abort()


@pytest.fixture
def console(make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
            sim: Simulator) -> Gunicorn:
    return start_gunicorn(make_settings(), workers=2, SESSION_SECRET="console-test-secret")


def _sign_in(page: Any, url: str, key: str, admin: bool) -> None:
    page.goto(url + "/")
    if not admin:
        page.check("#kind-replicate")
    page.fill("#key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#new-generation")


def _submit(page: Any, rows: list[tuple[str, str]]) -> str:
    page.select_option("#model", "flux-dev")
    page.click("#new-generation details summary")
    page.fill("#csv", "\n".join(f"{name},{prompt}" for name, prompt in rows))
    page.click("#load-csv")
    assert page.locator(".prompt-row").count() == len(rows)
    page.click("#estimate")
    expect(page.locator("#estimate-result")).to_have_text(re.compile(r"^Estimated cost"))
    page.click("#submit")
    link = page.wait_for_selector("#new-job")
    return str(link.text_content())


def _wait_state(page: Any, states: tuple[str, ...], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = str(page.get_attribute("#job-state", "data-state"))
        if state in states:
            return state
        page.wait_for_timeout(200)
    raise AssertionError(f"job never reached {states}")


def test_console_end_to_end(browser_page: tuple[Any, Any, Watch], console: Gunicorn,
                            capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    context, page, watch = browser_page
    _sign_in(page, console.url, ADMIN_KEY, admin=True)
    assert ADMIN_KEY not in page.url and ADMIN_KEY not in page.content()
    job_id = _submit(page, PROMPTS)
    page.click("#new-job")
    _wait_state(page, ("succeeded",))
    expect(page.locator("#gallery img")).to_have_count(6)
    names = page.locator("#gallery .file-name").all_text_contents()
    assert [n.split(".")[0] for n in names] == [name for name, _ in PROMPTS]
    _open_one(context, page)
    _download_zip(page, [n for n in names])
    _cancel_running_job(page)
    _other_account_sees_nothing(page, console.url, job_id)
    storage = page.evaluate("JSON.stringify(window.localStorage)")
    assert ADMIN_KEY not in storage and OTHER_TOKEN not in storage
    assert not watch.blocked, watch.blocked
    assert all(urlsplit(u).hostname == "127.0.0.1" or u.startswith("data:") for u in watch.urls)
    assert not watch.errors, watch.errors
    with capsys.disabled():
        print(f"\nconsole end-to-end: {time.monotonic() - started:.1f} s")


def _open_one(context: Any, page: Any) -> None:
    with context.expect_page() as opened:
        page.locator("#gallery .open").first.click()
    image = opened.value
    image.wait_for_load_state()
    assert "/console/api/files/" in image.url
    image.close()


def _download_zip(page: Any, names: list[str]) -> None:
    with page.expect_download() as download:
        page.click("#archive")
    path = download.value.path()
    with zipfile.ZipFile(io.BytesIO(Path(path).read_bytes())) as archive:
        assert archive.namelist() == names


def _cancel_running_job(page: Any) -> None:
    page.goto(page.url.split("/console/")[0] + "/")
    page.wait_for_selector("#new-generation")
    _submit(page, [("stuck_1", "#hang waits forever"), ("stuck_2", "#slow=30 takes long")])
    page.click("#new-job")
    _wait_state(page, ("running", "queued"))
    page.click("#cancel")
    assert _wait_state(page, ("canceled", "cancel_requested")) in ("canceled", "cancel_requested")


def _other_account_sees_nothing(page: Any, url: str, job_id: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#jobs .job-row")  # the page's reads are done: none meets sign-out
    page.wait_for_selector("#status dd")
    expect(page.locator("#submit")).to_be_enabled()
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    _sign_in(page, url, OTHER_TOKEN, admin=False)
    page.wait_for_timeout(500)
    assert page.locator("#jobs .job-row").count() == 0
    assert page.request.get(f"{url}/console/api/jobs/{job_id}").status == 404
    with pytest.raises(AssertionError):  # without the CSRF header, no state change
        response = page.request.post(f"{url}/console/api/jobs/{job_id}/cancel")
        assert response.status != 403


def test_a_cancel_answer_arriving_after_the_jobs_end_does_not_undo_it(
        browser_page: tuple[Any, Any, Watch], console: Gunicorn) -> None:
    """The stream's job.finished can overtake the cancel's own answer ("cancel_requested"):
    the answer, held here until the page shows the end, must not move the job back."""
    _, page, watch = browser_page
    _sign_in(page, console.url, ADMIN_KEY, admin=True)
    _submit(page, [("stuck_1", "#hang waits forever"), ("stuck_2", "#hang waits too")])
    page.click("#new-job")
    _wait_state(page, ("running",))
    held: list[tuple[Any, Any]] = []
    page.route("**/cancel", lambda route: held.append((route, route.fetch())))
    page.click("#cancel")
    _wait_state(page, ("canceled",))  # from the stream, the cancel's answer still held
    assert len(held) == 1 and held[0][1].json()["state"] == "cancel_requested"
    route, answer = held[0]
    with page.expect_event("requestfinished"):
        route.fulfill(response=answer)
    page.evaluate("() => new Promise((done) => setTimeout(done, 100))")  # its handler has run
    assert page.get_attribute("#job-state", "data-state") == "canceled"
    assert not watch.errors, watch.errors
