"""One big async job through the real service (gunicorn) against the simulator.

Submits N items (default 1,000) as one `Prefer: respond-async` batch at the service's default
limits (60 in flight, 600 creates/min, burst 10) and prints:

* submit latency: the time until the 202 came back (the job is in the state file by then);
* time to complete against the ideal, max(ceil(N/60) x run, (N - burst) / rpm x 60 + run);
* the service's peak resident memory (master plus workers, sampled from /proc every 0.2 s);
* side by side, the same items through the synchronous route as the baseline.

    .venv/bin/python bench/async_job.py                 # 1,000 items, 2 s each
    .venv/bin/python bench/async_job.py --items 200 --no-baseline
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from servers import Gunicorn  # noqa: E402

TOKEN = "r8_bench_token"  # noqa: S105 - only the simulator accepts it
ADMIN = {"X-Admin-API-Key": "bench-admin-key"}


def start_service(sim: Simulator, work: Path, args: argparse.Namespace) -> Gunicorn:
    env = {"REPLICATE_API_TOKEN": TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN["X-Admin-API-Key"],
           "REPLICATE_BASE_URL": sim.base_url, "OUTPUT_DIR": str(work / "output"),
           "STATE_FILE": str(work / "state.sqlite3"),
           "REPLICATE_CONCURRENT_LIMIT": str(args.limit),
           "REPLICATE_REQUESTS_PER_MINUTE": str(args.rpm),
           "REPLICATE_CREATE_BURST": str(args.burst), "TASK_TIMEOUT_SECONDS": "600",
           "LOG_LEVEL": "WARNING"}
    server = Gunicorn(env, work / "gunicorn.log")
    server.wait_ready()
    return server


class RssSampler:
    """Peak RSS of a process and its children, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        pids = [self.pid]
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            children = []
        return pids + [int(c) for c in children]

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kib = max(self.peak_kib, sum(self._rss_kib(p) for p in self._pids()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def run_async(server: Gunicorn, items: int) -> tuple[float, float, dict[str, object]]:
    body = {"model_name": "flux-dev", "prompts": [f"async item {i}" for i in range(items)]}
    started = time.monotonic()
    response = requests.post(server.url + "/generate-batch", json=body,
                             headers={**ADMIN, "Prefer": "respond-async"}, timeout=120)
    submitted = time.monotonic() - started
    assert response.status_code == 202, response.text
    job_url = server.url + response.json()["status_url"]
    while True:
        job = requests.get(job_url, headers=ADMIN, timeout=60).json()
        if job["state"] in ("succeeded", "partially_failed", "failed", "canceled"):
            return submitted, time.monotonic() - started, job
        time.sleep(0.5)


def run_sync(server: Gunicorn, items: int) -> float:
    body = {"model_name": "flux-dev", "prompts": [f"sync item {i}" for i in range(items)]}
    started = time.monotonic()
    response = server.post("/generate-batch", body, ADMIN, timeout=3600)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--run-seconds", type=float, default=2.0)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    sim = Simulator(SimConfig(run_seconds=args.run_seconds, queue_seconds=0.0,
                              create_rate_per_minute=1e6, create_burst=100000,
                              other_rate_per_minute=1e6, other_burst=100000))
    sim.start()
    ideal = max(math.ceil(args.items / args.limit) * args.run_seconds,
                max(0, args.items - args.burst) / args.rpm * 60 + args.run_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_service(sim, Path(tmp), args)
        sampler = RssSampler(server.proc.pid)
        try:
            submitted, wall, job = run_async(server, args.items)
            peak = sampler.stop()
            base = None if args.no_baseline else run_sync(server, args.items)
        finally:
            server.stop()
    stats = sim.stats(TOKEN)
    print(f"items={args.items} limit={args.limit} rpm={args.rpm} burst={args.burst} "
          f"run={args.run_seconds}s state={job['state']} counts={job['counts']}")
    print(f"submit latency={submitted * 1000:.0f} ms  complete={wall:.1f}s  ideal={ideal:.1f}s  "
          f"ratio={wall / ideal:.2f}")
    print(f"service peak RSS (master + workers)={peak / 1024:.0f} MiB  "
          f"simulator in-flight peak={stats['inflight_peak']}  "
          f"max creates in any 60 s={sim.max_creates_in_window(TOKEN, 60)}")
    if base is not None:
        print(f"baseline: same items through the synchronous route={base:.1f}s  "
              f"async/sync={wall / base:.2f}")
    sim.stop()


if __name__ == "__main__":
    main()
