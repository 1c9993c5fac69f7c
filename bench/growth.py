"""Issue #22's growth table: one job of N items on SQLite and on PostgreSQL + Redis, beside a pool.

For each backend and each N, a fresh service (gunicorn, 2 workers, concurrency 60 for the
account) against the simulator (run times 0.13 + 0.3*u s, varied per prompt and seed, so nothing
lines up with the service's intervals), and one row:

* submit ms: POST /generate-batch of N prompts with `Prefer: respond-async`, until its 202;
* RSS MiB: peak summed RSS of gunicorn's master and workers from submit to the job's end, and
  +KiB: that peak less their RSS just before the submit (PostgreSQL and Redis are not counted);
* state KiB: SQLite, the state file and its WAL; PostgreSQL, pg_total_relation_size of every job
  table in the run's own database (Redis, holding only the limits, is not counted);
* items/s: items ended over submit to the job's finished_at; CPU ms/it: user + system CPU of
  the service's processes over the same span (a GET every 0.2 s watches for the end), per item.
  A job still running after --row-seconds (default 80, to keep the default run near 10
  minutes) is measured there: its `done` gets a *, items/s and CPU count the items ended by
  then, and the reads below find it still running (the service busy with it);
* GET /jobs/<id> once the job has ended (or at the cut), paced open-loop at 200 req/s for 4 s:
  bytes, p50/p99 ms (from each request's scheduled send time, so a late send counts) and the
  rate achieved; busy p99: for 5,000 items or more, the same reads 3 s into the job's run,
  beside it, as a client polling a running job meets them (their CPU is in the row's).

A second table says where the CPU went: the service's idle CPU (measured for 2 s before the
submit) and its share per item, this process's CPU per item (the simulator, mostly: its werkzeug
server bounds both sides' items/s), PostgreSQL's server processes per item, the service's CPU
per GET.

Beside each row, the pool (bench/batch_throughput.py's baseline): 60 threads calling
replicate.Client.run with the client's defaults against the same simulator, reading every output;
its CPU is the sum of its threads' thread_time. Run once per N, up to --pool-max items.

Goals (#22): GET /jobs/<id> p99 <= 50 ms at 200 req/s on a 5,000-item job, ended and running;
RSS growth < 2 KiB per queued item, read as the growth added per item between sizes of 1,000 and
more (smaller jobs are mostly fixed costs); service CPU per item <= 2x the pool's.

    .venv/bin/python bench/growth.py                      # N = 10 100 1000 5000 20000
    .venv/bin/python bench/growth.py --items 10 100 --backends sqlite

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 for `pg` (a private key prefix
and a throw-away database per row, removed afterwards). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.batch_throughput import (  # noqa: E402
    ADMIN_KEY,
    MIB,
    MODEL_ID,
    UNBOUND_BURST,
    UNBOUND_RPM,
    RssSampler,
    Scenario,
    cpu_seconds,
    process_tree,
    run_baseline,
    running_simulator,
)
from bench.job_growth import pct  # noqa: E402
from replicate_generation.devtools.simulator import Simulator  # noqa: E402
from replicate_generation.jobs.schema import metadata  # noqa: E402
from replicate_generation.settings import Settings  # noqa: E402
from tests.servers import Gunicorn, service_env  # noqa: E402
from tests.shared_backends import REDIS_URL, postgres_database, redis_prefix  # noqa: E402

TOKENS = {"sqlite": "r8_growth_sqlite", "pg": "r8_growth_pg"}  # only the simulator takes them
ADMIN = {"X-Admin-API-Key": ADMIN_KEY}
LIMIT, WORKERS, THREADS = 60, 2, 16  # THREADS: the image's default per worker
RUN_SECONDS, SPREAD = 0.13, 0.3  # 0.13-0.43 s: no multiple of a poll or pacing interval
WATCH_SECONDS = 0.2  # how often the job is asked whether it ended
READ_RATE, READ_SECONDS, READERS = 200.0, 4.0, 32
KIB = 1024
MARGINAL_FROM = 1000  # sizes from here on count for the RSS goal
BACKEND_LABELS = {"sqlite": "sqlite", "pg": "pg+redis"}
IDLE_SECONDS = 2.0  # the service's idle CPU is measured over this long before each submit
ROW_SECONDS = 80.0  # the default cut: keeps the default run near 10 minutes on 2 busy cores
TERMINAL = ("succeeded", "failed", "canceled", "expired")
BUSY_READS_FROM = 5000  # jobs this big are also read while they run (the goal's size)
BUSY_READS_AFTER = 3.0  # seconds after the submit: every worker is busy with the job by then


@dataclass
class Reads:
    """GET /jobs/<id> at a paced rate: latencies (ms, from the scheduled send), body bytes."""

    latencies: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the service's, over the reads

    @property
    def cpu_ms_per_read(self) -> float:
        return 1000 * self.cpu_seconds / max(1, len(self.latencies) + self.errors)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Row:
    """One backend at one N. `done` items had ended when the run stopped: all N, unless the job
    was still running at --row-seconds (then it was measured there, and `ended` is False)."""

    backend: str
    items: int
    done: int
    ok: int
    ended: bool
    submit_ms: float
    rss_peak: int
    rss_growth: int
    state_bytes: int
    wall: float  # submit to the job's finished_at, or to the cut
    cpu: float  # the service's processes over `wall`, seconds
    idle_ms_per_s: float  # the service's CPU with nothing to do, before the submit
    sim_cpu: float  # this process (the simulator, mostly) over `wall`, seconds
    db_cpu: float | None  # PostgreSQL's server processes for the run's database, seconds
    reads: Reads
    busy_reads: Reads | None = None  # the same reads while the job ran, for big jobs
    pool_items_per_s: float | None = None
    pool_cpu_ms_per_item: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.done / self.wall if self.wall > 0 else 0.0

    def per_item_ms(self, seconds: float) -> float:
        return 1000 * seconds / max(1, self.done)

    @property
    def cpu_ms_per_item(self) -> float:
        return self.per_item_ms(self.cpu)

    @property
    def cpu_ratio(self) -> float | None:
        if not self.pool_cpu_ms_per_item:
            return None
        return self.cpu_ms_per_item / self.pool_cpu_ms_per_item


@dataclass(frozen=True)
class Goal:
    what: str
    value: str
    target: str
    met: bool


# --------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class Backend:
    """Where one row's service keeps its state: the settings, and how to size that state."""

    name: str
    settings: Settings
    database_url: str | None = None

    def state_bytes(self) -> int:
        if self.database_url is None:
            return sum(p.stat().st_size for p in self.settings.state_file.parent.glob(
                self.settings.state_file.name + "*") if not p.name.endswith("-shm"))
        return postgres_bytes(self.database_url)


