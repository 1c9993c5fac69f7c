"""Issue #20, findings 2 and 8, over HTTP against the simulator: a user's token is checked with
Replicate (GET /v1/account) before anything is stored for it or a console session opens, once
per period and shared by every process on the state file; what an account keeps is bounded;
retention keeps up and gives the space back; a rotated admin key ends its console sessions."""

from __future__ import annotations

import base64
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, ADMIN_KEY, OTHER, OTHER_TOKEN, SERVER_TOKEN, USER, USER_TOKEN
from replicate_generation.clients import account_key
from replicate_generation.devtools.simulator import Simulator, token_hash
from replicate_generation.errors import TokenRejected
from replicate_generation.jobs.rows import ItemOutcome, NewItem, NewJob
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.settings import Settings
from replicate_generation.token_checks import SQLiteVerdicts, TokenChecks
from servers import Gunicorn, wait_for
from shared_backends import REDIS_URL, redis_prefix

INVENTED = "r8_unknown_invented_by_anyone"  # the simulator never issued it
INVENTED_HEADERS = {"X-Replicate-API-Key": INVENTED}
TERMINAL = {"succeeded", "partially_failed", "failed", "canceled"}


def account_checks(sim: Simulator, token: str) -> int:
    """How many times Replicate was asked about this token."""
    return sum(1 for r in sim.requests_log()
               if r["path"] == "/v1/account" and r["token_hash"] == token_hash(token))


def creates(sim: Simulator, token: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests_log() if r["method"] == "POST"
            and r["token_hash"] == token_hash(token)]


def state_rows(settings: Settings, table: str, where: str = "1", *args: object) -> int:
    with closing(sqlite3.connect(settings.state_file, timeout=30)) as db:
        query = f"SELECT count(*) FROM {table} WHERE {where}"  # noqa: S608 - the test's own
        return int(db.execute(query, args).fetchone()[0])


