"""Durable jobs across real gunicorn processes: a SIGKILL or a SIGTERM mid-batch loses nothing
and pays for nothing twice; a user's orphaned job waits for its owner's token (issue #3)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ADMIN, SERVER_TOKEN, USER, USER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator, token_hash
from replicate_generation.jobs.store import JobStore
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for

TERMINAL = {"succeeded", "partially_failed", "failed", "canceled"}
LEASE_TTL = 1.5
SLOTS = 3
SLOW = [f"#slow=2 slow item {i}" for i in range(SLOTS)]
QUICK = [f"#slow=0.2 quick item {i}" for i in range(5)]
PROMPTS = SLOW + QUICK  # the slow ones hold every slot, so the quick ones wait in the queue


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(concurrent_limit=SLOTS, lease_ttl_seconds=LEASE_TTL,
                         task_timeout_seconds=30)


@pytest.fixture
def start(start_gunicorn: Callable[..., Gunicorn]) -> Callable[..., Gunicorn]:
    """Start a one-worker gunicorn with the given settings (and extra environment)."""
    return partial(start_gunicorn, workers=1)


def get_job(server: Gunicorn, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    response = requests.get(f"{server.url}/jobs/{job_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_terminal(server: Gunicorn, job_id: str, headers: dict[str, str],
                  timeout: float = 30.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.update(get_job(server, job_id, headers))
        return found["state"] in TERMINAL

    wait_for(done, timeout, f"job {job_id} to end")
    return found


def submit(server: Gunicorn, prompts: list[str], headers: dict[str, str]) -> str:
    body = {"model_name": "flux-dev", "prompts": prompts, "output_format": "png"}
    response = server.post("/generate-batch", body, {**headers, "Prefer": "respond-async"},
                           timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def creates_by_prompt(sim: Simulator, token: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for prediction in sim.predictions(token):
        prompt = str(prediction["input"]["prompt"])
        counts[prompt] = counts.get(prompt, 0) + 1
    return counts


def all_slots_held(server: Gunicorn, sim: Simulator, job_id: str, token: str,
                   headers: dict[str, str]) -> dict[int, str]:
    """Wait until the simulator saw SLOTS creates and the job stored all their ids: every slot
    is held, so no create can be in flight. Returns {index: prediction id}."""

    def held() -> dict[int, str] | None:
        if len(sim.predictions(token)) != SLOTS:
            return None
        items = get_job(server, job_id, headers)["items"]
        stored = {i["index"]: i["prediction_id"] for i in items
                  if i["state"] == "running" and i["prediction_id"]}
        return stored if len(stored) == SLOTS else None

    stored: dict[int, str] = wait_for(held, what=f"{SLOTS} predictions created and stored")
    assert sorted(stored) == list(range(SLOTS))
    assert set(stored.values()) == {p["id"] for p in sim.predictions(token)}
    return stored


def assert_all_done_once(done: dict[str, Any], sim: Simulator, token: str, prompts: list[str],
                         before: dict[int, str], output_dir: Path) -> None:
    assert done["state"] == "succeeded", done
    assert done["counts"]["succeeded"] == len(prompts)
    assert [i["prompt"] for i in done["items"]] == prompts
    assert [i["state"] for i in done["items"]] == ["succeeded"] * len(prompts)
    # Exactly one create per item: the ones in flight were polled, never created again.
    assert creates_by_prompt(sim, token) == dict.fromkeys(prompts, 1)
    for index, prediction_id in before.items():
        assert done["items"][index]["prediction_id"] == prediction_id
    for item in done["items"]:
        (relative,) = [url.removeprefix("/files/") for url in item["urls"]]
        assert (output_dir / relative).read_bytes().startswith(b"\x89PNG")


def test_sigkill_mid_batch_resumes_on_the_next_start_without_creating_twice(
        settings: Settings, start: Callable[..., Gunicorn], sim: Simulator) -> None:
    first = start(settings)
    job_id = submit(first, PROMPTS, ADMIN)
    before = all_slots_held(first, sim, job_id, SERVER_TOKEN, ADMIN)
    first.kill()
    assert len(sim.predictions(SERVER_TOKEN)) == SLOTS  # nothing after the kill yet

    second = start(settings)
    done = wait_terminal(second, job_id, ADMIN)
    assert_all_done_once(done, sim, SERVER_TOKEN, PROMPTS, before, settings.output_dir)
    assert sim.stats(SERVER_TOKEN)["cancels"] == 0


def test_sigterm_lets_running_items_finish_and_leaves_the_rest_for_the_next_start(
        settings: Settings, start: Callable[..., Gunicorn], sim: Simulator) -> None:
    first = start(settings, SHUTDOWN_GRACE_SECONDS="10")
    job_id = submit(first, PROMPTS, ADMIN)
    before = all_slots_held(first, sim, job_id, SERVER_TOKEN, ADMIN)
    # As `docker stop` does: SIGTERM to the master only; it forwards it to its worker, whose
    # worker_exit hook closes the job runner.
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.proc.wait(timeout=20) == 0, first.log()

    # Read the state file as the process left it.
    store = JobStore(str(settings.state_file))
    job = store.get(job_id)
    assert job is not None and job.state == "running" and job.owner is None
    items = store.items(job_id)
    assert [i.state for i in items[:SLOTS]] == ["succeeded"] * SLOTS
    assert [i.prediction_id for i in items[:SLOTS]] == [before[i] for i in range(SLOTS)]
    assert all(i.files for i in items[:SLOTS])
    assert [i.state for i in items[SLOTS:]] == ["queued"] * len(QUICK)
    assert [i.prediction_id for i in items[SLOTS:]] == [None] * len(QUICK)
    assert creates_by_prompt(sim, SERVER_TOKEN) == dict.fromkeys(SLOW, 1)
    assert sim.stats(SERVER_TOKEN)["cancels"] == 0
    assert "Worker exiting" in first.log()

    second = start(settings, SHUTDOWN_GRACE_SECONDS="10")
    done = wait_terminal(second, job_id, ADMIN)
    assert_all_done_once(done, sim, SERVER_TOKEN, PROMPTS, before, settings.output_dir)


def test_a_user_job_orphaned_by_sigkill_resumes_once_its_owner_calls_again(
        settings: Settings, start: Callable[..., Gunicorn], sim: Simulator) -> None:
    first = start(settings)
    user_prompts = [f"user {p}" for p in PROMPTS[:SLOTS + 1]]
    admin_prompts = [f"admin {p}" for p in PROMPTS[:SLOTS + 1]]
    user_job = submit(first, user_prompts, USER)
    admin_job = submit(first, admin_prompts, ADMIN)
    user_before = all_slots_held(first, sim, user_job, USER_TOKEN, USER)
    admin_before = all_slots_held(first, sim, admin_job, SERVER_TOKEN, ADMIN)
    first.kill(settle=True)  # a poll already sent is handled before killed_at
    killed_at = sim.now()

    second = start(settings)
    # The admin job resumes on its own (the server token is known at start): once it is done,
    # the new process has claimed every orphan it could pay for...
    admin_done = wait_terminal(second, admin_job, ADMIN)
    assert_all_done_once(admin_done, sim, SERVER_TOKEN, admin_prompts, admin_before,
                         settings.output_dir)
    # ...and it could not pay for the user's: no request with the user's token since the kill.
    assert get_job(second, user_job, ADMIN)["state"] == "running"  # the admin's look is no call
    user = token_hash(USER_TOKEN)
    assert [e for e in sim.requests_log() if e["t"] >= killed_at and e["token_hash"] == user] == []
    assert len(sim.predictions(USER_TOKEN)) == SLOTS

    # Any authenticated request by the user hands the process its token: the job resumes.
    assert get_job(second, user_job, USER)["state"] == "running"
    user_done = wait_terminal(second, user_job, USER)
    assert_all_done_once(user_done, sim, USER_TOKEN, user_prompts, user_before,
                         settings.output_dir)


def test_sigterm_past_the_grace_period_leaves_running_predictions_to_be_polled_next_start(
        make_settings: Callable[..., Settings], start: Callable[..., Gunicorn],
        held_sim: tuple[Simulator, HeldClock]) -> None:
    # The simulator's clock stands still until the second start: however slowly the first
    # process stops, no prediction can end meanwhile.
    sim, clock = held_sim
    settings = make_settings(concurrent_limit=SLOTS, lease_ttl_seconds=LEASE_TTL,
                             task_timeout_seconds=30, replicate_base_url=sim.base_url)
    prompts = [p.replace("#slow=2", "#slow=3") for p in PROMPTS]
    first = start(settings, SHUTDOWN_GRACE_SECONDS="0.3")
    job_id = submit(first, prompts, ADMIN)
    before = all_slots_held(first, sim, job_id, SERVER_TOKEN, ADMIN)
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.proc.wait(timeout=20) == 0, first.log()

    # The process stopped before its predictions ended: they were neither canceled nor waited
    # for, but left, with their ids, for the next start.
    assert all(not p["canceled"] and p["status"] != "succeeded"
               for p in sim.predictions(SERVER_TOKEN))
    store = JobStore(str(settings.state_file))
    items = store.items(job_id)
    assert [(i.state, i.prediction_id) for i in items[:SLOTS]] == \
        [("running", before[i]) for i in range(SLOTS)]
    assert [i.state for i in items[SLOTS:]] == ["queued"] * len(QUICK)
    assert len(sim.predictions(SERVER_TOKEN)) == SLOTS

    clock.release()
    second = start(settings)
    done = wait_terminal(second, job_id, ADMIN)
    assert_all_done_once(done, sim, SERVER_TOKEN, prompts, before, settings.output_dir)
    assert sim.stats(SERVER_TOKEN)["cancels"] == 0


def test_canceling_an_orphaned_user_job_cancels_its_predictions_from_the_new_process(
        settings: Settings, start: Callable[..., Gunicorn], sim: Simulator) -> None:
    prompts = [p.replace("#slow=2", "#slow=20") for p in PROMPTS]
    first = start(settings)
    job_id = submit(first, prompts, USER)
    before = all_slots_held(first, sim, job_id, USER_TOKEN, USER)
    first.kill()

    second = start(settings)
    response = requests.post(f"{second.url}/jobs/{job_id}/cancel", headers=USER, timeout=10)
    assert response.status_code == 200, response.text
    done = wait_terminal(second, job_id, USER)
    assert done["state"] == "canceled"
    assert done["counts"]["canceled"] == len(prompts)
    # The predictions left by the dead process were canceled on Replicate (the cancel call gave
    # the new process the user's token); the queued items were never created.
    predictions = sim.predictions(USER_TOKEN)
    assert {p["id"] for p in predictions} == set(before.values())
    assert all(p["canceled"] for p in predictions)
    assert sim.stats(USER_TOKEN)["cancels"] == SLOTS
    assert [i["prediction_id"] for i in done["items"][:SLOTS]] == \
        [before[i] for i in range(SLOTS)]


def test_a_sync_caller_that_gives_up_leaves_a_job_that_completes(
        settings: Settings, start: Callable[..., Gunicorn], sim: Simulator) -> None:
    server = start(settings)
    body = {"model_name": "flux-dev", "prompts": ["#slow=1 a", "#slow=1 b"],
            "custom_filenames": ["a", "b"]}
    with pytest.raises(requests.Timeout):
        # The client hangs up long before the predictions end.
        server.post("/generate-batch", body, ADMIN, timeout=0.3)
    listed = wait_for(lambda: requests.get(f"{server.url}/jobs", headers=ADMIN,
                                           timeout=10).json()["data"], what="the job listed")
    job = wait_terminal(server, listed[0]["id"], ADMIN)
    assert job["state"] == "succeeded"
    assert [Path(i["files"][0]).stem for i in job["items"]] == ["a", "b"]
    assert sorted(creates_by_prompt(sim, SERVER_TOKEN).values()) == [1, 1]


def test_items_a_live_helper_gives_back_are_run_by_their_owner(
        make_settings: Callable[..., Settings], start: Callable[..., Gunicorn],
        held_sim: tuple[Simulator, HeldClock]) -> None:
    # A long lease: the helper below stays alive, so nothing is freed as a dead runner's.
    sim, clock = held_sim
    settings = make_settings(concurrent_limit=SLOTS, lease_ttl_seconds=120,
                             task_timeout_seconds=30, replicate_base_url=sim.base_url)
    prompts = [f"given back {i}" for i in range(20)]  # the owner's first window is 16
    server = start(settings)
    job_id = submit(server, prompts, ADMIN)
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == SLOTS, what="every slot taken")
    # This test plays another process of the same account: it claims the rest of the job ...
    helper = JobStore(str(settings.state_file))
    helper.owners.heartbeat("helper", time.time())
    job = helper.get(job_id)
    assert job is not None
    assert helper.claims.claim(job_id, "helper", 10, fence=job.fence) == list(range(16, 20))
    clock.release()
    # ... the owner runs its own 16 and finds nothing more to claim ...
    wait_for(lambda: get_job(server, job_id, ADMIN)["counts"]["succeeded"] == 16,
             what="the owner's window to finish")
    assert len(sim.predictions(SERVER_TOKEN)) == 16
    # ... then the helper stops without starting them: they are the owner's to run again.
    helper.claims.give_back("helper")
    done = wait_terminal(server, job_id, ADMIN)
    assert done["state"] == "succeeded", done
    assert creates_by_prompt(sim, SERVER_TOKEN) == dict.fromkeys(prompts, 1)
    helper.close()
