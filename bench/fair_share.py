"""Many callers on one account, through the real service (gunicorn, 2 workers) and the simulator.

Run times spread over 1-3 s per prediction (deterministic per prompt and seed, so nothing lines up
with the service's intervals); every key is an issued key on the server's account.

    .venv/bin/python bench/fair_share.py priority  # a sync call while another key's batch waits
    .venv/bin/python bench/fair_share.py weights   # two keys' batches at once: 1:1, then 3:1
    .venv/bin/python bench/fair_share.py all
    .venv/bin/python bench/fair_share.py weights --instances 2  # two services on Redis + PostgreSQL

priority: key A submits an async batch (default 1,000 items) that fills the account (limit 10 by
default); key B then sends synchronous /generate calls one after another, on fresh connections so
both workers take some. The baseline, in the same run, is the same calls on the idle service just
before. Goal: busy p50 and max within 1.5x the idle ones.

weights: keys A and B submit batches of the same size at the same moment (limit 60 by default).
Equal weights: both finish within 5 % of each other. Weights 3:1: while both have work, A's
completed items per second over B's is 3 within 10 %. With --instances 2, two services (2 workers
each) share the account through Redis and PostgreSQL; A submits to the first, B to the second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from replicate_generation.settings import Settings  # noqa: E402
from tests.servers import Gunicorn, service_env  # noqa: E402
from tests.shared_backends import REDIS_URL, postgres_database, redis_prefix  # noqa: E402

TOKEN = "r8_bench_fair_share"  # noqa: S105 - only the simulator accepts it
ADMIN = {"X-Admin-API-Key": "bench-admin-key"}
MODEL = "flux-dev"


@dataclass(frozen=True)
class Workload:
    limit: int
    items: int
    calls: int = 0
    run_seconds: float = 1.0  # plus up to `spread`
    spread: float = 2.0
    instances: int = 1  # more than one: they share Redis and PostgreSQL


@contextmanager
def running(workload: Workload) -> Iterator[tuple[Simulator, list[Gunicorn]]]:
    """The simulator and the services (2 workers each) on the server's account, removed after."""
    sim = Simulator(SimConfig(run_seconds=workload.run_seconds, run_seconds_spread=workload.spread,
                              queue_seconds=0.0, create_rate_per_minute=1e6,
                              create_burst=100_000, other_rate_per_minute=1e6,
                              other_burst=100_000))
    sim.start()
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        shared: dict[str, Any] = {}
        if workload.instances > 1:
            shared = {"redis_url": REDIS_URL, "redis_key_prefix": stack.enter_context(
                redis_prefix()), "database_url": stack.enter_context(postgres_database())}
        servers = []
        try:
            for n in range(workload.instances):
                settings = Settings(
                    replicate_api_token=TOKEN, admin_api_key=ADMIN["X-Admin-API-Key"],
                    replicate_base_url=sim.base_url, output_dir=work / f"output{n}",
                    state_file=work / f"state{n}.sqlite3", concurrent_limit=workload.limit,
                    requests_per_minute=100_000, create_burst=100, task_timeout_seconds=3600.0,
                    **shared)
                env = {**service_env(settings, 2), "LOG_LEVEL": "WARNING"}
                servers.append(Gunicorn(env, work / f"gunicorn{n}.log"))
                servers[-1].wait_ready()
                servers[-1].wait_workers(2)
            yield sim, servers
        finally:
            for server in servers:
                server.stop()
            sim.stop()


def mint(server: Gunicorn, name: str, weight: float = 1.0) -> dict[str, str]:
    body = requests.post(f"{server.url}/keys", json={"name": name, "weight": weight},
                         headers=ADMIN, timeout=10).json()
    return {"X-API-Key": body["key"]}


def submit(server: Gunicorn, key: dict[str, str], prefix: str, count: int) -> str:
    body = {"model_name": MODEL, "prompts": [f"{prefix} {i}" for i in range(count)],
            "async": True}
    answer = requests.post(f"{server.url}/generate-batch", json=body, headers=key, timeout=60)
    answer.raise_for_status()
    return str(answer.json()["id"])