def postgres_bytes(url: str) -> int:
    """pg_total_relation_size (table, indexes, TOAST) summed over the job tables."""
    names = [table.name for table in metadata.sorted_tables]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(sum(pg_total_relation_size(to_regclass(n))), 0) "
                           "FROM unnest(%s::text[]) AS n", (names,)).fetchone()
    return int(row[0]) if row else 0


@contextmanager
def backend(name: str, sim: Simulator, work: Path) -> Iterator[Backend]:
    """A fresh state for one row: a state file, or a private database and Redis key prefix."""
    base: dict[str, Any] = dict(
        replicate_api_token=TOKENS[name], admin_api_key=ADMIN_KEY,
        replicate_base_url=sim.base_url, output_dir=work / "output",
        state_file=work / "state.sqlite3", concurrent_limit=LIMIT,
        requests_per_minute=UNBOUND_RPM, create_burst=UNBOUND_BURST,
        task_timeout_seconds=600.0)
    if name == "sqlite":
        yield Backend(name, Settings(**base))
        return
    with redis_prefix() as prefix, postgres_database() as database:
        yield Backend(name, Settings(**base, redis_url=REDIS_URL, redis_key_prefix=prefix,
                                     database_url=database), database)


@contextmanager
def running_service(settings: Settings, items: int) -> Iterator[Gunicorn]:
    """gunicorn with WORKERS workers, every one answering, sized to take `items` at once."""
    room = str(max(items, 1000))
    env = {**service_env(settings, WORKERS), "LOG_LEVEL": "WARNING",
           "GUNICORN_THREADS": str(THREADS), "MAX_BATCH_SIZE": room,
           "MAX_QUEUED_TASKS": room, "MAX_QUEUED_TASKS_PER_ACCOUNT": room}
    server = Gunicorn(env, settings.state_file.parent / "gunicorn.log")
    try:
        server.wait_ready(timeout=60)
        server.wait_workers(WORKERS)
        yield server
    finally:
        server.stop()


