"""Throughput of same-model batches through the real service (gunicorn) against the simulator.

Every prediction gets its own run time (SimConfig.run_seconds_spread), deterministic per prompt
and seed, so nothing lines up with the service's poll or pacing intervals. The ideal of a run is
computed from the run times the simulator actually used (the service adds a random seed to each
item, so they differ from run to run): the list-scheduling makespan of those times, in creation
order, on `limit` slots with zero overhead, where no create may start before the rpm allows
(GCRA release times; this is the rpm floor). Efficiency is ideal / wall. The ideal counts
prediction time only: downloading outputs (20 MB each in `memory`) is overhead. The service is
measured once every worker answers (a worker still booting would share the 2 cores with the
first wave), as a service that has been up for a while would be.

Each scenario but `memory` also runs a baseline in the same run, against the same simulator (its
own token), after the service (one at a time, so the two do not share the 2 cores):
what a user would write instead, a pool of `limit` threads calling replicate.Client.run with the
client's defaults (Prefer: wait, 0.5 s polls, FileOutput) and reading every output. Nothing paces
it: against `rpm` it ignores the limit (efficiency above 1), in `storm` it retries a 429 after 1 s.
Columns: polls/pr = GET /v1/predictions/{id} per prediction, held = creates sent with Prefer: wait,
peak = the simulator's in-flight peak for the token, cr/min = accepted creates per minute after the
burst, max60s = most accepted creates in any rolling 60 s.

Scenarios (one subcommand each; `all` runs them in sequence and prints every goal):

    .venv/bin/python bench/batch_throughput.py concurrency  # 600 items, 60 slots, 1-3 s runs
    .venv/bin/python bench/batch_throughput.py together     # 600 items, 60 slots, all 2.03 s
    .venv/bin/python bench/batch_throughput.py small        # 40 items, 5 slots, ~1 s runs
    .venv/bin/python bench/batch_throughput.py rpm          # 120/min, burst 1, 180 items
    .venv/bin/python bench/batch_throughput.py storm        # told 600/min, Replicate allows 120
    .venv/bin/python bench/batch_throughput.py memory       # 60 x 20 MB outputs in flight
    .venv/bin/python bench/batch_throughput.py all
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import replicate
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from replicate_generation.devtools.simulator import SimConfig, Simulator, token_hash  # noqa: E402
from replicate_generation.settings import Settings  # noqa: E402
from tests.servers import Gunicorn, service_env  # noqa: E402

TOKEN = "r8_bench_service"  # noqa: S105 - only the simulator accepts it
BASELINE_TOKEN = "r8_bench_baseline"  # noqa: S105 - only the simulator accepts it
ADMIN_KEY = "bench-admin-key"
MODEL_ID, MODEL_REF = "flux-dev", "black-forest-labs/flux-dev"
# GET /v1/predictions/{id}: a poll (the listing and /cancel are not).
POLL_PATH = re.compile(r"^/v1/predictions/[^/]+$")
CREATE_PATH = re.compile(r"^/v1/(?:models/[^/]+/[^/]+/)?predictions$")
MIB = 1024 * 1024
UNBOUND_RPM, UNBOUND_BURST = 100_000, 100  # the service's rpm when it must not bind


@dataclass(frozen=True)
class Scenario:
    """One workload: what the service is told, what the simulator enforces, how it is sent."""

    name: str
    items: int
    limit: int
    run_seconds: float
    spread: float
    workers: int = 2
    requests: int = 1  # concurrent /generate-batch requests the items are split over
    rpm: int = UNBOUND_RPM  # what the service is configured with
    burst: int = UNBOUND_BURST
    sim_rpm: float | None = None  # what the simulator enforces (None: nothing)
    sim_burst: int = 0
    output_bytes: int = 0
    baseline: bool = True
    sample_rss: bool = False


PRESETS: dict[str, Scenario] = {
    "concurrency": Scenario("concurrency", items=600, limit=60, run_seconds=1.0, spread=2.0,
                            requests=4),
    # Every wave's 60 predictions end at the same moment (2.03 s: no multiple of our intervals).
    "together": Scenario("together", items=600, limit=60, run_seconds=2.03, spread=0.0,
                         requests=4),
    "small": Scenario("small", items=40, limit=5, run_seconds=0.8, spread=0.4),
    "rpm": Scenario("rpm", items=180, limit=60, run_seconds=0.3, spread=0.4, rpm=120, burst=1),
    "storm": Scenario("storm", items=120, limit=60, run_seconds=0.3, spread=0.4, rpm=600,
                      burst=10, sim_rpm=120, sim_burst=5),
    "memory": Scenario("memory", items=60, limit=60, run_seconds=1.0, spread=1.0,
                       output_bytes=20_000_000, baseline=False, sample_rss=True),
}


@dataclass
class Side:
    """What one side (service or baseline) achieved, read back from the simulator."""

    label: str
    ok: int
    items: int
    wall: float
    ideal: float
    polls: int
    creates: int
    throttled: int
    held: int  # creates sent with a Prefer: wait header
    inflight_peak: int
    create_rate: float  # accepted creates per minute after the burst
    max_in_60s: int
    rss_mib: float | None = None
    cpu_ms_per_item: float | None = None  # the service's processes, or the baseline's threads

    @property
    def efficiency(self) -> float:
        return self.ideal / self.wall if self.wall > 0 else 0.0

    @property
    def polls_per_prediction(self) -> float:
        return self.polls / max(1, self.creates)


@dataclass(frozen=True)
class Goal:
    scenario: str
    what: str
    value: str
    target: str
    met: bool | None  # None: reported, no goal


@dataclass
class Report:
    scenario: Scenario
    sides: list[Side] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)


# --------------------------------------------------------------------------- ideal


def release_times(count: int, per_minute: float | None, burst: int) -> list[float]:
    """Earliest start of each create under GCRA (burst at once, then one per interval)."""
    if per_minute is None:
        return [0.0] * count
    interval = 60.0 / per_minute
    return [max(0, i - burst + 1) * interval for i in range(count)]


def list_schedule(durations: list[float], slots: int, releases: list[float]) -> float:
    """Greedy makespan: each prediction, in order, takes the slot that frees first."""
    free = [0.0] * slots
    end = 0.0
    for duration, release in zip(durations, releases, strict=True):
        start = max(heapq.heappop(free), release)
        heapq.heappush(free, start + duration)
        end = max(end, start + duration)
    return end


def flight_times(sim: Simulator, token: str) -> list[float]:
    """Seconds each prediction was in flight (created to completed), in creation order."""
    preds = sorted(sim.predictions(token), key=lambda p: p["created_at_clock"])
    return [p["completed_at_clock"] - p["created_at_clock"] for p in preds
            if p["completed_at_clock"] is not None]


def pace(sc: Scenario) -> tuple[float | None, int]:
    """The create pace that binds: the stricter of the service's and the simulator's."""
    candidates = [(float(sc.rpm), sc.burst)]
    if sc.sim_rpm is not None:
        candidates.append((sc.sim_rpm, sc.sim_burst))
    rate, burst = min(candidates)
    return (None, 0) if rate >= UNBOUND_RPM else (rate, burst)


def ideal_of(sim: Simulator, token: str, sc: Scenario) -> float:
    durations = flight_times(sim, token)
    rate, burst = pace(sc)
    return list_schedule(durations, sc.limit, release_times(len(durations), rate, burst))


# --------------------------------------------------------------------------- simulator reads


def request_counts(sim: Simulator, token: str) -> tuple[int, int]:
    """(polls, creates sent with Prefer: wait) of one token, from the request log."""
    key = token_hash(token)
    polls = held = 0
    for entry in sim.requests_log():
        if entry["token_hash"] != key:
            continue
        if entry["method"] == "GET" and POLL_PATH.match(entry["path"]):
            polls += 1
        elif entry["method"] == "POST" and CREATE_PATH.match(entry["path"]) and entry["prefer"]:
            held += 1
    return polls, held


def create_rate(sim: Simulator, token: str, burst: int) -> float:
    """Accepted creates per minute after the first `burst` (which may all land at once)."""
    times = sorted(sim.create_times(token))
    span = times[-1] - times[0] if times else 0.0
    return (len(times) - max(1, burst)) / span * 60 if span > 0 else float("inf")


def read_side(sim: Simulator, token: str, sc: Scenario, label: str, ok: int,
              wall: float) -> Side:
    stats = sim.stats(token)
    polls, held = request_counts(sim, token)
    _, burst = pace(sc)
    return Side(label=label, ok=ok, items=sc.items, wall=wall, ideal=ideal_of(sim, token, sc),
                polls=polls, creates=stats["creates_accepted"],
                throttled=stats["creates_throttled"], held=held,
                inflight_peak=stats["inflight_peak"], create_rate=create_rate(sim, token, burst),
                max_in_60s=sim.max_creates_in_window(token, 60))


# --------------------------------------------------------------------------- service side


def settings_for(sim: Simulator, work: Path, sc: Scenario) -> Settings:
    return Settings(replicate_api_token=TOKEN, admin_api_key=ADMIN_KEY,
                    replicate_base_url=sim.base_url, output_dir=work / "output",
                    state_file=work / "state.sqlite3", concurrent_limit=sc.limit,
                    requests_per_minute=sc.rpm, create_burst=sc.burst,
                    task_timeout_seconds=600.0)


@contextmanager
def running_service(sim: Simulator, sc: Scenario) -> Iterator[Gunicorn]:
    """A gunicorn service in a temp dir, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        # WARNING, not service_env's DEBUG: per-request debug lines would cost the run CPU.
        env = {**service_env(settings_for(sim, work, sc), sc.workers), "LOG_LEVEL": "WARNING"}
        server = Gunicorn(env, work / "gunicorn.log")
        try:
            server.wait_ready()
            server.wait_workers(sc.workers)
            yield server
        finally:
            server.stop()


