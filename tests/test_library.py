"""The in-process library (replicate_generation.library): its three modes against the simulator,
and several scripts plus the service sharing one account's limits through the state file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ADMIN, SERVER_TOKEN, USER_TOKEN
from replicate_generation import library as rb
from replicate_generation.devtools.simulator import Simulator, schema_models
from replicate_generation.errors import SettingsError
from replicate_generation.models.schemas import ModelPolicy
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, service_env, wait_for
from test_cli import running_on_sim

FLUX_DEV = "black-forest-labs/flux-dev"
QWEN = "qwen/qwen-image"
KONTEXT = "black-forest-labs/flux-kontext-max"
REF = "https://example.com/ref.png"
WEBP = b"RIFF"
PNG = b"\x89PNG"


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[rb.BatchClient]:
    with rb.BatchClient(settings=make_settings()) as batch_client:
        yield batch_client


def created_prompts(sim: Simulator, token: str = SERVER_TOKEN) -> list[str]:
    return [str(p["input"]["prompt"]) for p in sim.predictions(token)]


# --------------------------------------------------------------------------- the three modes


def test_single_writes_the_requested_path_with_the_real_extension(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    asked = tmp_path / "mine" / "cover.jpg"
    result = client.generate("A lighthouse", "flux-dev", asked, aspect_ratio="16:9")
    assert result.success, result
    # flux-dev makes WebP by default: the file says so, and so does the result.
    assert result.files == [str(tmp_path / "mine" / "cover.webp")]
    assert Path(result.files[0]).read_bytes().startswith(WEBP)
    assert not asked.exists()
    assert any("cover.webp" in note and "jpg" in note for note in result.notes)
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert prediction["input"]["aspect_ratio"] == "16:9"
    assert (result.model_requested, result.model_used) == ("flux-dev", "flux-dev")
    assert result.prediction_id == prediction["id"]
    assert result.cost_usd == 0.025 and result.error is None and not result.placeholder
    # No temp file left beside it, and the job's own directory was emptied and removed.
    assert sorted(p.name for p in asked.parent.iterdir()) == ["cover.webp"]
    output_root = Path(client.settings.output_dir)
    assert not any(p.is_file() for p in output_root.rglob("*"))


def test_several_outputs_are_numbered_beside_the_requested_path(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    result = client.generate("Two cats", "flux-dev", tmp_path / "cats_1.png", num_outputs=2,
                             output_format="jpg")
    assert result.success, result
    assert result.files == [str(tmp_path / "cats_1_1.jpg"), str(tmp_path / "cats_1_2.jpg")]
    assert all(Path(f).read_bytes().startswith(b"\xff\xd8") for f in result.files)
    assert len(sim.predictions(SERVER_TOKEN)) == 1


def test_batch_results_come_in_input_order_with_parallel_paths(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    # The first prompt finishes last: the results still follow the input.
    prompts = ["#slow=0.6 first", "#slow=0.05 second", "#slow=0.3 third", "#slow=0.01 fourth"]
    paths: list[str | Path | None] = [tmp_path / "a" / "one.png", str(tmp_path / "b" / "two"),
                                      None, tmp_path / "b" / "one.png"]
    results = client.generate_batch(prompts, "flux-dev", paths, output_format="png")
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.prompt for r in results] == prompts
    assert all(r.success for r in results), results
    assert results[0].files == [str(tmp_path / "a" / "one.png")]
    assert results[1].files == [str(tmp_path / "b" / "two.png")]
    assert results[3].files == [str(tmp_path / "b" / "one.png")]
    # No path: the default name under OUTPUT_DIR, in the job's own directory.
    (default,) = results[2].files
    assert Path(default).name == "flux_dev_003.png"
    assert Path(default).parent.parent == Path(client.settings.output_dir).resolve()
    for result in results:
        assert Path(result.files[0]).read_bytes().startswith(PNG)
    assert sorted(created_prompts(sim)) == sorted(prompts)
    finished = {p["input"]["prompt"]: p["completed_at_clock"] for p in sim.predictions()}
    assert finished[prompts[0]] > finished[prompts[1]]  # it really did finish out of order


def test_batch_arguments_are_checked_before_anything_is_spent(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="output_filepaths has 1 items but prompts has 2"):
        client.generate_batch(["a", "b"], "flux-dev", [tmp_path / "a.png"])
    with pytest.raises(TypeError, match="output_filepaths must be a list"):
        client.generate_batch(["a", "b"], "flux-dev", str(tmp_path / "a.png"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"output_filepaths\[1\] names the same file as item 0 "
                       r"\(.*X\.\*: .* differ only in extension"):
        client.generate_batch(["a", "b"], "flux-dev", [tmp_path / "x.png", tmp_path / "X.webp"])
    with pytest.raises(rb.InvalidName, match=r"output_filepaths\[0\]"):
        client.generate_batch(["a"], "flux-dev", [tmp_path / ".hidden"])
    with pytest.raises(rb.InvalidRequest, match="aspect_ratio") as bad:
        client.generate_batch(["a", "b"], "flux-dev", aspect_ratio="7:3")
    assert bad.value.field == "aspect_ratio"
    with pytest.raises(rb.InvalidRequest, match="Unknown parameter 'bogus'"):
        client.generate("a", "flux-dev", bogus=1)
    with pytest.raises(ValueError, match="'custom_filename' is not a model parameter"):
        client.generate("a", "flux-dev", custom_filename="x")
    with pytest.raises(rb.InvalidRequest, match="not supported"):
        client.generate_mixed([rb.Request("a", "no-such-model")])
    assert sim.stats(SERVER_TOKEN)["predictions"] == 0


def test_mixed_reports_a_routed_reference_and_a_fallback_in_order(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    requests_ = [
        rb.Request("Give her red hair", "flux-dev", tmp_path / "hair.jpg",
                   {"input_image": REF, "aspect_ratio": "16:9"}),
        rb.Request("A magical forest #fail@flux-dev", "flux-dev", tmp_path / "forest.png"),
        rb.Request("A futuristic city", "qwen-image", None, {"output_format": "jpg"}),
    ]
    routed, fell_back, plain = client.generate_mixed(requests_)
    # flux-dev takes no reference image: it ran on flux-kontext-max with the reference, and says so.
    assert routed.success and routed.model_requested == "flux-dev"
    assert routed.model_used == "flux-kontext-max"
    assert routed.routed is not None and "flux-kontext-max" in routed.routed
    assert routed.files == [str(tmp_path / "hair.png")]  # kontext makes PNG
    assert Path(routed.files[0]).read_bytes().startswith(PNG)
    # flux-dev failed on the simulator; the item fell back to qwen-image and reports both tries.
    assert fell_back.success and fell_back.model_used == "qwen-image"
    assert [a["model"] for a in fell_back.attempts] == [FLUX_DEV, QWEN]
    assert fell_back.attempts[0]["status"] == "failed"
    assert any("fell back to qwen-image" in note for note in fell_back.notes)
    assert fell_back.files == [str(tmp_path / "forest.webp")]
    assert plain.success and plain.model_used == "qwen-image" and plain.routed is None
    assert Path(plain.files[0]).suffix == ".jpg"
    assert [r.index for r in (routed, fell_back, plain)] == [0, 1, 2]
    models = {p["input"]["prompt"]: p["model"] for p in sim.predictions(SERVER_TOKEN)}
    assert models["Give her red hair"] == KONTEXT
    kontext_input = next(p["input"] for p in sim.predictions() if p["model"] == KONTEXT)
    assert kontext_input["input_image"] == REF


def test_a_failure_is_reported_and_the_placeholder_is_flagged(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    failed = client.generate("x #fail", "qwen-image", tmp_path / "f.png", fallback=False)
    assert not failed.success and failed.error_type == "model_failed" and failed.files == []
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(rb.GenerationFailed, match="model_failed"):
        failed.raise_for_error()
    marked = client.generate("y #fail", "qwen-image", tmp_path / "p.webp", fallback=False,
                             placeholder=True)
    assert not marked.success and marked.placeholder
    assert marked.files == [str(tmp_path / "p.png")]  # the placeholder is a PNG
    assert Path(marked.files[0]).read_bytes().startswith(PNG)
    assert created_prompts(sim) == ["x #fail", "y #fail"]  # no fallback: one create each


def test_a_local_reference_file_is_sent_inline(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    reference = tmp_path / "ref.png"
    reference.write_bytes(PNG + b"fake image")
    result = client.generate("Edit it", "flux-kontext-max", input_image=reference)
    assert result.success, result
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert prediction["input"]["input_image"].startswith("data:image/png;base64,")
    with pytest.raises(rb.InvalidRequest, match="paths on the server are not accepted"):
        client.generate("Edit it", "flux-kontext-max", input_image=str(reference))


def test_async_wrappers_and_a_per_call_token(client: rb.BatchClient, sim: Simulator) -> None:
    async def both() -> tuple[rb.Result, list[rb.Result]]:
        return await asyncio.gather(
            client.agenerate("one", "flux-dev", token=USER_TOKEN),
            client.agenerate_batch(["two", "three"], "qwen-image"))

    single, batch = asyncio.run(both())
    assert single.success and [r.prompt for r in batch] == ["two", "three"]
    assert created_prompts(sim, USER_TOKEN) == ["one"]
    assert sorted(created_prompts(sim, SERVER_TOKEN)) == ["three", "two"]


# --------------------------------------------------------------------------- existing files


def test_a_taken_name_is_refused_before_anything_is_created(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = client.generate("first", "flux-dev", out / "sunset.jpg")
    assert first.files == [str(out / "sunset.webp")]
    kept = (out / "sunset.webp").read_bytes()
    # sunset.png would become sunset.webp too: refused, naming the file and the option.
    with pytest.raises(rb.OutputExists, match=r"out/sunset\.webp already exists.*"
                       r"nothing was submitted.*if_exists=\"rename\"") as refused:
        client.generate("second", "flux-dev", out / "sunset.png")
    assert isinstance(refused.value, FileExistsError)
    assert refused.value.path == out / "sunset.webp"
    (out / "mine.png").write_bytes(b"my own file")
    with pytest.raises(rb.OutputExists, match=r"output_filepaths\[1\]: .*out/mine\.png"):
        client.generate_batch(["x", "y"], "flux-dev", [out / "new.png", out / "mine.png"])
    with pytest.raises(rb.OutputExists, match=r"requests\[0\]\.output_filepath"):
        client.generate_mixed([rb.Request("z", "qwen-image", out / "SUNSET")])
    # A file numbered as one of several outputs counts, and so do two items that could clash.
    (out / "tiles_2.jpg").write_bytes(b"tile")
    with pytest.raises(rb.OutputExists, match=r"out/tiles_2\.jpg already exists"):
        client.generate("tiles", "flux-dev", out / "tiles.png", num_outputs=2)
    with pytest.raises(rb.OutputExists, match=r"output_filepaths\[1\]: .*may share names"):
        client.generate_batch(["a", "b"], "flux-dev", [out / "pair.png", out / "pair_1.png"])
    assert created_prompts(sim) == ["first"]  # nothing else was created
    assert (out / "sunset.webp").read_bytes() == kept
    assert (out / "mine.png").read_bytes() == b"my own file"


def test_if_exists_rename_writes_beside_and_overwrite_replaces(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "out"
    client.generate("first", "flux-dev", out / "sunset.jpg").raise_for_error()
    original = (out / "sunset.webp").stat()
    renamed = client.generate("second", "flux-dev", out / "sunset.png", if_exists="rename")
    assert renamed.success, renamed
    assert renamed.files == [str(out / "sunset-2.webp")]
    assert any("saved as sunset-2.webp" in note and "if_exists" in note for note in renamed.notes)
    again = client.generate_batch(["third"], "flux-dev", [out / "sunset.webp"],
                                  if_exists="rename")
    assert again[0].files == [str(out / "sunset-3.webp")]
    assert (out / "sunset.webp").stat().st_ino == original.st_ino  # untouched
    replaced = client.generate_mixed([rb.Request("fourth", "flux-dev", out / "sunset.jpg")],
                                     if_exists="overwrite")
    assert replaced[0].success and replaced[0].files == [str(out / "sunset.webp")]
    assert (out / "sunset.webp").stat().st_ino != original.st_ino
    assert (out / "sunset.webp").read_bytes().startswith(WEBP)
    assert sorted(p.name for p in out.iterdir()) == ["sunset-2.webp", "sunset-3.webp",
                                                     "sunset.webp"]
    with pytest.raises(ValueError, match="if_exists must be one of refuse, rename, overwrite"):
        client.generate("x", "flux-dev", out / "x.png", if_exists="replace")  # type: ignore[arg-type]
    assert created_prompts(sim) == ["first", "second", "third", "fourth"]


def test_a_name_taken_while_generating_is_not_replaced_and_the_file_is_kept(
        client: rb.BatchClient, sim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "late.webp"

    def another_process_writes_it() -> None:
        # Once the prediction exists the check has passed: the file appears "too late".
        wait_for(lambda: sim.predictions(SERVER_TOKEN), what="the create")
        target.write_bytes(b"someone else's")

    writer = threading.Thread(target=another_process_writes_it)
    writer.start()
    result = client.generate("late #slow=0.5", "flux-dev", out / "late.png")
    writer.join()
    assert not result.success and result.error_type == "storage_error"
    assert target.read_bytes() == b"someone else's"
    (kept,) = result.files
    assert Path(kept).is_file() and Path(kept).read_bytes().startswith(WEBP)
    assert Path(kept).is_relative_to(Path(client.settings.output_dir).resolve())
    assert f"{target} appeared after the check" in str(result.error)
    assert kept in str(result.error)


def test_no_token_is_an_error_naming_the_variable(
        make_settings: Callable[..., Settings], sim: Simulator) -> None:
    with rb.BatchClient(settings=make_settings(replicate_api_token=None)) as no_token:
        with pytest.raises(SettingsError, match="REPLICATE_API_TOKEN"):
            no_token.generate("a", "flux-dev")
    assert sim.stats() == {}


def script_env(settings: Settings) -> dict[str, str]:
    """What a script on the host sees: the service's variables, and the project importable."""
    return {**service_env(settings), "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}


def test_module_functions_read_the_dotenv_of_the_working_directory(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    settings = make_settings()
    env = script_env(settings)
    work = tmp_path / "project"
    work.mkdir()
    # The token and the simulator's address come only from ./.env; the environment wins for
    # everything it sets.
    dotenv = {name: env.pop(name) for name in ("REPLICATE_API_TOKEN", "REPLICATE_BASE_URL")}
    (work / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    code = ("import json\nimport replicate_generation.library as rb\n"
            "r = rb.generate('from a script', 'flux-dev', 'out/first.jpg')\n"
            "print(json.dumps(r.as_dict()))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["success"] and result["files"] == [str(work / "out" / "first.webp")]
    assert created_prompts(sim) == ["from a script"]


# --------------------------------------------------------------------------- shared limits

SCRIPT = '''
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from replicate_generation import library as rb
mode, name, ready, go, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), \\
    Path(sys.argv[5])
prompts = [f"{name} item {i} #slow=1.2" for i in range(3)]
client = rb.BatchClient()
client.runner  # open the state file and start the runner before the start signal
ready.touch()
give_up = time.monotonic() + 30
while not go.exists():
    if time.monotonic() > give_up:
        sys.exit("no start signal")
    time.sleep(0.01)
if mode == "batch":
    with client:
        results = client.generate_batch(prompts, "flux-dev",
                                        [out / f"{name}_{i}.png" for i in range(3)])
elif mode == "mixed":
    with client:
        results = client.generate_mixed([rb.Request(p, "qwen-image", out / f"{name}_{i}.jpg")
                                          for i, p in enumerate(prompts)])
else:
    client.close()
    with ThreadPoolExecutor(3) as pool:  # the module-level functions, from three threads
        results = list(pool.map(lambda i: rb.generate(prompts[i], "flux-dev",
                                                      out / f"{name}_{i}"), range(3)))
print(json.dumps([r.as_dict() for r in results]))
'''


def test_three_scripts_and_the_service_share_one_accounts_limits(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    sim.config.run_seconds = 1.2
    limits = {"concurrent_limit": 3, "requests_per_minute": 120, "create_burst": 3}
    settings = make_settings(**limits, lease_ttl_seconds=5)
    service = Gunicorn(service_env(settings, workers=2), tmp_path / "gunicorn.log")
    scripts: list[subprocess.Popen[str]] = []
    try:
        service.wait_ready()
        script = tmp_path / "job.py"
        script.write_text(SCRIPT)
        go = tmp_path / "go"
        out = tmp_path / "files"
        modes = {"s0": "batch", "s1": "mixed", "s2": "single"}
        for name, mode in modes.items():
            scripts.append(subprocess.Popen(
                [sys.executable, str(script), mode, name, str(tmp_path / f"ready-{name}"),
                 str(go), str(out)], cwd=tmp_path, env=script_env(settings),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        wait_for(lambda: all((tmp_path / f"ready-{n}").exists() for n in modes),
                 what="the scripts to start")
        service_prompts = [f"service item {i} #slow=1.2" for i in range(3)]
        answer: dict[str, Any] = {}

        def call_service() -> None:
            answer.update(requests.post(
                service.url + "/generate-batch", headers=ADMIN, timeout=60,
                json={"model_name": "flux-dev", "prompts": service_prompts}).json())

        caller = threading.Thread(target=call_service)
        go.touch()
        caller.start()
        outputs = [proc.communicate(timeout=60) for proc in scripts]
        caller.join(timeout=60)
    finally:
        for proc in scripts:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        service.stop()
    for proc, (_, stderr) in zip(scripts, outputs, strict=True):
        assert proc.returncode == 0, stderr
    for (name, mode), (stdout, _) in zip(modes.items(), outputs, strict=True):
        results = json.loads(stdout)
        assert [r["prompt"] for r in results] == [f"{name} item {i} #slow=1.2" for i in range(3)]
        assert all(r["success"] for r in results), results
        suffix = ".webp"  # flux-dev and qwen-image both make WebP unless asked otherwise
        assert [r["files"] for r in results] == [[str(out / f"{name}_{i}{suffix}")]
                                                 for i in range(3)], mode
        for result in results:
            assert Path(result["files"][0]).read_bytes().startswith(WEBP)
    assert answer["success"] is True, answer
    assert [r["prompt"] for r in answer["results"]] == service_prompts
    stats = sim.stats(SERVER_TOKEN)
    assert stats["predictions"] == stats["creates_accepted"] == 12
    assert sorted(created_prompts(sim)) == sorted(
        [f"s{n} item {i} #slow=1.2" for n in range(3) for i in range(3)] + service_prompts)
    # Four processes, each free to run 3 at once: together never more than the account's 3 ...
    assert stats["inflight_peak"] == 3
    # ... and never faster than 120 creates a minute (2 a second) plus the burst of 3.
    assert sim.max_creates_in_window(SERVER_TOKEN, 60) <= 120 + 3
    for window in (1, 2, 3):
        assert sim.max_creates_in_window(SERVER_TOKEN, window) <= 2 * window + 3, window
    for secret in (SERVER_TOKEN, "test-admin-key"):
        assert secret not in service.log()


# --------------------------------------------------------------------------- cancelling


def test_cancelling_the_awaiting_task_cancels_the_calls_jobs(
        make_settings: Callable[..., Settings], sim: Simulator) -> None:
    settings = make_settings(concurrent_limit=2, task_timeout_seconds=30)
    prompts = [f"hang {i} #hang" for i in range(5)]

    async def start_then_cancel(client: rb.BatchClient) -> None:
        task = asyncio.create_task(client.agenerate_batch(prompts, "flux-dev"))
        await asyncio.to_thread(wait_for, lambda: len(running_on_sim(sim)) == 2,
                                what="two predictions running")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with rb.BatchClient(settings=settings) as client:
        asyncio.run(start_then_cancel(client))
        # The call's job was canceled before CancelledError came through.
        (job,) = client.runner.store.list_jobs(None, limit=10)
        assert client.runner.store.cancel_requested(job.id)
        wait_for(lambda: all(p["canceled"] for p in sim.predictions(SERVER_TOKEN)),
                 what="the running predictions canceled on the simulator")
    assert len(sim.predictions(SERVER_TOKEN)) == 2  # the queued three were never created
    assert sim.stats(SERVER_TOKEN)["cancels"] == 2


CTRL_C_SCRIPT = """
import asyncio, sys
from replicate_generation import library as rb

async def main() -> None:
    await rb.agenerate_batch([f"hang {i} #hang" for i in range(5)], "flux-dev")

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_under_asyncio_run_cancels_the_running_predictions(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    settings = make_settings(concurrent_limit=2, task_timeout_seconds=30)
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    # `with` closes the pipes even on failure: left to the garbage collector, they would fail
    # whichever later test it runs in (filterwarnings = error).
    with subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                          env=script_env(settings), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            running = wait_for(lambda: running_on_sim(sim) if len(running_on_sim(sim)) == 2
                               else None, what="two predictions running")
            proc.send_signal(signal.SIGINT)
            interrupted_at = time.monotonic()
            # Timed to the cancels reaching Replicate; the interpreter's teardown after them
            # stretches with the machine's load, so the exit has only a ceiling.
            wait_for(lambda: sim.stats(SERVER_TOKEN)["cancels"] == 2 or proc.poll() is not None,
                     what="the running predictions canceled")
            canceled_after = time.monotonic() - interrupted_at
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130 and "interrupted" in stdout, stderr
    assert canceled_after < 10  # promptly, not after the task timeout
    predictions = sim.predictions(SERVER_TOKEN)
    # The running ones were canceled on Replicate; the three queued were never created.
    assert {p["id"] for p in predictions} == set(running.values())
    assert all(p["canceled"] for p in predictions)
    assert sim.stats(SERVER_TOKEN)["cancels"] == 2


# --------------------------------------------------------------------------- any model (issue #25)


def test_any_model_the_policy_allows_runs_with_the_services_validation(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    style, upscale, cutout = schema_models.STYLE, schema_models.UPSCALE, schema_models.CUTOUT
    with rb.BatchClient(settings=make_settings(model_policy=ModelPolicy("any"))) as batch:
        with pytest.raises(rb.InvalidRequest) as refused:
            batch.generate("a cat", style, tmp_path / "cat.png", style="pop")
        assert refused.value.field == "style"
        assert sim.predictions(SERVER_TOKEN) == []  # checked before anything was created
        big = batch.generate(None, upscale, tmp_path / "big.jpg", image=REF, scale=3)
        assert big.success and big.files == [str(tmp_path / "big.png")], big
        assert big.model_used == f"{upscale}:{schema_models.version_id(upscale)}"
        assert big.prompt is None
        mixed = batch.generate_mixed([
            rb.Request("a boat", style, tmp_path / "boat.png", {"style": "oil"}),
            rb.Request(None, cutout, tmp_path / "cut.png", {"image": REF})])
    assert [r.success for r in mixed] == [True, True], mixed
    assert mixed[0].files == [str(tmp_path / "boat.png")]
    assert mixed[1].files == [str(tmp_path / "cut_image.png"), str(tmp_path / "cut_mask.png")]
    assert all(Path(f).read_bytes().startswith(PNG) for r in mixed for f in r.files)
    made = sim.predictions(SERVER_TOKEN)
    assert sorted((p["model"], p["source"], p["version"]) for p in made) == sorted(
        (ref, "version", schema_models.version_id(ref)) for ref in (upscale, style, cutout))


def test_a_file_named_like_a_dict_outputs_key_is_refused_before_anything_is_spent(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    (tmp_path / "Cut_Mask.webp").write_bytes(b"mine")
    with rb.BatchClient(settings=make_settings(model_policy=ModelPolicy("any"))) as batch:
        with pytest.raises(rb.OutputExists) as taken:
            batch.generate(None, schema_models.CUTOUT, tmp_path / "cut.png", image=REF)
        assert "Cut_Mask.webp" in str(taken.value) and "cut_<key>" in str(taken.value)
        assert sim.predictions(SERVER_TOKEN) == []
        renamed = batch.generate(None, schema_models.CUTOUT, tmp_path / "cut.png", image=REF,
                                 if_exists="rename")
    # "rename" places beside it: no file of the same name (extension included) is replaced.
    assert renamed.files == [str(tmp_path / "cut_image.png"), str(tmp_path / "cut_mask.png")]
    assert (tmp_path / "Cut_Mask.webp").read_bytes() == b"mine"


def test_the_curated_policy_refuses_other_models_before_anything_is_spent(
        client: rb.BatchClient, sim: Simulator) -> None:
    with pytest.raises(rb.InvalidRequest) as refused:
        client.generate("a cat", schema_models.STYLE)
    assert refused.value.field == "model_name" and "not supported" in str(refused.value)
    assert sim.stats() == {}