def state_bytes(path: Path) -> int:
    """The state file's size once its WAL is folded in (as a backup or a copy would see it)."""
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def data_uri(size: int) -> str:
    return "data:image/png;base64," + base64.b64encode(os.urandom(size * 3 // 4)).decode()


def submit_async(client: FlaskClient, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return client.post("/generate-batch", json=body,
                       headers={**headers, "Prefer": "respond-async"})


def settings_of(app: Flask) -> Settings:
    settings: Settings = app.extensions["settings"]
    return settings


def wait_ended(client: FlaskClient, job_id: str, headers: dict[str, str]) -> None:
    wait_for(lambda: client.get(f"/jobs/{job_id}", headers=headers).get_json()["state"]
             in TERMINAL, 30, f"job {job_id} to end")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- finding 2: tokens


def test_an_invented_token_is_refused_before_anything_is_stored(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    settings = settings_of(app)
    before = state_bytes(settings.state_file)
    big = {"model_name": "flux-dev", "prompts": [f"p{i}" for i in range(20)],
           "input_image": data_uri(2_000_000)}
    answers = [submit_async(client, big, INVENTED_HEADERS) for _ in range(5)]
    answers.append(client.post("/generate", json={"model_name": "flux-dev", "prompt": "x"},
                               headers=INVENTED_HEADERS))
    for response in answers:
        assert response.status_code == 401, response.get_json()
        body = response.get_json()
        assert set(body) == {"error", "error_type", "request_id"}
        assert body["error_type"] == "replicate_unauthorized"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    # Replicate was asked once; the refusal was remembered for the rest, and nothing was created.
    assert account_checks(sim, INVENTED) == 1
    assert creates(sim, INVENTED) == []
    assert state_rows(settings, "jobs") == 0
    assert client.get("/jobs", headers=ADMIN).get_json()["data"] == []
    assert state_bytes(settings.state_file) - before < 64 * 1024  # not 6 x 2 MB


def test_a_valid_token_is_asked_about_once_per_period_not_once_per_request(
        client: FlaskClient, sim: Simulator) -> None:
    for i in range(4):
        response = client.post("/generate", json={"model_name": "flux-dev", "prompt": f"u{i}"},
                               headers=USER)
        assert response.status_code == 200, response.get_json()
    assert client.get("/jobs", headers=USER).status_code == 200
    assert client.get("/status", headers=USER).status_code == 200
    assert client.get("/jobs", headers=OTHER).status_code == 200
    assert (account_checks(sim, USER_TOKEN), account_checks(sim, OTHER_TOKEN)) == (1, 1)
    assert account_checks(sim, SERVER_TOKEN) == 0  # the admin key's token is the operator's


def test_replicate_not_answering_the_check_stores_nothing_and_says_when_to_come_back(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    sim.inject("GET", r"^/v1/account$", 503, {"detail": "down", "status": 503},
               headers={"Retry-After": "7"})
    refused = submit_async(client, {"model_name": "flux-dev", "prompts": ["a"]}, USER)
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["error_type"] == "token_unverified"
    assert refused.headers["Retry-After"] == "7"
    assert state_rows(settings_of(app), "jobs") == 0
    # Nothing was decided: the next request asks again, and is served.
    again = submit_async(client, {"model_name": "flux-dev", "prompts": ["a"]}, USER)
    assert again.status_code == 202, again.get_json()
    assert account_checks(sim, USER_TOKEN) == 2


def test_two_processes_on_one_state_file_share_every_verdict(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    first, second = make_app().test_client(), make_app().test_client()
    assert first.get("/jobs", headers=INVENTED_HEADERS).status_code == 401
    assert second.get("/jobs", headers=INVENTED_HEADERS).status_code == 401
    assert first.get("/jobs", headers=USER).status_code == 200
    assert second.get("/jobs", headers=USER).status_code == 200
    assert (account_checks(sim, INVENTED), account_checks(sim, USER_TOKEN)) == (1, 1)
    # A create answered 401 in one process: the other refuses the token from then on, unasked.
    sim.config.invalid_tokens = {OTHER_TOKEN}
    failed = first.post("/generate", json={"model_name": "flux-dev", "prompt": "x"},
                        headers=OTHER)
    assert failed.get_json()["error_type"] == "replicate_unauthorized"
    checks = account_checks(sim, OTHER_TOKEN)
    refused = submit_async(second, {"model_name": "flux-dev", "prompts": ["y"]}, OTHER)
    assert refused.status_code == 401 and refused.get_json()["error_type"] == \
        "replicate_unauthorized"
    assert account_checks(sim, OTHER_TOKEN) == checks
    assert len(creates(sim, OTHER_TOKEN)) == 1


def test_two_hosts_on_one_redis_share_every_verdict(
        make_app: Callable[..., Flask], sim: Simulator, tmp_path: Path) -> None:
    with redis_prefix() as prefix:
        hosts = [make_app(state_file=tmp_path / host / "state.sqlite3", redis_url=REDIS_URL,
                          redis_key_prefix=prefix).test_client() for host in ("a", "b")]
        for client in hosts:
            assert client.get("/jobs", headers=INVENTED_HEADERS).status_code == 401
            assert client.get("/jobs", headers=USER).status_code == 200
        assert (account_checks(sim, INVENTED), account_checks(sim, USER_TOKEN)) == (1, 1)
        sim.config.invalid_tokens = {USER_TOKEN}  # revoked: the next create is answered 401
        hosts[0].post("/generate", json={"model_name": "flux-dev", "prompt": "x"}, headers=USER)
        refused = hosts[1].get("/jobs", headers=USER)
        assert refused.status_code == 401, refused.get_json()
        assert account_checks(sim, USER_TOKEN) == 1


def test_two_gunicorn_workers_ask_once_per_token(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        sim: Simulator) -> None:
    server = start_gunicorn(make_settings(), workers=2)
    statuses = [requests.get(server.url + "/jobs", headers=headers, timeout=30).status_code
                for _ in range(12) for headers in (USER, INVENTED_HEADERS)]
    assert statuses == [200, 401] * 12
    assert (account_checks(sim, USER_TOKEN), account_checks(sim, INVENTED)) == (1, 1)


def test_the_verdict_lasts_its_period_then_the_token_is_asked_about_again(
        tmp_path: Path, sim: Simulator) -> None:
    clock = FakeClock()
    checks = TokenChecks(sim.base_url, SQLiteVerdicts(str(tmp_path / "state.sqlite3")),
                         verified_seconds=300, refused_seconds=60, clock=clock)
    try:
        checks.check(USER_TOKEN)
        clock.now += 299
        checks.check(USER_TOKEN)
        assert account_checks(sim, USER_TOKEN) == 1
        clock.now += 2
        checks.check(USER_TOKEN)
        assert account_checks(sim, USER_TOKEN) == 2
        for _ in range(2):
            with pytest.raises(TokenRejected):
                checks.check(INVENTED)
        clock.now += 59
        with pytest.raises(TokenRejected) as refused:
            checks.check(INVENTED)
        assert refused.value.retry_after == pytest.approx(1.0)
        assert account_checks(sim, INVENTED) == 1
        clock.now += 2
        with pytest.raises(TokenRejected):
            checks.check(INVENTED)
        assert account_checks(sim, INVENTED) == 2
        checks.refuse(account_key(USER_TOKEN))  # a create was answered 401
        with pytest.raises(TokenRejected):
            checks.check(USER_TOKEN)
        assert account_checks(sim, USER_TOKEN) == 2
    finally:
        checks.close()


def test_many_first_requests_at_once_in_two_processes_ask_once(
        tmp_path: Path, sim: Simulator) -> None:
    path = str(tmp_path / "state.sqlite3")
    pair = [TokenChecks(sim.base_url, SQLiteVerdicts(path), verified_seconds=300,
                        refused_seconds=60) for _ in range(2)]
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def first_request(checks: TokenChecks) -> None:
        start.wait()
        try:
            checks.check(USER_TOKEN)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_request, args=(pair[i % 2],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for checks in pair:
        checks.close()
    assert errors == []
    assert account_checks(sim, USER_TOKEN) == 1


# --------------------------------------------------------------------------- finding 2: console


def sign_in(client: FlaskClient, key: str, kind: str = "replicate") -> Any:
    page = client.get("/").get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return client.post("/console/sign-in",
                       data={"csrf_token": match.group(1), "kind": kind, "key": key})


def test_the_console_opens_a_session_only_for_a_token_replicate_accepts(
        app: Flask, client: FlaskClient, sim: Simulator) -> None:
    settings = settings_of(app)
    for _ in range(3):
        refused = sign_in(client, INVENTED)
        assert refused.status_code == 401
        assert "not accepted" in refused.get_data(as_text=True)
    assert state_rows(settings, "console_sessions") == 0
    assert account_checks(sim, INVENTED) == 1
    assert sign_in(client, USER_TOKEN).status_code == 303
    assert client.get("/console/api/jobs").status_code == 200
    # Signing in again and again keeps only the newest sessions of that account.
    for _ in range(25):
        assert sign_in(app.test_client(), USER_TOKEN).status_code == 303
    assert state_rows(settings, "console_sessions") == 20
    assert account_checks(sim, USER_TOKEN) == 1


# --------------------------------------------------------------------------- finding 8


def test_rotating_the_admin_key_ends_the_sessions_it_opened(
        make_app: Callable[..., Flask], sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_SECRET", "a-session-secret-kept-across-restarts")
    before = make_app().test_client()
    assert sign_in(before, ADMIN_KEY, kind="admin").status_code == 303
    assert before.get("/console/api/status").status_code == 200
    cookie = before.get_cookie("console_session")
    assert cookie is not None

    # The same state file and SESSION_SECRET, restarted with a new admin key.
    after = make_app(admin_api_key="a-rotated-admin-key-9876543210").test_client()
    after.set_cookie("console_session", cookie.value)
    answer = after.get("/console/api/status")
    assert answer.status_code == 401, answer.get_json()
    assert "Sign in" in after.get("/").get_data(as_text=True)
    assert sign_in(after, ADMIN_KEY, kind="admin").status_code == 401  # the old key is no key
    assert sign_in(after, "a-rotated-admin-key-9876543210", kind="admin").status_code == 303
    assert after.get("/console/api/status").status_code == 200


# --------------------------------------------------------------------------- bounds, retention


def test_an_account_keeps_at_most_its_bound_of_jobs_and_bytes(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(max_jobs_per_account=3, max_job_bytes_per_account=400_000)
    client = app.test_client()
    settings = settings_of(app)
    small = {"model_name": "flux-dev", "prompts": ["one"]}
    for _ in range(3):
        assert submit_async(client, small, USER).status_code == 202
    over = submit_async(client, small, USER)
    assert over.status_code == 429, over.get_json()
    assert over.get_json()["error_type"] == "account_store_full"
    assert "MAX_JOBS_PER_ACCOUNT" in over.get_json()["error"]
    assert int(over.headers["Retry-After"]) >= 1
    assert state_rows(settings, "jobs", "account = ?", account_key(USER_TOKEN)) == 3
    # Another account, and the admin key's (the operator's own), are not held by USER's bound.
    assert submit_async(client, small, OTHER).status_code == 202
    for _ in range(4):
        assert submit_async(client, small, ADMIN).status_code == 202
    # Bytes: a job bigger than the whole bound can never fit (413); one that would pass it, 429.
    image = {"model_name": "flux-dev", "prompts": ["with an image"]}
    assert submit_async(client, {**image, "input_image": data_uri(500_000)},
                        OTHER).status_code == 413
    assert submit_async(client, {**image, "input_image": data_uri(300_000)},
                        OTHER).status_code == 202
    full = submit_async(client, {**image, "input_image": data_uri(300_000)}, OTHER)
    assert full.status_code == 429 and "MAX_JOB_BYTES_PER_ACCOUNT" in full.get_json()["error"]
    assert state_rows(settings, "jobs", "account = ?", account_key(OTHER_TOKEN)) == 2


def test_retention_purges_a_backlog_bigger_than_one_round_in_one_pass(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    app = make_app(job_retention_seconds=60)
    runner: JobRunner = app.extensions["jobs"]
    store = runner.store
    for i in range(1_200):
        job_id = f"job_old_{i}"
        store.create(NewJob(id=job_id, account=account_key(USER_TOKEN), kind="generate",
                            request_id=f"r{i}", items=[NewItem(spec={"i": i})]), "w", 10.0)
        store.finish_item(job_id, 0, ItemOutcome(state="failed", error="x"), 11.0)
        store.finish_job_if_done(job_id, 11.0)
    started = time.monotonic()
    assert runner.maintenance.purge_expired(1_000.0, budget=30.0) == 1_200
    print(f"\npurged 1,200 jobs in {time.monotonic() - started:.2f} s")
    assert state_rows(settings_of(app), "jobs") == 0


def fill_and_purge(app: Flask) -> tuple[int, int, int]:
    """The state file's size before 8 jobs with 600 KB inputs, once they ended, and once purged."""
    client = app.test_client()
    state = settings_of(app).state_file
    before = state_bytes(state)
    ids = [submit_async(client, {"model_name": "flux-dev", "prompts": [f"big {i}"],
                                 "input_image": data_uri(600_000)}, USER).get_json()["id"]
           for i in range(8)]
    for job_id in ids:
        wait_ended(client, job_id, USER)
    grown = state_bytes(state)
    runner: JobRunner = app.extensions["jobs"]
    assert runner.maintenance.purge_expired(time.time() + 120) == 8
    return before, grown, state_bytes(state)


def test_purged_jobs_give_their_space_back_to_the_disk(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    before, grown, after = fill_and_purge(make_app(job_retention_seconds=60))
    assert grown - before > 4_000_000, (before, grown)
    assert after - before < 1_000_000, (before, grown, after)


def test_a_state_file_from_before_gives_its_space_back_too(
        make_app: Callable[..., Flask], sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "older" / "state.sqlite3"
    path.parent.mkdir()
    with closing(sqlite3.connect(path)) as db:  # made without incremental auto-vacuum
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE made_before (x)")
    before, grown, after = fill_and_purge(make_app(state_file=path, job_retention_seconds=60))
    assert grown - before > 4_000_000, (before, grown)
    assert after - before < 1_000_000, (before, grown, after)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
