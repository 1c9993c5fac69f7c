"""Memory per queued item: the real service (gunicorn, one worker) beside a plain client pool.

A job of N items is submitted while the account's limit (10) is full of predictions that do not
end, so N - 10 items wait. Printed: the worker's RSS growth per queued item once the job is
accepted. The baseline, in the same run, is what a user writes instead: a ThreadPoolExecutor of
10 threads with N `replicate.Client.run` calls submitted to it (a future and a closure per item),
in a process of its own so its RSS is its own. Goal (#22): under 2 KB per queued item, read as
the growth per item added between sizes (the first size also pays start-up costs).

    .venv/bin/python bench/queued_memory.py
    .venv/bin/python bench/queued_memory.py --items 1000 5000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from tests.servers import Gunicorn  # noqa: E402

TOKEN = "r8_bench_memory"  # noqa: S105 - only the simulator accepts it
ADMIN = {"X-Admin-API-Key": "bench-admin-key"}
LIMIT = 10
KIB = 1024

BASELINE = f"""
import os, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
import replicate
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
client = replicate.Client(api_token=sys.argv[1], base_url=sys.argv[2])
pool = ThreadPoolExecutor({LIMIT})
before = rss()
model = "black-forest-labs/flux-dev"
futures = [pool.submit(client.run, model, input={{"prompt": f"#hang b {{i}}"}})
           for i in range(int(sys.argv[3]))]
time.sleep(2)
print(rss() - before, flush=True)
os._exit(0)  # its threads wait on predictions that never end
"""


def worker_rss(server: Gunicorn) -> int:
    children = [int(c) for task in Path(f"/proc/{server.proc.pid}/task").glob("*/children")
                for c in task.read_text().split()]
    return sum(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
               for pid in children)


def in_flight(server: Gunicorn) -> int:
    totals = requests.get(f"{server.url}/status", headers=ADMIN, timeout=30).json()["totals"]
    return int(totals["in_flight"])


def service_growth(sim: Simulator, items: int) -> tuple[int, float]:
    """RSS growth of the worker and seconds to accept a job of `items` queued behind the limit."""
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        env = {"REPLICATE_API_TOKEN": TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN[
            "X-Admin-API-Key"], "REPLICATE_BASE_URL": sim.base_url,
            "OUTPUT_DIR": f"{tmp}/output", "STATE_FILE": f"{tmp}/state.sqlite3",
            "REPLICATE_CONCURRENT_LIMIT": str(LIMIT), "MAX_BATCH_SIZE": "100000",
            "MAX_REQUEST_BYTES": str(64 * 1024 * 1024), "TASK_TIMEOUT_SECONDS": "3600",
            "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "8", "LOG_LEVEL": "WARNING"}
        server = Gunicorn(env, Path(tmp) / "gunicorn.log")
        try:
            server.wait_ready()
            time.sleep(1)  # the worker's start-up allocations settle
            before = worker_rss(server)
            started = time.monotonic()
            answer = requests.post(f"{server.url}/generate-batch", headers=ADMIN, timeout=600,
                                   json={"model_name": "flux-dev", "async": True, "prompts": [
                                       f"#hang s {i}" for i in range(items)]})
            answer.raise_for_status()
            accepted = time.monotonic() - started
            while in_flight(server) < LIMIT:
                time.sleep(0.2)
            time.sleep(2)
            return worker_rss(server) - before, accepted
        finally:
            server.stop()


def baseline_growth(sim: Simulator, items: int) -> int:
    out = subprocess.run([sys.executable, "-c", BASELINE, "r8_bench_baseline", sim.base_url,
                          str(items)], capture_output=True, text=True, timeout=600, check=False)
    return int(out.stdout.split()[0]) if out.stdout.strip() else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 5000, 20000])
    args = parser.parse_args()
    sim = Simulator(SimConfig(run_seconds=0.05, queue_seconds=0.0, create_rate_per_minute=1e6,
                              create_burst=100_000, other_rate_per_minute=1e6,
                              other_burst=100_000))
    sim.start()
    print(f"limit {LIMIT}, predictions that never end; RSS growth once the job is queued; "
          "marginal = growth per item added since the previous size (fixed costs cancel)")
    print(f"{'items':>7}{'service KiB':>13}{'marginal B':>12}{'accept s':>10}"
          f"{'pool KiB':>11}{'marginal B':>12}{'ratio':>8}")
    slopes: list[float] = []
    previous = (0, 0, 0)
    try:
        for items in sorted(args.items):
            grown, accepted = service_growth(sim, items)
            pool = baseline_growth(sim, items)
            added = items - previous[0]
            slope, pool_slope = (grown - previous[1]) / added, (pool - previous[2]) / added
            if previous[0]:
                slopes.append(slope)
            print(f"{items:>7}{grown / KIB:>13.0f}{slope:>12.0f}{accepted:>10.2f}"
                  f"{pool / KIB:>11.0f}{pool_slope:>12.0f}"
                  f"{slope / max(1.0, pool_slope):>8.2f}", flush=True)
            previous = (items, grown, pool)
    finally:
        sim.stop()
    worst = max(slopes, default=float("inf"))
    ok = worst < 2 * KIB
    print(f"goal: under 2 KiB per queued item (marginal) -> {'met' if ok else 'MISSED'} "
          f"(worst {worst:.0f} B)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