def tree_rss(pid: int) -> int:
    return sum(RssSampler._rss_bytes(p) for p in process_tree(pid))


def idle_rate(tree: list[int]) -> float:
    """The service's CPU ms per second with nothing to do (its timers and housekeeping)."""
    before = cpu_seconds(tree)
    time.sleep(IDLE_SECONDS)
    return 1000 * (cpu_seconds(tree) - before) / IDLE_SECONDS


def postgres_pids(url: str) -> list[int]:
    """PostgreSQL's server processes for this database, but the one answering this question."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND pid <> pg_backend_pid()").fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class Meter:
    """CPU seconds since start: the service's processes, this one (the simulator), and
    PostgreSQL's processes for the run's database (which its pools open as they need)."""

    tree: list[int]
    database_url: str | None
    service: float = 0.0
    own: float = 0.0
    db: dict[int, float] = field(default_factory=dict)

    def _db_now(self) -> dict[int, float]:
        if self.database_url is None:
            return {}
        return {pid: cpu_seconds([pid]) for pid in postgres_pids(self.database_url)}

    def start(self) -> None:
        self.service, self.own, self.db = cpu_seconds(self.tree), time.process_time(), \
            self._db_now()

    def read(self) -> tuple[float, float, float | None]:
        db = None if self.database_url is None else sum(
            cpu - self.db.get(pid, 0.0) for pid, cpu in self._db_now().items())
        return cpu_seconds(self.tree) - self.service, time.process_time() - self.own, db


def submit(server: Gunicorn, prompts: list[str]) -> tuple[str, float]:
    """POST the job with Prefer: respond-async; (its id, seconds until the 202)."""
    started = time.perf_counter()
    response = server.post("/generate-batch", {"model_name": MODEL_ID, "prompts": prompts},
                           {**ADMIN, "Prefer": "respond-async"}, timeout=600)
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.text[:500]
    return str(response.json()["id"]), elapsed


def watch(server: Gunicorn, job_id: str, cut_at: float) -> tuple[dict[str, Any], bool]:
    """The job's body once it has ended (True), or at monotonic `cut_at` if it has not."""
    with requests.Session() as session:
        while True:
            job: dict[str, Any] = session.get(f"{server.url}/jobs/{job_id}", headers=ADMIN,
                                              timeout=30).json()
            if job["finished_at"] is not None:
                return job, True
            if time.monotonic() >= cut_at:
                return job, False
            time.sleep(WATCH_SECONDS)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def measure_service(sim: Simulator, name: str, items: int, args: argparse.Namespace) -> Row:
    """A fresh state and service for one row, removed afterwards."""
    prompts = [f"growth {name} {items} item {i}" for i in range(items)]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-growth-")))
        store = stack.enter_context(backend(name, sim, work))
        server = stack.enter_context(running_service(store.settings, items))
        return run_row(server, store, prompts, args)


