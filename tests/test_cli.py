"""`replicate-generation run` as a user runs it: a real subprocess, in-process or against gunicorn,
stopped mid-run (SIGINT, SIGTERM, SIGKILL) and resumed; every item is done once, recorded once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from conftest import ADMIN, ADMIN_KEY, SERVER_TOKEN, HeldClock
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.jobs.store import JobStore
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, free_port, service_env, wait_for
from shared_backends import REDIS_URL, postgres_database, redis_prefix

CLI = ["-m", "replicate_generation"]
WEBP = b"RIFF"


def cli_env(settings: Settings) -> dict[str, str]:
    """The host's environment as the service sees it, and the project importable."""
    return {**service_env(settings), "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}


class Cli:
    """Start and finish `replicate-generation run` processes in tmp_path, logging their stderr."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"cli{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, *CLI, *args], cwd=self.tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], env: dict[str, str], timeout: float = 60) -> int:
        return self.start(args, env).wait(timeout=timeout)

    def log(self, number: int = -1) -> str:
        index = number if number >= 0 else len(self.procs) + number
        return (self.tmp_path / f"cli{index}.log").read_text(errors="replace")


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(tmp_path)
    yield runner
    for proc in runner.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def records(manifest: Path) -> list[dict[str, Any]]:
    if not manifest.exists():
        return []
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def creates_by_prompt(sim: Simulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for prediction in sim.predictions(SERVER_TOKEN):
        prompt = str(prediction["input"]["prompt"])
        counts[prompt] = counts.get(prompt, 0) + 1
    return counts


def running_on_sim(sim: Simulator) -> dict[str, str]:
    """{prompt: prediction id} of the predictions still running on the simulator."""
    return {str(p["input"]["prompt"]): str(p["id"]) for p in sim.predictions(SERVER_TOKEN)
            if p["status"] in ("starting", "processing")}


def assert_done_once(manifest: Path, prompts: list[str], sim: Simulator,
                     files: Path) -> list[dict[str, Any]]:
    """Every row is in the manifest exactly once, succeeded, with its file; one create each."""
    found = records(manifest)
    assert sorted(r["index"] for r in found) == list(range(len(prompts)))
    assert all(r["success"] for r in found), found
    assert {r["index"]: r["prompt"] for r in found} == dict(enumerate(prompts))
    assert creates_by_prompt(sim) == dict.fromkeys(prompts, 1)
    for record in found:
        (path,) = record["files"]
        assert Path(path).parent == files and Path(path).suffix == ".webp"
        assert Path(path).read_bytes().startswith(WEBP)
    return found


def test_in_process_run_stopped_by_sigint_resumes_without_creating_twice(
        make_settings: Callable[..., Settings], held_sim: tuple[Simulator, HeldClock],
        tmp_path: Path, cli: Cli) -> None:
    sim, clock = held_sim
    settings = make_settings(concurrent_limit=3, lease_ttl_seconds=1.5, task_timeout_seconds=30,
                             replicate_base_url=sim.base_url)
    prompts = [f"quick {i} #slow=0.1" for i in range(3)] + \
        [f"slow {i} #slow=1.5" for i in range(6)]
    source = write_jsonl(tmp_path / "requests.jsonl",
                         [{"prompt": p, "model_name": "flux-dev"} for p in prompts])
    manifest = tmp_path / "requests.jsonl.manifest.jsonl"
    files = tmp_path / "files"
    args = ["run", str(source), "--in-process", "--poll-interval", "0.05",
            "--output-dir", str(files)]
    first = cli.start(args, cli_env(settings))
    wait_for(lambda: len(sim.predictions(SERVER_TOKEN)) == 3, what="the quick items created")
    clock.advance(0.2)  # the quick items end; the slow ones cannot until the clock is released
    sim.wake_waiters()
    # The quick items are done and recorded; three slow ones hold every slot, three wait.
    wait_for(lambda: len(records(manifest)) == 3 and len(running_on_sim(sim)) == 3
             and len(sim.predictions(SERVER_TOKEN)) == 6, what="3 done and 3 in flight")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=20) == 128 + signal.SIGINT, cli.log()
    assert "run the same command again to resume" in cli.log()
    assert sorted(r["index"] for r in records(manifest)) == [0, 1, 2]
    left_running = running_on_sim(sim)
    # Stopping left the running predictions running (nothing canceled) and created nothing new.
    assert len(left_running) == 3 and sim.stats(SERVER_TOKEN)["cancels"] == 0
    assert len(sim.predictions(SERVER_TOKEN)) == 6

    clock.release()
    assert cli.run(args, cli_env(settings)) == 0, cli.log()
    found = assert_done_once(manifest, prompts, sim, files)
    # The predictions left running were picked up by their ids, not created again.
    by_prompt = {r["prompt"]: r["prediction_id"] for r in found}
    for prompt, prediction_id in left_running.items():
        assert by_prompt[prompt] == prediction_id
    assert "9/9 done" in cli.log()


def test_in_process_run_killed_resumes_once_the_lease_ttl_has_passed(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    ttl = 1.5
    settings = make_settings(concurrent_limit=6, lease_ttl_seconds=ttl, task_timeout_seconds=30)
    prompts = [f"quick {i} #slow=0.1" for i in range(2)] + \
        [f"slow {i} #slow=2.5" for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"prompt": p, "model_name": "flux-dev"} for p in prompts])
    manifest = tmp_path / "progress.jsonl"
    files = tmp_path / "files"
    args = ["run", str(source), "--manifest", str(manifest), "--poll-interval", "0.05",
            "--output-dir", str(files)]
    first = cli.start(args, cli_env(settings))
    store = JobStore(str(settings.state_file))

    def slow_ones_stored() -> bool:
        # Every create has answered and its id is in the state file: no create is half done.
        jobs = records(Path(str(manifest) + ".jobs"))
        if len(jobs) != 1 or len(records(manifest)) != 2:
            return False
        items = store.items(jobs[0]["job_id"])
        return sum(1 for i in items if i.state == "running" and i.prediction_id) == 4

    wait_for(slow_ones_stored, what="2 done and 4 stored in flight")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    assert len(sim.predictions(SERVER_TOKEN)) == 6

    assert cli.run(args, cli_env(settings)) == 0, cli.log()
    assert_done_once(manifest, prompts, sim, files)
    # The killed run's job waited for its heartbeat to go stale before another process took it.
    assert time.monotonic() - killed_at >= ttl * 2 / 3


def test_service_run_stopped_by_sigterm_resumes_with_the_same_jobs(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    settings = make_settings(concurrent_limit=3)
    service = Gunicorn(service_env(settings, workers=2), tmp_path / "gunicorn.log")
    try:
        service.wait_ready()
        prompts = [f"quick {i} #slow=0.1" for i in range(3)] + \
            [f"slow {i} #slow=1.0" for i in range(7)]
        source = write_jsonl(tmp_path / "requests.jsonl",
                             [{"prompt": p, "model_name": "flux-dev"} for p in prompts])
        manifest = tmp_path / "requests.jsonl.manifest.jsonl"
        files = tmp_path / "downloads"
        args = ["run", str(source), "--service-url", service.url, "--api-key", ADMIN_KEY,
                "--chunk-size", "4", "--poll-interval", "0.05", "--output-dir", str(files), "-v"]
        env = cli_env(settings)
        first = cli.start(args, env)
        wait_for(lambda: len(records(manifest)) >= 3 and running_on_sim(sim),
                 what="some items done and some in flight")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 128 + signal.SIGTERM, cli.log()
        assert "the service keeps running its jobs" in cli.log()
        assert 3 <= len(records(manifest)) < len(prompts)

        assert cli.run(args, env) == 0, cli.log()
        assert "resumed job" in cli.log()
        assert_done_once(manifest, prompts, sim, files)
        jobs = requests.get(service.url + "/jobs?limit=100", headers=ADMIN, timeout=10).json()
        # Three chunks of at most 4: three jobs, none created twice by the resumed run.
        assert sorted(j["total"] for j in jobs["data"]) == [2, 4, 4]
        assert all(j["state"] == "succeeded" for j in jobs["data"])
    finally:
        service.stop()
    assert SERVER_TOKEN not in service.log() and ADMIN_KEY not in service.log()


def test_csv_cells_take_the_parameter_types_and_rows_their_output_paths(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    settings = make_settings()
    source = tmp_path / "requests.csv"
    source.write_text("prompt,model_name,aspect_ratio,output_quality,go_fast,output\n"
                      "a red car,flux-dev,16:9,90,false,cars/red.jpg\n"
                      '"a blue, calm sea",,,,,\n')
    assert cli.run(["run", str(source), "--model", "qwen-image", "--poll-interval", "0.05"],
                   cli_env(settings)) == 0, cli.log()
    by_prompt = {p["input"]["prompt"]: p for p in sim.predictions(SERVER_TOKEN)}
    car = by_prompt["a red car"]["input"]
    assert (car["aspect_ratio"], car["output_quality"], car["go_fast"]) == ("16:9", 90, False)
    assert by_prompt["a blue, calm sea"]["model"] == "qwen/qwen-image"
    found = records(tmp_path / "requests.csv.manifest.jsonl")
    assert [r["index"] for r in found if r["prompt"] == "a red car"] == [0]
    (red,) = next(r["files"] for r in found if r["index"] == 0)
    assert red == str(tmp_path / "cars" / "red.webp")  # the real format's extension
    (sea,) = next(r["files"] for r in found if r["index"] == 1)
    assert Path(sea).name == "qwen_image_002.webp" and Path(sea).is_file()


def test_a_bad_row_stops_the_run_before_anything_is_spent(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "fine", "model_name": "flux-dev"},
        {"prompt": "wrong", "model_name": "flux-dev", "aspect_ratio": "7:3"}])
    assert cli.run(["run", str(source)], cli_env(make_settings())) == 2
    assert "line 2: aspect_ratio must be one of" in cli.log()
    twice = write_jsonl(tmp_path / "twice.jsonl", [
        {"prompt": "one", "model_name": "flux-dev", "custom_filename": "Same"},
        {"prompt": "two", "model_name": "qwen-image", "custom_filename": "same.png"}])
    assert cli.run(["run", str(twice)], cli_env(make_settings())) == 2
    assert "line 2: custom_filename 'same.png' is also used on line 1" in cli.log()
    assert sim.stats() == {}
    assert records(tmp_path / "bad.jsonl.manifest.jsonl") == []


def test_files_under_output_dir_are_never_replaced_unless_asked(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    env = cli_env(make_settings())
    files = tmp_path / "files"
    files.mkdir()
    (files / "sunset.webp").write_bytes(b"my own sunset")
    # The row asks for sunset.jpg; the output is WebP, so it would land on sunset.webp.
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a sunset", "model_name": "flux-dev", "custom_filename": "sunset.jpg"}])
    base = ["run", str(source), "--poll-interval", "0.05", "--output-dir", str(files)]
    assert cli.run([*base, "--manifest", str(tmp_path / "refused.jsonl")], env) == 2
    assert f"line 1: {files / 'sunset.webp'} already exists" in cli.log()
    assert "nothing was submitted" in cli.log() and "--if-exists rename" in cli.log()
    assert sim.stats() == {}  # refused before anything was created

    assert cli.run([*base, "--manifest", str(tmp_path / "renamed.jsonl"),
                    "--if-exists", "rename"], env) == 0, cli.log()
    (renamed,) = records(tmp_path / "renamed.jsonl")
    assert renamed["files"] == [str(files / "sunset-2.webp")]
    assert (files / "sunset.webp").read_bytes() == b"my own sunset"

    assert cli.run([*base, "--manifest", str(tmp_path / "replaced.jsonl"),
                    "--if-exists", "overwrite"], env) == 0, cli.log()
    (replaced,) = records(tmp_path / "replaced.jsonl")
    assert replaced["files"] == [str(files / "sunset.webp")]
    assert (files / "sunset.webp").read_bytes().startswith(WEBP)
    assert sorted(p.name for p in files.iterdir()) == ["sunset-2.webp", "sunset.webp"]
    # The same input asks for the same job (its Idempotency-Key): its file was placed again.
    assert creates_by_prompt(sim) == {"a sunset": 1}


def test_a_row_output_that_exists_is_refused_before_anything_is_spent(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "red.png").write_bytes(b"my red car")
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "fine", "model_name": "flux-dev", "output": "cars/blue.jpg"},
        {"prompt": "taken", "model_name": "flux-dev", "output": "cars/red.jpg"}])
    assert cli.run(["run", str(source)], cli_env(make_settings())) == 2
    assert f"line 2: {Path('cars') / 'red.png'} already exists" in cli.log()
    assert sim.stats() == {}
    assert (tmp_path / "cars" / "red.png").read_bytes() == b"my red car"


def test_migrate_brings_a_sqlite_state_file_and_a_postgresql_database_to_the_head(
        cli: Cli, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert cli.run(["migrate"], cli_env(settings)) == 0
    assert "sqlite job store at revision 0008_item_runners" in cli.log()
    assert settings.state_file.is_file()
    with redis_prefix() as prefix, postgres_database() as database:
        shared = make_settings(database_url=database, redis_url=REDIS_URL,
                               redis_key_prefix=prefix)
        assert cli.run(["migrate"], cli_env(shared)) == 0
        assert cli.run(["migrate"], cli_env(shared)) == 0  # a second run changes nothing
        assert "postgresql job store at revision 0008_item_runners" in cli.log()
        with psycopg.connect(database) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        assert row == ("0008_item_runners",)


def test_the_simulator_command_takes_its_options_as_the_readme_writes_them(
        tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "simulator.log").open("wb")
    proc = subprocess.Popen(  # the README's `replicate-generation simulator --port 5055`
        [sys.executable, *CLI, "simulator", "--port", str(port), "--run-seconds", "0.1"],
        cwd=tmp_path, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/_sim/stats", timeout=1).ok
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "simulator.log").read_text()
                return False

        wait_for(answers, 20, "the simulator to answer on the port it was given")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


# --------------------------------------------------------------------------- any model (issue #25)

COMMUNITY_CSV = ("prompt,model_name,image,scale,num_outputs,style,output\n"
                 "a cat,acme/style,,,2,oil,\n"
                 ",acme/upscale,https://example.com/ref.png,3,,,big/up.jpg\n")


def test_in_process_runs_any_model_the_policy_allows_with_typed_csv_cells(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    env = {**cli_env(make_settings()), "MODEL_POLICY": "any"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"model_name": "acme/upscale", "image": "https://example.com/ref.png"},
        {"model_name": "acme/style", "prompt": "x", "style": "pop"}])
    assert cli.run(["run", str(bad)], env) == 2
    assert "line 2: style must be one of" in cli.log()
    assert sim.predictions(SERVER_TOKEN) == []
    assert cli.run(["run", str(bad)], {**env, "MODEL_POLICY": "curated"}) == 2
    assert "line 1: Model 'acme/upscale' not supported" in cli.log()

    source = tmp_path / "community.csv"
    source.write_text(COMMUNITY_CSV)
    assert cli.run(["run", str(source), "--poll-interval", "0.05"], env) == 0, cli.log()
    made = {p["model"]: p for p in sim.predictions(SERVER_TOKEN)}
    assert made["acme/style"]["input"] == {"prompt": "a cat", "num_outputs": 2, "style": "oil"}
    assert made["acme/upscale"]["input"] == {"image": "https://example.com/ref.png", "scale": 3}
    assert {p["source"] for p in made.values()} == {"version"} and len(sim.predictions()) == 2
    found = {r["index"]: r for r in records(tmp_path / "community.csv.manifest.jsonl")}
    assert found[1]["prompt"] is None
    assert found[1]["files"] == [str(tmp_path / "big" / "up.png")]
    assert len(found[0]["files"]) == 2 and all(Path(f).is_file() for f in found[0]["files"])


def test_a_service_run_checks_other_models_with_the_service_before_anything_is_spent(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path, cli: Cli) -> None:
    settings = make_settings()
    service = Gunicorn({**service_env(settings, workers=1), "MODEL_POLICY": "any"},
                       tmp_path / "gunicorn.log")
    try:
        service.wait_ready()
        args = ["--service-url", service.url, "--api-key", ADMIN_KEY, "--poll-interval", "0.05"]
        bad = tmp_path / "bad.csv"
        bad.write_text("prompt,model_name,num_outputs\na cat,acme/style,2\na dog,acme/style,3\n")
        assert cli.run(["run", str(bad), *args], cli_env(settings)) == 2
        assert "line 3: num_outputs must be <= 2" in cli.log()  # typed from GET /models/...
        assert sim.predictions(SERVER_TOKEN) == []
        source = tmp_path / "community.csv"
        source.write_text(COMMUNITY_CSV)
        assert cli.run(["run", str(source), *args, "--output-dir", str(tmp_path / "files")],
                       cli_env(settings)) == 0, cli.log()
        made = sim.predictions(SERVER_TOKEN)
        assert sorted(p["model"] for p in made) == ["acme/style", "acme/upscale"]
        assert {p["source"] for p in made} == {"version"}
        assert (tmp_path / "big" / "up.png").read_bytes().startswith(b"\x89PNG")
    finally:
        service.stop()