def job(server: Gunicorn, job_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{server.url}/jobs/{job_id}", headers=ADMIN, timeout=60).json())


def timed_calls(server: Gunicorn, key: dict[str, str], count: int) -> list[float]:
    """Seconds per synchronous /generate, each on a new connection (either worker)."""
    seconds = []
    for i in range(count):
        started = time.monotonic()
        answer = requests.post(f"{server.url}/generate", json={
            "model_name": MODEL, "prompt": f"interactive {i} {time.monotonic()}"},
            headers={**key, "Connection": "close"}, timeout=600)
        assert answer.status_code == 200, answer.text
        seconds.append(time.monotonic() - started)
    return seconds


def priority(workload: Workload) -> bool:
    with running(workload) as (_sim, (server, *_)):
        batch_key, web_key = mint(server, "nightly"), mint(server, "web")
        idle = timed_calls(server, web_key, workload.calls)
        job_id = submit(server, batch_key, "batch", workload.items)
        time.sleep(workload.run_seconds + workload.spread)  # the batch fills every slot
        busy = timed_calls(server, web_key, workload.calls)
        state = job(server, job_id)
        requests.post(f"{server.url}/jobs/{job_id}/cancel", headers=ADMIN, timeout=60)
    queued = state["counts"]["queued"]
    rows = [("idle (baseline)", idle), (f"behind {queued} queued batch items", busy)]
    print(f"priority: limit {workload.limit}, batch of {workload.items}, "
          f"{workload.calls} sync calls each side, run times {workload.run_seconds:g}-"
          f"{workload.run_seconds + workload.spread:g} s")
    for label, values in rows:
        print(f"  {label:34} p50 {statistics.median(values):6.2f} s  max {max(values):6.2f} s")
    p50_ratio = statistics.median(busy) / statistics.median(idle)
    max_ratio = max(busy) / max(idle)
    ok = p50_ratio <= 1.5 and max_ratio <= 1.5 and queued > 0
    print(f"  ratio busy/idle: p50 {p50_ratio:.2f}, max {max_ratio:.2f} "
          f"(goal <= 1.5, batch still queued: {queued > 0}) -> {'met' if ok else 'MISSED'}")
    return ok


def finish_times(server: Gunicorn, jobs: dict[str, str], started: float) -> dict[str, float]:
    """Seconds from submission until each key's job ended."""
    ended: dict[str, float] = {}
    while len(ended) < len(jobs):
        for name, job_id in jobs.items():
            if name not in ended and job(server, job_id)["finished_at"] is not None:
                ended[name] = time.monotonic() - started
        time.sleep(0.25)
    return ended


def created_by_key(sim: Simulator, moment: float) -> dict[str, int]:
    """Predictions created per key (prompt prefix a or b) up to `moment` of the sim clock:
    each create is a slot the shared line granted."""
    counts = {"a": 0, "b": 0}
    for prediction in sim.predictions(TOKEN):
        prompt = str(prediction["input"].get("prompt", ""))
        if prediction["created_at_clock"] <= moment and prompt[:1] in counts:
            counts[prompt[0]] += 1
    return counts


def one_race(workload: Workload, weights: tuple[float, float]) -> tuple[dict[str, float],
                                                                          dict[str, int]]:
    with running(workload) as (sim, servers):
        keys = {"a": mint(servers[0], "a", weights[0]), "b": mint(servers[0], "b", weights[1])}
        entry = {"a": servers[0], "b": servers[-1]}  # two instances: one key on each
        started = time.monotonic()
        jobs: dict[str, str] = {}
        threads = [threading.Thread(target=lambda n=n: jobs.update(
            {n: submit(entry[n], keys[n], n, workload.items)})) for n in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ended = finish_times(servers[0], jobs, started)
        first = min(ended, key=lambda name: ended[name])
        # Both keys wait for slots until the first one's last create: count the grants till then.
        window_end = max(p["created_at_clock"] for p in sim.predictions(TOKEN)
                         if str(p["input"]["prompt"]).startswith(first))
        both = created_by_key(sim, window_end)
    return ended, both


def weights(workload: Workload) -> bool:
    where = ("one service, SQLite" if workload.instances == 1 else
             f"{workload.instances} services on Redis + PostgreSQL")
    print(f"weights: limit {workload.limit}, {workload.items} items per key, run times "
          f"{workload.run_seconds:g}-{workload.run_seconds + workload.spread:g} s, {where}")
    ended, _ = one_race(workload, (1.0, 1.0))
    gap = abs(ended["a"] - ended["b"]) / max(ended.values())
    equal_ok = gap <= 0.05
    print(f"  1:1  finished a {ended['a']:.1f} s, b {ended['b']:.1f} s: gap {gap:.1%} "
          f"(goal <= 5 %) -> {'met' if equal_ok else 'MISSED'}")
    ended, both = one_race(workload, (3.0, 1.0))
    ratio = both["a"] / max(1, both["b"])
    weighted_ok = abs(ratio - 3.0) / 3.0 <= 0.10
    print(f"  3:1  slots granted while both waited: a {both['a']}, b {both['b']}: ratio "
          f"{ratio:.2f} (goal 3 +- 10 %) -> {'met' if weighted_ok else 'MISSED'}; finished a "
          f"{ended['a']:.1f} s, b {ended['b']:.1f} s")
    return equal_ok and weighted_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("priority", "weights", "all"))
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args()
    results = []
    if args.scenario in ("priority", "all"):
        results.append(priority(Workload(limit=args.limit or 10, items=args.items or 1000,
                                         calls=args.calls, run_seconds=0.8, spread=0.4)))
    if args.scenario in ("weights", "all"):
        results.append(weights(Workload(limit=args.limit or 60, items=args.items or 1000,
                                        instances=args.instances)))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