def run_row(server: Gunicorn, store: Backend, prompts: list[str],
            args: argparse.Namespace) -> Row:
    """Submit, watch until the end (or the cut), then read the job at a pace."""
    tree = process_tree(server.proc.pid)
    idle = idle_rate(tree)
    before, meter = tree_rss(server.proc.pid), Meter(tree, store.database_url)
    meter.start()
    sampler, started = RssSampler(server.proc.pid), time.time()
    try:
        job_id, submit_s = submit(server, prompts)
        busy = busy_reads(server.url, job_id, args.read_seconds, len(prompts))
        job, ended = watch(server, job_id, time.monotonic() + args.row_seconds)
        cpu, own, db = meter.read()
        wall = (epoch(job["finished_at"]) if ended else time.time()) - started
    finally:
        peak = sampler.stop()
    busy_result = busy.result() if busy is not None else None
    state = store.state_bytes()
    # A cut job is read still running: a cancel of thousands of queued items took over 120 s.
    reads = measured_reads(server.url, tree, job_id, args.read_seconds)
    counts = job["counts"]
    return Row(backend=store.name, items=len(prompts), done=sum(counts[s] for s in TERMINAL),
               ok=counts["succeeded"], ended=ended, submit_ms=submit_s * 1000, rss_peak=peak,
               rss_growth=peak - before, state_bytes=state, wall=wall, cpu=cpu,
               idle_ms_per_s=idle, sim_cpu=own, db_cpu=db, reads=reads, busy_reads=busy_result)


def busy_reads(url: str, job_id: str, seconds: float, items: int) -> Future[Reads] | None:
    """For a big job, the paced reads BUSY_READS_AFTER s into its run, beside the watch: what a
    client polling a running job sees (their CPU counts in the row's, as a poller's would)."""
    if items < BUSY_READS_FROM:
        return None
    future: Future[Reads] = Future()

    def read_later() -> None:
        time.sleep(BUSY_READS_AFTER)
        future.set_result(reads_elsewhere(f"{url}/jobs/{job_id}", READ_RATE, seconds))

    threading.Thread(target=read_later, daemon=True).start()
    return future


def measured_reads(url: str, tree: list[int], job_id: str, seconds: float) -> Reads:
    cpu_before = cpu_seconds(tree)
    reads = reads_elsewhere(f"{url}/jobs/{job_id}", READ_RATE, seconds)
    reads.cpu_seconds = cpu_seconds(tree) - cpu_before
    return reads


# --------------------------------------------------------------------------- paced reads


