"""Hostile load against the real service (gunicorn) and the shipped proxy (issue #10).

Everything runs on 127.0.0.1 against the bundled simulator and stops by itself. It measures what
the service does today and prints it (nothing is asserted):

* storage: one async batch of N prompts (default 1,000) sharing one ~100 KB data: input_image;
  the state file's growth (main file + WAL) per item, after the 202 and once the job ends;
* memory: worker RSS after T distinct tokens (default 10,000) each made one quick /generate;
* fairness: a bystander's 20 sequential /generate while another account, whose token the
  simulator rejects, floods the queue with async batches;
* slow clients: /health latency (p50/p95/max) through edge/nginx.conf while 200 clients hold
  half-sent request lines, and how many of them reached gunicorn.

    .venv/bin/python bench/hostile.py                   # the figures above
    .venv/bin/python bench/hostile.py --tokens 1000     # scaled down
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from servers import Gunicorn  # noqa: E402
from test_proxy import (  # noqa: E402
    Nginx,
    established_to,
    health_latencies,
    nginx_binary,
    percentile,
    slow_clients,
)

SERVER_TOKEN = "r8_bench_server_tok"  # noqa: S105 - only the simulator accepts it
ADMIN = {"X-Admin-API-Key": "bench-admin-key-0123456789"}
FLOODER_TOKEN = "r8_bench_flooder_tk"  # noqa: S105 - the simulator rejects it (401)
BYSTANDER_TOKEN = "r8_bench_bystander"  # noqa: S105
TERMINAL = ("succeeded", "partially_failed", "failed", "canceled")


# --------------------------------------------------------------------------- set-up


def start_simulator() -> Simulator:
    """Fast predictions and no simulator-side rate limit: the service's limits are measured."""
    sim = Simulator(SimConfig(run_seconds=0.02, queue_seconds=0.0,
                              create_rate_per_minute=1e6, create_burst=1_000_000,
                              other_rate_per_minute=1e6, other_burst=1_000_000,
                              invalid_tokens={FLOODER_TOKEN}))
    sim.start()
    return sim


def start_service(sim: Simulator, work: Path) -> Gunicorn:
    """The service at its defaults, except create limits high enough to finish in seconds."""
    env = {"REPLICATE_API_TOKEN": SERVER_TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN["X-Admin-API-Key"],
           "REPLICATE_BASE_URL": sim.base_url, "OUTPUT_DIR": str(work / "output"),
           "STATE_FILE": str(work / "state.sqlite3"), "REPLICATE_REQUESTS_PER_MINUTE": "60000",
           "REPLICATE_CREATE_BURST": "1000", "REPLICATE_POLLS_PER_MINUTE": "100000",
           "POLL_INTERVAL_SECONDS": "0.2", "LOG_LEVEL": "WARNING"}
    server = Gunicorn(env, work / "gunicorn.log")
    server.wait_ready()
    return server


def wait_terminal(server: Gunicorn, job_id: str, headers: dict[str, str],
                  limit: float) -> dict[str, Any]:
    """Poll a job until it ends or `limit` seconds pass; the last view either way."""
    deadline = time.monotonic() + limit
    while True:
        job: dict[str, Any] = requests.get(f"{server.url}/jobs/{job_id}", headers=headers,
                                           timeout=60).json()
        if job.get("state") in TERMINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


# --------------------------------------------------------------------------- storage


def state_bytes(work: Path) -> int:
    """The state file plus its write-ahead log (where fresh writes sit until a checkpoint)."""
    return sum(p.stat().st_size for p in work.glob("state.sqlite3*") if not p.name.endswith("-shm"))


