"""Does retention keep up with the fastest the service lets jobs be made (issue #20, finding 2)?

Everything runs on 127.0.0.1 against the bundled simulator and stops by itself; figures are
printed, nothing is asserted:

* created: jobs/s the real service (gunicorn, its default workers) accepts from C clients
  sending one-item async batches for S seconds with their own (verified) tokens;
* purged: jobs/s the maintenance pass removes (rows and output files) once they are past their
  retention (the same state file, in this process), and the state file's size before and
  after (space given back to the disk).

    .venv/bin/python bench/retention.py                        # 16 clients, 15 s
    .venv/bin/python bench/retention.py --clients 32 --seconds 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from replicate_generation.app import create_app  # noqa: E402
from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from replicate_generation.settings import Settings  # noqa: E402
from servers import Gunicorn  # noqa: E402

SERVER_TOKEN = "r8_bench_server_tok"  # noqa: S105 - only the simulator accepts it
ADMIN_KEY = "bench-admin-key-0123456789"
RETENTION_S = 60


def start_service(sim: Simulator, work: Path) -> Gunicorn:
    env = {"REPLICATE_API_TOKEN": SERVER_TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY,
           "REPLICATE_BASE_URL": sim.base_url, "OUTPUT_DIR": str(work / "output"),
           "STATE_FILE": str(work / "state.sqlite3"), "REPLICATE_REQUESTS_PER_MINUTE": "60000",
           "REPLICATE_CREATE_BURST": "1000", "REPLICATE_POLLS_PER_MINUTE": "100000",
           "POLL_INTERVAL_SECONDS": "0.2", "LOG_LEVEL": "WARNING",
           "JOB_RETENTION_SECONDS": str(RETENTION_S)}
    server = Gunicorn(env, work / "gunicorn.log")
    server.wait_ready()
    return server


def create_for(server: Gunicorn, clients: int, seconds: float) -> int:
    """Jobs accepted (202) from `clients` threads, each its own account, for `seconds`."""
    accepted = [0] * clients
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        session = requests.Session()
        headers = {"X-Replicate-API-Key": f"r8_bench_client_{index:04d}",
                   "Prefer": "respond-async"}
        while time.monotonic() < stop:
            response = session.post(server.url + "/generate-batch", timeout=60, headers=headers,
                                    json={"model_name": "flux-dev", "prompts": ["quick"]})
            accepted[index] += response.status_code == 202

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(accepted)


def purge(work: Path, sim: Simulator) -> None:
    """Every job is past its retention once the clock is moved on: time the passes."""
    state = work / "state.sqlite3"
    settings = Settings(replicate_api_token=SERVER_TOKEN, admin_api_key=ADMIN_KEY,
                        replicate_base_url=sim.base_url, output_dir=work / "output",
                        state_file=state, job_retention_seconds=RETENTION_S)
    runner = create_app(settings).extensions["jobs"]
    size = state.stat().st_size
    later = time.time() + RETENTION_S + 60
    started, removed, passes = time.monotonic(), 0, 0
    while True:
        # As the maintenance thread does: a pass within its budget, again while a backlog is left.
        found = runner.maintenance.purge_expired(later, budget=2.0)
        removed, passes = removed + found, passes + 1
        if found == 0:
            break
    took = time.monotonic() - started
    after, wal = state.stat().st_size, Path(f"{state}-wal").stat().st_size
    print(f"purged:  {removed} jobs in {took:.2f} s over {passes} passes = "
          f"{removed / took:.0f} jobs/s (their output files included)")
    print(f"state file: {size / 1e6:.2f} MB before the purge, {after / 1e6:.2f} MB after "
          f"(WAL {wal / 1e6:.2f} MB, cut back to at most 64 MB at its next reset)")
    runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    sim = Simulator(SimConfig(run_seconds=0.01, queue_seconds=0.0,
                              create_rate_per_minute=1e6, create_burst=1_000_000,
                              other_rate_per_minute=1e6, other_burst=1_000_000))
    sim.start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_service(sim, work)
        try:
            created = create_for(server, args.clients, args.seconds)
            print(f"created: {created} jobs in {args.seconds:.0f} s from {args.clients} "
                  f"clients = {created / args.seconds:.0f} jobs/s")
            time.sleep(5)  # the last jobs end
        finally:
            server.stop()
        purge(work, sim)
    sim.stop()


if __name__ == "__main__":
    main()