def reads_elsewhere(link: str, rate: float, seconds: float) -> Reads:
    """paced_reads in a process of its own: in this one the simulator's threads would hold the
    readers' GIL, and their wait would count against the service."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(paced_reads, link, rate, seconds).result()


def paced_reads(link: str, rate: float, seconds: float) -> Reads:
    """Open loop: request i is due at start + i/rate whatever the earlier ones are doing; its
    latency counts from when it was due, so a reader that fell behind shows in the figures."""
    count, reads, lock = int(rate * seconds), Reads(), threading.Lock()
    due_next = iter(range(count))
    start = time.perf_counter() + 0.1

    def reader() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(due_next, None)
                if i is None:
                    return
                due = start + i / rate
                time.sleep(max(0.0, due - time.perf_counter()))
                read_one(session, link, due, reads, lock)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reads.seconds = time.perf_counter() - start
    return reads


def read_one(session: requests.Session, link: str, due: float, reads: Reads,
             lock: threading.Lock) -> None:
    try:
        response = session.get(link, headers=ADMIN, timeout=30)
        ok = response.status_code == 200
    except requests.RequestException:
        ok = False
    elapsed = (time.perf_counter() - due) * 1000
    with lock:
        if ok:
            reads.latencies.append(elapsed)
            reads.sizes.append(len(response.content))
        else:
            reads.errors += 1


# --------------------------------------------------------------------------- the pool


def measure_pool(sim: Simulator, items: int) -> tuple[float, float]:
    """(items/s, CPU ms/item) of LIMIT threads calling replicate.Client.run."""
    sc = Scenario("growth", items=items, limit=LIMIT, run_seconds=RUN_SECONDS, spread=SPREAD)
    side = run_baseline(sim, sc, [f"growth pool {items} item {i}" for i in range(items)])
    assert side.ok == items, f"pool: {side.ok}/{items} succeeded"
    return items / side.wall, side.cpu_ms_per_item or 0.0


# --------------------------------------------------------------------------- the table


HEADER = (f"{'backend':<9}{'N':>6}{'done':>7}{'submit ms':>10}{'RSS MiB':>8}{'+KiB':>7}"
          f"{'state KiB':>10}{'GET B':>7}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>6}{'busy p99':>9}"
          f"{'items/s':>8}"
          f"{'CPU ms/it':>10}{'pool it/s':>10}{'pool CPU':>9}{'ratio':>6}")
DETAIL_HEADER = (f"{'backend':<9}{'N':>6}{'wall s':>8}{'idle ms/s':>10}{'idle ms/it':>11}"
                 f"{'sim ms/it':>10}{'pg ms/it':>9}{'ms/GET':>7}{'GET err':>8}{'ok':>7}")


def p(values: list[float], q: float) -> float:
    return pct(values, q) if values else float("nan")


def row_text(row: Row) -> str:
    r = row.reads
    busy = "-" if row.busy_reads is None else f"{p(row.busy_reads.latencies, 0.99):.1f}"
    done = f"{row.done}{'' if row.ended else '*'}"
    pool = ("-", "-", "-") if row.pool_items_per_s is None else (
        f"{row.pool_items_per_s:.0f}", f"{row.pool_cpu_ms_per_item:.2f}", f"{row.cpu_ratio:.2f}")
    return (f"{BACKEND_LABELS[row.backend]:<9}{row.items:>6}{done:>7}{row.submit_ms:>10.0f}"
            f"{row.rss_peak / MIB:>8.0f}{row.rss_growth / KIB:>7.0f}"
            f"{row.state_bytes / KIB:>10.0f}{max(r.sizes, default=0):>7}"
            f"{p(r.latencies, 0.5):>8.1f}{p(r.latencies, 0.99):>8.1f}{r.rate:>6.0f}{busy:>9}"
            f"{row.items_per_s:>8.1f}{row.cpu_ms_per_item:>10.2f}"
            f"{pool[0]:>10}{pool[1]:>9}{pool[2]:>6}")


def detail_text(row: Row) -> str:
    """Where the time went: the service's idle CPU spread over the items, the simulator's CPU
    (in this process) and PostgreSQL's per item, the service's CPU per GET."""
    idle_per_item = row.per_item_ms(row.idle_ms_per_s * row.wall / 1000)
    db = "-" if row.db_cpu is None else f"{row.per_item_ms(row.db_cpu):.2f}"
    return (f"{BACKEND_LABELS[row.backend]:<9}{row.items:>6}{row.wall:>8.1f}"
            f"{row.idle_ms_per_s:>10.1f}{idle_per_item:>11.2f}"
            f"{row.per_item_ms(row.sim_cpu):>10.2f}{db:>9}{row.reads.cpu_ms_per_read:>7.1f}"
            f"{row.reads.errors:>8}{row.ok:>7}")


def print_details(rows: list[Row]) -> None:
    print("\n== where the CPU went")
    print(DETAIL_HEADER)
    for row in rows:
        print(detail_text(row))


def latency_goals(rows: list[Row]) -> list[Goal]:
    goals = []
    for row in rows:
        if row.items != 5000:
            continue
        for when, reads in (("ended", row.reads), ("running", row.busy_reads)):
            if reads is None or not reads.latencies:
                continue
            p99 = pct(reads.latencies, 0.99)
            achieved = reads.rate >= 0.95 * READ_RATE and reads.errors == 0
            goals.append(Goal(f"{BACKEND_LABELS[row.backend]} GET /jobs/<id> p99, 5,000, {when}",
                              f"{p99:.1f} ms", f"<= 50 at {READ_RATE:.0f}/s",
                              p99 <= 50 and achieved))
    return goals


def rss_goals(rows: list[Row]) -> list[Goal]:
    """Growth added per item from one size of MARGINAL_FROM or more to the next: the first
    size's fixed costs (and the ones every size pays) cancel."""
    goals = []
    for name in BACKEND_LABELS:
        sized = sorted((r for r in rows if r.backend == name and r.items >= MARGINAL_FROM),
                       key=lambda r: r.items)
        for low, high in zip(sized, sized[1:], strict=False):
            slope = (high.rss_growth - low.rss_growth) / (high.items - low.items)
            goals.append(Goal(f"{BACKEND_LABELS[name]} RSS per item, {low.items}->{high.items}",
                              f"{slope:.0f} B", "< 2048 B", slope < 2 * KIB))
    return goals