def data_uri(kilobytes: int) -> str:
    """A data: URI of about `kilobytes` KB (random bytes, so nothing compresses it away)."""
    raw = os.urandom(kilobytes * 1024 * 3 // 4)
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def measure_storage(server: Gunicorn, work: Path, items: int, kilobytes: int) -> None:
    image = data_uri(kilobytes)
    body = {"model_name": "flux-kontext-max", "input_image": image,
            "prompts": [f"shared input {i}" for i in range(items)]}
    before = state_bytes(work)
    response = requests.post(server.url + "/generate-batch", json=body, timeout=600,
                             headers={**ADMIN, "Prefer": "respond-async"})
    if response.status_code != 202:
        print(f"storage: batch refused {response.status_code}: {response.text[:300]}")
        return
    stored = state_bytes(work) - before
    job = wait_terminal(server, response.json()["id"], ADMIN, limit=300)
    done = state_bytes(work) - before
    print(f"storage: {items} items sharing one {len(image) / 1024:.0f} KB data: input_image "
          f"(body {len(response.request.body or b'') / 1e6:.1f} MB)")
    print(f"  after 202: state grew {stored / 1e6:.1f} MB = {stored / items / 1024:.1f} KB/item")
    print(f"  job {job.get('state')} {job.get('counts')}: state grew {done / 1e6:.1f} MB = "
          f"{done / items / 1024:.1f} KB/item")


# --------------------------------------------------------------------------- memory per token


def worker_pids(server: Gunicorn) -> list[int]:
    path = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers_rss(server: Gunicorn) -> list[float]:
    return [rss_mib(pid) for pid in worker_pids(server)]


def one_quick_generate(server: Gunicorn, index: int) -> bool:
    token = f"r8_bench_tok_{index:07d}"
    try:
        response = requests.post(server.url + "/generate", timeout=120,
                                 headers={"X-Replicate-API-Key": token},
                                 json={"model_name": "flux-dev", "prompt": f"token {index}"})
    except requests.RequestException:
        return False
    return response.status_code == 200


def measure_token_memory(server: Gunicorn, tokens: int) -> None:
    before = workers_rss(server)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        ok = sum(pool.map(lambda i: one_quick_generate(server, i), range(tokens)))
    elapsed = time.monotonic() - started
    after = workers_rss(server)
    held = requests.get(server.url + "/status", headers=ADMIN, timeout=30).json().get("process")
    grown = sum(after) - sum(before)
    print(f"memory: {tokens} distinct tokens, one /generate each ({ok} ok, {elapsed:.0f} s)")
    print(f"  worker RSS before {fmt_mib(before)}, after {fmt_mib(after)}: "
          f"+{grown:.1f} MiB = {grown * 1024 * 1024 / max(1, tokens):.0f} B/token")
    print(f"  /status process (admin): {held}")


def fmt_mib(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "] MiB"


# --------------------------------------------------------------------------- fairness


class Flooder:
    """Async batches with a token Replicate rejects, sent as fast as the service takes them."""

    def __init__(self, server: Gunicorn, batch: int) -> None:
        self.server = server
        self.batch = batch
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.statuses

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set() and sent < 500:
            sent += 1
            status = self._submit(sent)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 429:
                self._stop.wait(0.2)

    def _submit(self, number: int) -> int:
        body = {"model_name": "flux-dev",
                "prompts": [f"flood {number}-{i}" for i in range(self.batch)]}
        try:
            return requests.post(self.server.url + "/generate-batch", json=body, timeout=60,
                                 headers={"X-Replicate-API-Key": FLOODER_TOKEN,
                                          "Prefer": "respond-async"}).status_code
        except requests.RequestException:
            return 0


def bystander_requests(server: Gunicorn, count: int) -> list[tuple[bool, float]]:
    results = []
    for i in range(count):
        started = time.monotonic()
        try:
            ok = requests.post(server.url + "/generate", timeout=120,
                               headers={"X-Replicate-API-Key": BYSTANDER_TOKEN},
                               json={"model_name": "flux-dev",
                                     "prompt": f"bystander {i}"}).status_code == 200
        except requests.RequestException:
            ok = False
        results.append((ok, time.monotonic() - started))
    return results


def measure_fairness(server: Gunicorn, batch: int, count: int) -> None:
    flooder = Flooder(server, batch)
    flooder.start()
    time.sleep(3)  # let the flood build a queue first
    results = bystander_requests(server, count)
    statuses = flooder.stop()
    latencies = [seconds for _, seconds in results]
    ok = sum(1 for good, _ in results if good)
    print(f"fairness: bystander {ok}/{count} /generate succeeded "
          f"({100 * ok / count:.0f} %), latency p50 {statistics.median(latencies):.2f} s "
          f"max {max(latencies):.2f} s")
    print(f"  flooder: batches of {batch} with a rejected token, answers {statuses}")


# --------------------------------------------------------------------------- slow clients


def measure_slow_clients(server: Gunicorn, work: Path, count: int) -> None:
    binary = nginx_binary()
    if binary is None:
        print("slow clients: skipped, nginx is not installed (apt-get install -y nginx)")
        return
    nginx = Nginx(binary, work / "nginx", server.port)
    try:
        nginx.wait_ready()
        with slow_clients(nginx.port, count):
            latencies = health_latencies(nginx.url, 100)
            reached = established_to(server.port)
    finally:
        nginx.stop()
    print(f"slow clients: {count} half request lines held through edge/nginx.conf; "
          f"{reached} connections reached gunicorn")
    p50, p95 = (1000 * percentile(latencies, q) for q in (0.5, 0.95))
    print(f"  /health x{len(latencies)} through the proxy: p50 {p50:.1f} ms  p95 {p95:.1f} ms  "
          f"max {1000 * max(latencies):.1f} ms  failed {latencies.count(math.inf)}")


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000, help="prompts in the shared batch")
    parser.add_argument("--input-kb", type=int, default=100, help="size of the shared data: URI")
    parser.add_argument("--tokens", type=int, default=10_000, help="distinct tokens")
    parser.add_argument("--flood-batch", type=int, default=200, help="prompts per flood batch")
    parser.add_argument("--bystander", type=int, default=20, help="bystander requests")
    parser.add_argument("--slow-clients", type=int, default=200)
    return parser.parse_args()


def timed(name: str, step: Callable[[], None]) -> None:
    started = time.monotonic()
    step()
    print(f"  ({name}: {time.monotonic() - started:.0f} s)", flush=True)


def main() -> None:
    args = parse_args()
    sim = start_simulator()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_service(sim, work)
        try:
            timed("storage", lambda: measure_storage(server, work, args.items, args.input_kb))
            timed("memory", lambda: measure_token_memory(server, args.tokens))
            timed("fairness", lambda: measure_fairness(server, args.flood_batch, args.bystander))
            timed("slow clients", lambda: measure_slow_clients(server, work, args.slow_clients))
        finally:
            server.stop()
            sim.stop()


if __name__ == "__main__":
    main()