def post_batch(server: Gunicorn, prompts: list[str]) -> int:
    """Send one synchronous /generate-batch; return how many items succeeded."""
    body = {"model_name": MODEL_ID, "prompts": prompts}
    response = server.post("/generate-batch", body, {"X-Admin-API-Key": ADMIN_KEY}, timeout=3600)
    assert response.status_code == 200, response.text[:500]
    return int(response.json()["successful_count"])


def split(prompts: list[str], parts: int) -> list[list[str]]:
    size = -(-len(prompts) // parts)
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def send_batches(server: Gunicorn, prompts: list[str], parts: int) -> tuple[int, float]:
    """Send the prompts as `parts` concurrent batches; return (succeeded, wall seconds)."""
    started = time.monotonic()
    with ThreadPoolExecutor(parts) as pool:
        ok = sum(pool.map(lambda chunk: post_batch(server, chunk), split(prompts, parts)))
    return ok, time.monotonic() - started


def run_service(sim: Simulator, sc: Scenario, prompts: list[str]) -> Side:
    with running_service(sim, sc) as server:
        sampler = RssSampler(server.proc.pid) if sc.sample_rss else None
        tree = process_tree(server.proc.pid)
        cpu_before = cpu_seconds(tree)
        try:
            ok, wall = send_batches(server, prompts, sc.requests)
        finally:
            peak = sampler.stop() if sampler else None
        cpu = cpu_seconds(tree) - cpu_before
    side = read_side(sim, TOKEN, sc, "service", ok, wall)
    side.rss_mib = None if peak is None else peak / MIB
    side.cpu_ms_per_item = 1000 * cpu / max(1, len(prompts))
    return side


def process_tree(pid: int) -> list[int]:
    """The process and its children (gunicorn's master and workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue  # the thread ended between the glob and the read
    return [pid, *children]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds the processes have used (their own threads included)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak summed RSS of a process and its children, read from /proc every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        return process_tree(self.pid)

    @staticmethod
    def _rss_bytes(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass  # a worker that exited has no RSS left
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            total = sum(self._rss_bytes(p) for p in self._pids())
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


# --------------------------------------------------------------------------- baseline side


def read_outputs(client: replicate.Client, output: Any) -> int:
    """Download every output (what a user does next); return the bytes read."""
    files = output if isinstance(output, list) else [output]
    # The client wraps only https: URLs in FileOutput; the simulator's are http:, so wrap them
    # the same way to download through the client's own httpx pool, as against Replicate.
    return sum(len((FileOutput(f, client) if isinstance(f, str) else f).read()) for f in files)


def run_one(client: replicate.Client, prompt: str) -> bool:
    """client.run with its defaults; a 429 on create (never retried by the client) waits 1 s."""
    while True:
        try:
            read_outputs(client, client.run(MODEL_REF, input={"prompt": prompt}))
            return True
        except ReplicateError as exc:
            if exc.status != 429:
                return False
            time.sleep(1.0)


def run_baseline(sim: Simulator, sc: Scenario, prompts: list[str]) -> Side:
    client = replicate.Client(api_token=BASELINE_TOKEN, base_url=sim.base_url)
    cpu: list[float] = []  # per call, its own thread's CPU: the simulator's threads are apart

    def timed(prompt: str) -> bool:
        started_cpu = time.thread_time()
        try:
            return run_one(client, prompt)
        finally:
            cpu.append(time.thread_time() - started_cpu)

    started = time.monotonic()
    with ThreadPoolExecutor(sc.limit) as pool:
        ok = sum(pool.map(timed, prompts))
    side = read_side(sim, BASELINE_TOKEN, sc, "baseline", ok, time.monotonic() - started)
    side.cpu_ms_per_item = 1000 * sum(cpu) / max(1, len(prompts))
    return side


# --------------------------------------------------------------------------- scenarios


def sim_config(sc: Scenario) -> SimConfig:
    rate, burst = (1e6, 100_000) if sc.sim_rpm is None else (sc.sim_rpm, sc.sim_burst)
    return SimConfig(run_seconds=sc.run_seconds, run_seconds_spread=sc.spread,
                     queue_seconds=0.0, output_bytes=sc.output_bytes,
                     create_rate_per_minute=rate, create_burst=burst,
                     other_rate_per_minute=1e6, other_burst=100_000)


@contextmanager
def running_simulator(sc: Scenario) -> Iterator[Simulator]:
    sim = Simulator(sim_config(sc))
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def run_scenario(sc: Scenario) -> Report:
    """Service first, then the baseline, against one simulator (each with its own token)."""
    prompts = [f"bench {sc.name} item {i}" for i in range(sc.items)]
    report = Report(sc)
    with running_simulator(sc) as sim:
        report.sides.append(run_service(sim, sc, prompts))
        if sc.baseline:
            report.sides.append(run_baseline(sim, sc, prompts))
    report.goals = GOALS[sc.name](report)
    return report


def service(report: Report) -> Side:
    return report.sides[0]


def baseline(report: Report) -> Side | None:
    return report.sides[1] if len(report.sides) > 1 else None


def common_goals(report: Report) -> list[Goal]:
    sc, svc = report.scenario, service(report)
    return [Goal(sc.name, "service items ok", f"{svc.ok}/{svc.items}", "all", svc.ok == svc.items),
            Goal(sc.name, "service in-flight peak", str(svc.inflight_peak), f"<= {sc.limit}",
                 svc.inflight_peak <= sc.limit)]


def efficiency_goals(report: Report, target: float) -> list[Goal]:
    name, svc, base = report.scenario.name, service(report), baseline(report)
    goals = [Goal(name, "service efficiency", f"{svc.efficiency:.3f}", f">= {target}",
                  svc.efficiency >= target)]
    if base is not None:
        ratio = svc.efficiency / base.efficiency if base.efficiency else 0.0
        goals.append(Goal(name, "service/baseline efficiency", f"{ratio:.3f}",
                          ">= 1.0" if name in AHEAD else "report",
                          ratio >= 1.0 if name in AHEAD else None))
        goals.append(cpu_goal(name, svc, base))
    return goals


def cpu_goal(name: str, svc: Side, base: Side) -> Goal:
    """#22: the service's CPU per item within twice what the plain client pool spends."""
    ratio = (svc.cpu_ms_per_item or 0.0) / max(1e-9, base.cpu_ms_per_item or 0.0)
    return Goal(name, "service/baseline CPU per item", f"{ratio:.2f}", "<= 2.0", ratio <= 2.0)


def rpm_goals(report: Report) -> list[Goal]:
    sc, svc = report.scenario, service(report)
    ratio = svc.create_rate / sc.rpm
    return [Goal(sc.name, "achieved/configured create rate", f"{ratio:.3f}", ">= 0.97",
                 ratio >= 0.97),
            Goal(sc.name, "max creates in any 60 s", str(svc.max_in_60s),
                 f"<= {sc.rpm + sc.burst}", svc.max_in_60s <= sc.rpm + sc.burst)]


def baseline_limit_rows(report: Report) -> list[Goal]:
    """What the pool does to the account's limit: nothing paces it (reported, no goal)."""
    name, base = report.scenario.name, baseline(report)
    if base is None:
        return []
    return [Goal(name, "baseline max creates in any 60 s", str(base.max_in_60s), "report", None),
            Goal(name, "baseline 429s per accepted create",
                 f"{base.throttled / max(1, base.creates):.3f}", "report", None)]


def storm_goals(report: Report) -> list[Goal]:
    sc, svc = report.scenario, service(report)
    per_accepted = svc.throttled / max(1, svc.creates)
    ratio = svc.create_rate / (sc.sim_rpm or 1.0)
    return [Goal(sc.name, "429s per accepted create", f"{per_accepted:.3f}", "<= 0.1",
                 per_accepted <= 0.1),
            Goal(sc.name, "achieved rate/simulator's pace", f"{ratio:.3f}", "report", None)]


def memory_goals(report: Report) -> list[Goal]:
    sc, svc = report.scenario, service(report)
    rss = svc.rss_mib or 0.0
    return [Goal(sc.name, "peak RSS master+workers MiB", f"{rss:.0f}", "< 250", rss < 250)]


# Scenarios where the service must finish ahead of the plain client pool (#22).
AHEAD = ("concurrency", "together")
GOALS: dict[str, Callable[[Report], list[Goal]]] = {
    "concurrency": lambda r: common_goals(r) + efficiency_goals(r, 0.97),
    "together": lambda r: common_goals(r) + efficiency_goals(r, 0.85),
    "small": lambda r: common_goals(r) + efficiency_goals(r, 0.90),
    "rpm": lambda r: common_goals(r) + rpm_goals(r) + baseline_limit_rows(r),
    "storm": lambda r: common_goals(r) + storm_goals(r) + baseline_limit_rows(r),
    "memory": lambda r: common_goals(r) + memory_goals(r),
}


# --------------------------------------------------------------------------- printing

SIDE_HEADER = (f"{'side':<9}{'ok':>9}{'wall s':>9}{'ideal s':>9}{'eff':>7}{'polls/pr':>9}"
               f"{'creates':>8}{'429s':>6}{'held':>6}{'peak':>6}{'cr/min':>8}{'max60s':>7}"
               f"{'RSS MiB':>8}{'CPU ms/it':>10}")


def side_row(side: Side) -> str:
    rss = "-" if side.rss_mib is None else f"{side.rss_mib:.0f}"
    cpu = "-" if side.cpu_ms_per_item is None else f"{side.cpu_ms_per_item:.1f}"
    return (f"{side.label:<9}{f'{side.ok}/{side.items}':>9}{side.wall:>9.2f}{side.ideal:>9.2f}"
            f"{side.efficiency:>7.3f}{side.polls_per_prediction:>9.2f}{side.creates:>8}"
            f"{side.throttled:>6}{side.held:>6}{side.inflight_peak:>6}{side.create_rate:>8.1f}"
            f"{side.max_in_60s:>7}{rss:>8}{cpu:>10}")


def describe(sc: Scenario) -> str:
    limit = "none" if sc.sim_rpm is None else f"{sc.sim_rpm:g}/min burst {sc.sim_burst}"
    return (f"== {sc.name}: {sc.items} items as {sc.requests} request(s), {sc.workers} workers, "
            f"concurrency {sc.limit}, service rpm {sc.rpm} burst {sc.burst}, simulator limit "
            f"{limit}, run {sc.run_seconds:g}+{sc.spread:g}*u s, output {sc.output_bytes} B")


def goal_row(goal: Goal, with_scenario: bool) -> str:
    met = {True: "met", False: "MISSED", None: "-"}[goal.met]
    head = f"{goal.scenario:<12}" if with_scenario else "  "
    return f"{head}{goal.what:<34}{goal.value:>10}  {goal.target:<8} {met}"


def print_report(report: Report) -> None:
    print(describe(report.scenario))
    print(SIDE_HEADER)
    for side in report.sides:
        print(side_row(side))
    for goal in report.goals:
        print(goal_row(goal, with_scenario=False))
    print(flush=True)


def print_summary(reports: list[Report]) -> None:
    print("== summary")
    print(f"{'scenario':<12}{'goal':<34}{'value':>10}  {'target':<8} result")
    for report in reports:
        for goal in report.goals:
            print(goal_row(goal, with_scenario=True))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="scenario", required=True)
    for name in PRESETS:
        sub = commands.add_parser(name, help=f"the {name} scenario")
        sub.add_argument("--items", type=int)
        sub.add_argument("--limit", type=int, help="concurrency (slots)")
        sub.add_argument("--run-seconds", type=float)
        sub.add_argument("--spread", type=float, help="run time spread (SimConfig)")
        sub.add_argument("--rpm", type=int, help="the service's creates per minute")
        sub.add_argument("--sim-rpm", type=float, help="the simulator's creates per minute")
        sub.add_argument("--no-baseline", action="store_true")
    commands.add_parser("all", help="every scenario at its preset size, then a summary")
    return parser


def scenario_from(args: argparse.Namespace) -> Scenario:
    """The preset, with whatever the command line overrides."""
    sc = PRESETS[args.scenario]
    given = {"items": args.items, "limit": args.limit, "run_seconds": args.run_seconds,
             "spread": args.spread, "rpm": args.rpm, "sim_rpm": args.sim_rpm}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.no_baseline:
        changes["baseline"] = False
    return dataclasses.replace(sc, **changes)


def main() -> None:
    args = build_parser().parse_args()
    scenarios = list(PRESETS.values()) if args.scenario == "all" else [scenario_from(args)]
    reports = []
    for sc in scenarios:
        reports.append(run_scenario(sc))
        print_report(reports[-1])
    print_summary(reports)
    failed = sum(g.met is False for r in reports for g in r.goals)
    if failed:
        sys.exit(f"{failed} goal(s) missed")


if __name__ == "__main__":
    main()
