"""Throughput of a same-model batch through the real service (gunicorn) against the simulator.

Scenario `concurrency`: 600 items, 2 s per prediction, concurrency 60, rpm too high to bind.
Prints wall time, the ideal ceil(600/60) x 2 s, their ratio, and a baseline run side by side:
the same predictions made by a bare thread pool of 60 calling the replicate client directly
(no service, no limits store), so the ratio shows what the service itself costs.

Scenario `rpm`: rpm binding (default 120/min, burst 1); prints the achieved create rate against
the limit and the most creates the simulator saw in any rolling 60 s.

Scenario `storm`: the service is told 600/min but the simulator allows only --rpm (burst 5), so
every gain comes from the shared 429 back-off; prints wall time against the simulator's own pace
and how many creates were throttled.

    .venv/bin/python bench/batch_throughput.py concurrency
    .venv/bin/python bench/batch_throughput.py rpm --items 180
    .venv/bin/python bench/batch_throughput.py storm --rpm 120 --items 120
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import replicate

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from replicate_generation.devtools.simulator import SimConfig, Simulator  # noqa: E402
from servers import Gunicorn  # noqa: E402

TOKEN = "r8_bench_token"  # noqa: S105 - only the simulator accepts it
ADMIN_KEY = "bench-admin-key"


def start_service(sim: Simulator, work: Path, limit: int, rpm: int, burst: int) -> Gunicorn:
    env = {"REPLICATE_API_TOKEN": TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY,
           "REPLICATE_BASE_URL": sim.base_url, "OUTPUT_DIR": str(work / "output"),
           "STATE_FILE": str(work / "state.sqlite3"), "REPLICATE_CONCURRENT_LIMIT": str(limit),
           "REPLICATE_REQUESTS_PER_MINUTE": str(rpm), "REPLICATE_CREATE_BURST": str(burst),
           "TASK_TIMEOUT_SECONDS": "600", "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING"}
    server = Gunicorn(env, work / "gunicorn.log")
    server.wait_ready()
    return server


def run_batch(server: Gunicorn, items: int) -> tuple[float, dict[str, object]]:
    body = {"model_name": "flux-dev", "prompts": [f"bench item {i}" for i in range(items)]}
    started = time.monotonic()
    response = server.post("/generate-batch", body, {"X-Admin-API-Key": ADMIN_KEY}, timeout=3600)
    return time.monotonic() - started, response.json()


def serve_batch(sim: Simulator, items: int, limit: int, rpm: int,
                burst: int) -> tuple[float, dict[str, object]]:
    """Start the service with these limits, run one batch through it, stop it."""
    with tempfile.TemporaryDirectory() as tmp:
        server = start_service(sim, Path(tmp), limit, rpm=rpm, burst=burst)
        try:
            return run_batch(server, items)
        finally:
            server.stop()


def baseline(sim: Simulator, items: int, limit: int) -> float:
    """The same work with no service: a pool of `limit` threads, create then poll every 1 s."""
    client = replicate.Client(api_token=TOKEN + "_baseline", base_url=sim.base_url)

    def one(i: int) -> None:
        prediction = client.models.predictions.create(
            model="black-forest-labs/flux-dev", input={"prompt": f"baseline {i}"})
        while prediction.status not in ("succeeded", "failed", "canceled"):
            time.sleep(1.0)
            prediction = client.predictions.get(prediction.id)

    started = time.monotonic()
    with ThreadPoolExecutor(limit) as pool:
        list(pool.map(one, range(items)))
    return time.monotonic() - started


def concurrency(args: argparse.Namespace) -> None:
    sim = Simulator(SimConfig(run_seconds=args.run_seconds, queue_seconds=0.0,
                              create_rate_per_minute=1e6, create_burst=100000,
                              other_rate_per_minute=1e6, other_burst=100000))
    sim.start()
    wall, data = serve_batch(sim, args.items, args.limit, rpm=100000, burst=1000)
    ok = data.get("successful_count")
    base = baseline(sim, args.items, args.limit)
    ideal = math.ceil(args.items / args.limit) * args.run_seconds
    peak = sim.stats(TOKEN)["inflight_peak"]
    sim.stop()
    print(f"items={args.items} concurrency={args.limit} run={args.run_seconds}s ok={ok}")
    print(f"service wall={wall:.1f}s  ideal={ideal:.1f}s  ratio={wall / ideal:.2f}  "
          f"simulator in-flight peak={peak}")
    print(f"baseline (bare client, {args.limit} threads) wall={base:.1f}s  "
          f"ratio={base / ideal:.2f}  service/baseline={wall / base:.2f}")


def rpm(args: argparse.Namespace) -> None:
    sim = Simulator(SimConfig(run_seconds=args.run_seconds, queue_seconds=0.0))
    sim.start()
    wall, data = serve_batch(sim, args.items, args.limit, rpm=args.rpm, burst=1)
    times = sorted(sim.create_times(TOKEN))
    span = times[-1] - times[0]
    achieved = (len(times) - 1) / span * 60 if span > 0 else float("inf")
    print(f"items={args.items} ok={data.get('successful_count')} rpm limit={args.rpm} "
          f"wall={wall:.1f}s")
    print(f"achieved create rate={achieved:.1f}/min  ratio to limit={achieved / args.rpm:.3f}  "
          f"max creates in any 60 s={sim.max_creates_in_window(TOKEN, 60)}")
    sim.stop()


def storm(args: argparse.Namespace) -> None:
    """Replicate is stricter than we were told: the service learns it from 429s and backs off."""
    sim = Simulator(SimConfig(run_seconds=args.run_seconds, queue_seconds=0.0,
                              create_rate_per_minute=args.rpm, create_burst=5))
    sim.start()
    wall, data = serve_batch(sim, args.items, args.limit, rpm=600, burst=10)
    stats = sim.stats(TOKEN)
    ideal = max(0.0, (args.items - 5) / args.rpm * 60) + args.run_seconds
    print(f"items={args.items} ok={data.get('successful_count')} service rpm=600 "
          f"simulator allows {args.rpm}/min burst 5")
    print(f"wall={wall:.1f}s  ideal at the simulator's rate={ideal:.1f}s  "
          f"ratio={wall / ideal:.2f}  creates accepted={stats['creates_accepted']}  "
          f"throttled={stats['creates_throttled']} "
          f"({stats['creates_throttled'] / max(1, stats['creates_accepted']):.2f} per accepted)")
    sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("concurrency", "rpm", "storm"))
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--run-seconds", type=float, default=2.0)
    args = parser.parse_args()
    if args.scenario == "concurrency":
        args.items = args.items or 600
        concurrency(args)
    elif args.scenario == "rpm":
        args.items = args.items or 180
        rpm(args)
    else:
        args.items = args.items or 120
        storm(args)


if __name__ == "__main__":
    main()
