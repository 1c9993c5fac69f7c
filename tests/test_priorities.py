"""Interactive work first, over HTTP (issue #21, part 2): while one key's long async batch holds
the account's slots and queue, another key's synchronous call is created in the very next wave,
in the process that holds the batch and in another one sharing its limits. The simulator's clock
stands still, so "next wave" is decided by events, not by timing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
import requests

from conftest import ADMIN, SERVER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import Gunicorn, wait_for
from shared_backends import REDIS_URL, postgres_database, redis_prefix

FLUX = "flux-dev"


def created(sim: Simulator) -> list[str]:
    """Prompts of every prediction created on the server's account, in creation order."""
    return [str(p["input"].get("prompt")) for p in sim.predictions(SERVER_TOKEN)]


def slots(server: Gunicorn) -> tuple[int, int]:
    """(held, waiting) slots of the account, in every process sharing its limits."""
    totals = requests.get(f"{server.url}/status", headers=ADMIN, timeout=10).json()["totals"]
    return int(totals["in_flight"]), int(totals["waiting"])


@pytest.mark.parametrize("backends", ["sqlite", "redis+postgresql"])
def test_a_waiting_caller_is_created_in_the_next_wave_in_either_process(
        backends: str, held_sim: tuple[Simulator, HeldClock],
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    with ExitStack() as stack:
        shared = {} if backends == "sqlite" else {
            "redis_url": REDIS_URL, "redis_key_prefix": stack.enter_context(redis_prefix()),
            "database_url": stack.enter_context(postgres_database())}
        settings = make_settings(replicate_base_url=held_sim[0].base_url, concurrent_limit=2,
                                 sync_wait_seconds=0, poll_interval_seconds=0.05,
                                 task_timeout_seconds=60, **shared)
        _next_wave(held_sim, settings, start_gunicorn)


def _next_wave(held_sim: tuple[Simulator, HeldClock], settings: Settings,
               start_gunicorn: Callable[..., Gunicorn]) -> None:
    sim, clock = held_sim
    # Two instances sharing their limits (one state file, or Redis and PostgreSQL).
    holder, other = (start_gunicorn(settings, workers=1) for _ in range(2))
    keys = [requests.post(f"{holder.url}/keys", json={"name": name}, headers=ADMIN,
                          timeout=10).json()["key"] for name in ("nightly", "web")]
    batch = {"model_name": FLUX, "prompts": [f"batch {i} #slow=1" for i in range(12)],
             "async": True}
    accepted = requests.post(f"{holder.url}/generate-batch", json=batch,
                             headers={"X-API-Key": keys[0]}, timeout=10)
    assert accepted.status_code == 202, accepted.text
    wait_for(lambda: len(created(sim)) == 2, 20, "the batch to fill the limit")
    for wave, server in enumerate((holder, other), start=1):
        # Both slots held by the newest batch items, no one waiting: no free slot to slip into.
        settled = 2 + 4 * (wave - 1)  # creates so far: each wave and the call's end free two
        wait_for(lambda settled=settled: len(created(sim)) == settled
                 and slots(holder) == (2, 0), 20, "the batch to hold both slots")
        answer: dict[str, Any] = {}
        call = threading.Thread(target=lambda url=server.url, wave=wave, answer=answer:
                                answer.update(requests.post(f"{url}/generate", json={
                                    "model_name": FLUX, "prompt": f"urgent {wave} #slow=1"},
                                    headers={"X-API-Key": keys[1]}, timeout=60).json()))
        call.start()
        # Its ticket waits in the shared line: in the holder only if it did not queue behind
        # the batch for a runner.
        wait_for(lambda server=server: slots(server) == (2, 1), 20, "the call to wait for a slot")
        before = len(created(sim))
        clock.advance(1.5)  # the two running predictions end: two slots free
        sim.wake_waiters()
        wait_for(lambda before=before: len(created(sim)) == before + 2, 20, "the next wave")
        assert f"urgent {wave} #slow=1" in created(sim)[-2:], created(sim)
        clock.advance(1.5)
        sim.wake_waiters()
        call.join(30)
        assert answer.get("success") is True, answer
    # The rest of the batch is not this test's: canceled, so the services stop at once.
    requests.post(f"{holder.url}/jobs/{accepted.json()['id']}/cancel", headers=ADMIN, timeout=10)
    clock.release()
    sim.wake_waiters()
    for server in (holder, other):  # before their Redis keys and database are removed
        server.stop()
