"""What reading jobs costs as they grow: the real service (gunicorn, SQLite), the simulator.

For jobs of N = 10, 100, 1,000, 5,000 items (each run to the end first, so every item carries its
result), prints GET /jobs/<id>'s bytes and latency (p50/p99 under a few concurrent callers) and
the time to walk every item with GET /jobs/<id>/items. Then, with 1,000 / 20,000 / 100,000 more
finished jobs written into the state file, the latency of the admin's GET /jobs (first and second
page) and of a /metrics scrape: flat when they read indexes and kept counts.

    .venv/bin/python bench/job_growth.py
    .venv/bin/python bench/job_growth.py --items 10 100 --stored 1000
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from servers import Gunicorn  # noqa: E402

TOKEN = "r8_bench_token"  # noqa: S105 - only the simulator accepts it
ADMIN = {"X-Admin-API-Key": "bench-admin-key"}
CALLERS = 4  # concurrent readers while latency is measured


def start_service(sim: Simulator, work: Path) -> Gunicorn:
    env = {"REPLICATE_API_TOKEN": TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN["X-Admin-API-Key"],
           "REPLICATE_BASE_URL": sim.base_url, "OUTPUT_DIR": str(work / "output"),
           "STATE_FILE": str(work / "state.sqlite3"), "REPLICATE_CONCURRENT_LIMIT": "200",
           "REPLICATE_REQUESTS_PER_MINUTE": "100000", "REPLICATE_CREATE_BURST": "1000",
           "MAX_BATCH_SIZE": "20000", "MAX_QUEUED_TASKS_PER_ACCOUNT": "20000",
           "TASK_TIMEOUT_SECONDS": "600", "WEB_CONCURRENCY": "2",
           "GUNICORN_THREADS": "8", "LOG_LEVEL": "WARNING"}
    server = Gunicorn(env, work / "gunicorn.log")
    server.wait_ready()
    return server


def timed(requests_count: int, link: str) -> tuple[list[float], int]:
    """Latencies (ms) of `requests_count` GETs from CALLERS threads, and the last body's size."""
    sizes: list[int] = []

    def one(session: requests.Session) -> float:
        start = time.perf_counter()
        response = session.get(link, headers=ADMIN, timeout=30)
        elapsed = (time.perf_counter() - start) * 1000
        response.raise_for_status()
        sizes.append(len(response.content))
        return elapsed

    sessions = [requests.Session() for _ in range(CALLERS)]
    with ThreadPoolExecutor(CALLERS) as pool:
        latencies = list(pool.map(lambda i: one(sessions[i % CALLERS]), range(requests_count)))
    for session in sessions:
        session.close()
    return latencies, sizes[-1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def finished_job(url: str, items: int) -> str:
    response = requests.post(f"{url}/generate-batch", headers={**ADMIN, "Prefer": "respond-async"},
                             json={"model_name": "flux-dev",
                                   "prompts": [f"growth {items} item {i}" for i in range(items)]},
                             timeout=120)
    response.raise_for_status()
    job_id = str(response.json()["id"])
    while requests.get(f"{url}/jobs/{job_id}", headers=ADMIN, timeout=30).json()["state"] in (
            "queued", "running"):
        time.sleep(0.5)
    return job_id


def walk_seconds(url: str, job_id: str) -> tuple[float, int]:
    start, seen, link = time.perf_counter(), 0, f"/jobs/{job_id}/items?limit=500"
    while link:
        page = requests.get(url + link, headers=ADMIN, timeout=30).json()
        seen += len(page["data"])
        link = page["next"]
    return time.perf_counter() - start, seen


def job_table(url: str, sizes: list[int], reads: int) -> None:
    print(f"\nGET /jobs/<id> of a finished job ({reads} reads, {CALLERS} callers)")
    print(f"{'items':>7} {'bytes':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'walk s':>7}")
    for items in sizes:
        job_id = finished_job(url, items)
        start = time.perf_counter()
        latencies, size = timed(reads, f"{url}/jobs/{job_id}")
        rate = reads / (time.perf_counter() - start)
        walked, seen = walk_seconds(url, job_id)
        assert seen == items, (seen, items)
        print(f"{items:>7} {size:>8} {pct(latencies, 0.5):>8.1f} {pct(latencies, 0.99):>8.1f}"
              f" {rate:>7.0f} {walked:>7.2f}")


def store_finished_jobs(state_file: Path, count: int, first: int) -> None:
    """Finished one-item jobs written straight into the state file (what long use leaves)."""
    now = time.time()
    with sqlite3.connect(state_file, timeout=60) as conn:
        conn.executemany(
            "INSERT INTO jobs (id, account, kind, state, request_id, item_count, succeeded_items,"
            " created_at, finished_at) VALUES (?, 'acct_old', 'batch', 'succeeded', ?, 1, 1, ?, ?)",
            [(f"job_old{n:07d}", f"req_old{n}", now - 86400 + n * 1e-3, now - 86400 + n * 1e-3)
             for n in range(first, first + count)])
    conn.close()


def list_table(url: str, state_file: Path, stored: list[int], reads: int) -> None:
    print(f"\nlists and scrapes as jobs are kept ({reads} reads each, {CALLERS} callers), ms")
    print(f"{'jobs kept':>10} {'list p50':>9} {'list p99':>9} {'page2 p50':>10} "
          f"{'metrics p50':>12} {'metrics p99':>12}")
    kept = 0
    for total in stored:
        store_finished_jobs(state_file, total - kept, kept)
        kept = total
        second_page = url + requests.get(f"{url}/jobs?limit=20", headers=ADMIN,
                                         timeout=30).json()["next"]
        listed, _ = timed(reads, f"{url}/jobs?limit=20")
        second, _ = timed(reads, second_page)
        scraped, _ = timed(reads, f"{url}/metrics")
        print(f"{total:>10} {pct(listed, 0.5):>9.1f} {pct(listed, 0.99):>9.1f} "
              f"{statistics.median(second):>10.1f} {pct(scraped, 0.5):>12.1f} "
              f"{pct(scraped, 0.99):>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--stored", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    sim = Simulator(SimConfig(run_seconds=0.01, queue_seconds=0.0))
    sim.start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_service(sim, work)
        try:
            job_table(server.url, args.items, args.reads)
            list_table(server.url, work / "state.sqlite3", args.stored, args.reads)
        finally:
            server.stop()
            sim.stop()


if __name__ == "__main__":
    main()