def cpu_goals(rows: list[Row]) -> list[Goal]:
    return [Goal(f"{BACKEND_LABELS[r.backend]} CPU/item vs pool, N={r.items}",
                 f"{r.cpu_ratio:.2f}x", "<= 2x", r.cpu_ratio <= 2.0)
            for r in rows if r.cpu_ratio is not None]


def print_goals(rows: list[Row]) -> int:
    goals = latency_goals(rows) + rss_goals(rows) + cpu_goals(rows)
    print("\n== goals (#22)")
    for goal in goals:
        print(f"{goal.what:<46}{goal.value:>10}  {goal.target:<16} "
              f"{'met' if goal.met else 'MISSED'}")
    return sum(not g.met for g in goals)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10, 100, 1000, 5000, 20000])
    parser.add_argument("--backends", nargs="+", choices=list(BACKEND_LABELS),
                        default=list(BACKEND_LABELS))
    parser.add_argument("--pool-max", type=int, default=5000,
                        help="run the pool for N up to this many items (default 5000)")
    parser.add_argument("--read-seconds", type=float, default=READ_SECONDS)
    parser.add_argument("--row-seconds", type=float, default=ROW_SECONDS,
                        help="measure a job still running after this long there (its row gets a *)")
    return parser


def run_size(items: int, args: argparse.Namespace) -> list[Row]:
    """The pool (once) and every backend for one N, each against one fresh simulator."""
    sc = Scenario("growth", items=items, limit=LIMIT, run_seconds=RUN_SECONDS, spread=SPREAD)
    with running_simulator(sc) as sim:
        pool = measure_pool(sim, items) if items <= args.pool_max else None
        rows = [measure_service(sim, name, items, args) for name in args.backends]
    for row in rows:
        if pool is not None:
            row.pool_items_per_s, row.pool_cpu_ms_per_item = pool
        print(row_text(row), flush=True)
    return rows


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    args = build_parser().parse_args()
    print(f"concurrency {LIMIT}, {WORKERS} workers x {THREADS} threads, run {RUN_SECONDS:g}+"
          f"{SPREAD:g}*u s, reads {READ_RATE:.0f}/s for {args.read_seconds:g} s on the ended "
          f"job, jobs cut at {args.row_seconds:g} s (*: read while running), pool for N <= "
          f"{args.pool_max} ('-': not run); {load()}", flush=True)
    print(HEADER, flush=True)
    started = time.monotonic()
    rows = [row for items in sorted(args.items) for row in run_size(items, args)]
    print_details(rows)
    missed = print_goals(rows)
    print(f"\nwall {time.monotonic() - started:.0f} s, {load()}")
    if missed:
        sys.exit(f"{missed} goal(s) missed")


if __name__ == "__main__":
    main()
