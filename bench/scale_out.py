"""Saturation across two service instances on Redis + PostgreSQL, beside one on SQLite (issue #14).

One simulator, two accounts (tokens), one after the other so the sides do not share the 2 cores:

* `sqlite`: one instance (2 gunicorn workers), limits and jobs in its state file;
* `2 hosts`: two instances (2 workers each, separate working directories and state files) that
  share only Redis (limits), PostgreSQL (jobs) and the output directory; the items are split
  over both as concurrent batches.

Each side: 600 flux-dev items, concurrency 60 for the account, run times 1.5 + 1.0*u s (about
2 s, varied per prompt and seed so nothing lines up with our intervals). Efficiency = ideal /
wall, the ideal being the list-scheduling makespan of the run times the simulator used on 60
slots. Goal: >= 0.95 across two instances, and the simulator's in-flight peak <= 60.

    .venv/bin/python bench/scale_out.py [--items 600] [--limit 60]

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (a private key prefix and a
throw-away database are used and removed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.batch_throughput import (  # noqa: E402
    ADMIN_KEY,
    SIDE_HEADER,
    Scenario,
    Side,
    post_batch,
    read_side,
    running_simulator,
    side_row,
    split,
)
from replicate_generation.devtools.simulator import Simulator  # noqa: E402
from replicate_generation.settings import Settings  # noqa: E402
from tests.servers import Gunicorn, service_env  # noqa: E402
from tests.shared_backends import REDIS_URL, postgres_database, redis_prefix  # noqa: E402

SQLITE_TOKEN = "r8_bench_scale_sqlite"  # noqa: S105 - only the simulator accepts it
SHARED_TOKEN = "r8_bench_scale_shared"  # noqa: S105 - only the simulator accepts it
TARGET = 0.95


def settings_for(sim: Simulator, work: Path, output: Path, token: str, sc: Scenario,
                 **backends: str) -> Settings:
    return Settings(replicate_api_token=token, admin_api_key=ADMIN_KEY,
                    replicate_base_url=sim.base_url, output_dir=output,
                    state_file=work / "state.sqlite3", concurrent_limit=sc.limit,
                    requests_per_minute=sc.rpm, create_burst=sc.burst,
                    task_timeout_seconds=600.0, **backends)  # type: ignore[arg-type]


@contextmanager
def instances(settings: list[Settings], workers: int) -> Iterator[list[Gunicorn]]:
    """Each settings as its own gunicorn group, started together and stopped afterwards."""
    servers = []
    try:
        for one in settings:
            one.state_file.parent.mkdir(parents=True, exist_ok=True)
            env = {**service_env(one, workers), "LOG_LEVEL": "WARNING"}
            servers.append(Gunicorn(env, one.state_file.parent / "gunicorn.log"))
        for server in servers:
            server.wait_ready(timeout=60)
            server.wait_workers(workers)
        yield servers
    finally:
        for server in servers:
            server.stop()


def saturate(servers: list[Gunicorn], prompts: list[str], per_server: int) -> tuple[int, float]:
    """Split the prompts into batches spread over the servers; (succeeded, wall seconds)."""
    chunks = split(prompts, per_server * len(servers))
    targets = [servers[i % len(servers)] for i in range(len(chunks))]
    started = time.monotonic()
    with ThreadPoolExecutor(len(chunks)) as pool:
        ok = sum(pool.map(post_batch, targets, chunks))
    return ok, time.monotonic() - started


def run_side(sim: Simulator, sc: Scenario, label: str, token: str, hosts: int,
             tmp: Path, **backends: str) -> Side:
    output = tmp / label / "output"
    settings = [settings_for(sim, tmp / label / f"host{i}", output, token, sc, **backends)
                for i in range(hosts)]
    prompts = [f"bench scale {label} item {i}" for i in range(sc.items)]
    with instances(settings, sc.workers) as servers:
        ok, wall = saturate(servers, prompts, per_server=2)
    return read_side(sim, token, sc, label, ok, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--limit", type=int, default=60)
    args = parser.parse_args()
    sc = Scenario("scale", items=args.items, limit=args.limit, run_seconds=1.5, spread=1.0)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        prefix = stack.enter_context(redis_prefix())
        database = stack.enter_context(postgres_database())
        sim = stack.enter_context(running_simulator(sc))
        sides = [run_side(sim, sc, "sqlite", SQLITE_TOKEN, 1, tmp),
                 run_side(sim, sc, "2 hosts", SHARED_TOKEN, 2, tmp, redis_url=REDIS_URL,
                          redis_key_prefix=prefix, database_url=database)]
    print(f"== scale: {sc.items} items per side, concurrency {sc.limit}, {sc.workers} workers "
          f"per instance, run {sc.run_seconds:g}+{sc.spread:g}*u s")
    print(SIDE_HEADER)
    for side in sides:
        print(side_row(side))
    shared = sides[1]
    ratio = shared.efficiency / sides[0].efficiency if sides[0].efficiency else 0.0
    print(f"2 hosts efficiency {shared.efficiency:.3f} (goal >= {TARGET}), "
          f"vs one SQLite instance {ratio:.3f}, in-flight peak {shared.inflight_peak} "
          f"(limit {sc.limit}), items ok {shared.ok}/{shared.items}")
    if shared.efficiency < TARGET or shared.inflight_peak > sc.limit or shared.ok != sc.items:
        sys.exit("goal missed")


if __name__ == "__main__":
    main()
