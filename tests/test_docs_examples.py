"""The README's and docs/library.md's examples run as written against the simulator: the code
blocks are read from the Markdown files, so a test fails as soon as the docs drift from the service.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import service_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LIBRARY_DOC = ROOT / "docs" / "library.md"


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def curl_commands() -> list[list[str]]:
    """Every curl command of the README's bash blocks, as argv."""
    commands = []
    for block in code_blocks(README, "bash"):
        # A command starts at the line's first column; its continuations are indented.
        for command in re.split(r"\n(?=\S)", block):
            if command.startswith("curl "):
                commands.append(shlex.split(command.replace("\\\n", " "), comments=True))
    return commands


def readme_key() -> str:
    found = re.search(r"Set `KEY=([^`]+)`", README.read_text())
    assert found, "the README no longer says which admin key its examples use"
    return found.group(1)


def run_curl(client: FlaskClient, argv: list[str], key: str) -> Any:
    """The request a curl argv makes ($URL the service, $KEY the README's admin key)."""
    method, headers, data, url = "GET", {}, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip().replace("$KEY", key)
        elif arg == "-d":
            data = next(args)
        elif arg.startswith("$URL"):
            url = arg.removeprefix("$URL")
        else:
            assert arg == "-s", f"an option this test does not know: {arg}"
    assert url, argv
    return client.open(url, method=method, headers=headers, data=data)


def test_the_readmes_curl_examples_succeed(make_app: Callable[..., Flask], sim: Simulator) -> None:
    key = readme_key()
    client = make_app(admin_api_key=key).test_client()
    commands = curl_commands()
    posts = [c for c in commands if "POST" in c]
    assert len(posts) >= 6, "the README's examples were not found"
    for argv in commands:
        response = run_curl(client, argv, key)
        assert response.status_code in (200, 201, 202), (argv, response.get_json())
        body = response.get_json()
        assert body.get("success", True) is True, (argv, body)
    # The bodies ran: every prompt of the README's generate examples reached Replicate.
    created = set(sim.creates_by_prompt(SERVER_TOKEN))
    assert {"A serene mountain landscape at sunset", "A green forest path",
            "Give her red hair"} <= created


def same_shape(sample: Any, real: Any, where: str) -> None:
    """The sample's keys are the answer's (a sample with a "..." key may leave some out),
    down through objects and the first element of lists."""
    if isinstance(sample, dict):
        assert isinstance(real, dict), where
        shown = set(sample) - {"..."}
        if "..." in sample:
            assert shown <= set(real), (where, shown - set(real))
        else:
            assert shown == set(real), (where, shown ^ set(real))
        for key in shown:
            same_shape(sample[key], real[key], f"{where}.{key}")
    elif isinstance(sample, list) and sample and isinstance(sample[0], dict) and real:
        same_shape(sample[0], real[0], f"{where}[0]")


def test_the_readmes_sample_answers_have_the_services_fields(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    key = readme_key()
    client = make_app(admin_api_key=key).test_client()
    pairs = re.findall(r"^```bash\n([^`]*)^```\n```json\n([^`]*)^```", README.read_text(),
                       re.S | re.M)
    assert len(pairs) >= 3, "the README's sample answers were not found"
    for command, sample in pairs:
        argv = shlex.split(command.replace("\\\n", " "), comments=True)
        response = run_curl(client, argv, key)
        same_shape(json.loads(sample), response.get_json(), " ".join(argv[:5]))


def test_finished_jobs_are_priced_alike_in_the_list_and_alone(client: FlaskClient) -> None:
    done = client.post("/generate-batch", headers=ADMIN, json={
        "model_name": "flux-dev", "prompts": ["a", "b"]}).get_json()
    alone = client.get(f"/jobs/{done['job_id']}", headers=ADMIN).get_json()
    listed = client.get("/jobs", headers=ADMIN).get_json()["data"]
    assert alone["cost_usd"] == 0.05
    assert [j["cost_usd"] for j in listed if j["id"] == done["job_id"]] == [0.05]


def test_attempts_show_no_internal_fields(client: FlaskClient) -> None:
    done = client.post("/generate", headers=ADMIN, json={
        "model_name": "flux-dev", "prompt": "a"}).get_json()
    job = client.get(f"/jobs/{done['job_id']}", headers=ADMIN).get_json()
    for attempts in (done["results"][0]["attempts"], job["items"][0]["attempts"]):
        assert [set(a) for a in attempts] == [{"model", "prediction_id", "status", "error"}]


def test_the_openapi_examples_are_accepted(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    models = set(client.get("/models").get_json()["models"])
    for path in ("/generate", "/generate-batch"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "examples"]
        assert set(examples) == models and next(iter(examples)) == "flux-dev"  # one per model
        for example in examples.values():
            response = client.post(path, headers=ADMIN, json=example["value"])
            assert response.status_code == 200, (example, response.get_json())
            assert response.get_json()["success"] is True


# Records what every call of the public API answered, to check each item succeeded.
WATCH = """
import replicate_generation.library as _rb
_seen = []
def _watch(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        _seen.extend(out if isinstance(out, list) else [out])
        return out
    return call
for _name in ("generate", "generate_batch", "generate_mixed"):
    setattr(_rb, _name, _watch(getattr(_rb, _name)))
    setattr(_rb.BatchClient, _name, _watch(getattr(_rb.BatchClient, _name)))
"""
CHECK = """
assert _seen and all(r.success for r in _seen), [(r.prompt, r.error) for r in _seen]
print("CHECKED", len(_seen))
"""


def doc_environment(settings: Settings, work: Path) -> dict[str, str]:
    """The docs' `export`s as written, with the simulator's address in place of Replicate's."""
    env = {**service_env(settings), "PATH": os.environ.get("PATH", ""),
           "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}
    for block in code_blocks(LIBRARY_DOC, "bash"):
        for line in block.splitlines():
            if line.startswith("export "):
                argv = shlex.split(line, comments=True)
                env.update(dict(a.split("=", 1) for a in argv[1:]))
    env["REPLICATE_BASE_URL"] = settings.replicate_base_url
    return env


def test_the_library_docs_python_examples_run_as_written(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    blocks = [b for b in code_blocks(LIBRARY_DOC, "python") if "replicate_generation" in b]
    assert len(blocks) >= 2, "docs/library.md's examples were not found"
    for number, block in enumerate(blocks):
        work = tmp_path / f"example{number}"
        work.mkdir()
        env = doc_environment(make_settings(), work)
        done = subprocess.run([sys.executable, "-c", WATCH + block + CHECK], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, (block, done.stderr[-3000:])
        assert "CHECKED" in done.stdout
    # The first example's files are where it says they land.
    assert (tmp_path / "example0" / "output" / "mountains.webp").is_file()
    assert (tmp_path / "example0" / "output" / "sunset.png").is_file()


def test_the_readmes_python_example_runs_as_written(
        make_settings: Callable[..., Settings], sim: Simulator, tmp_path: Path) -> None:
    blocks = [b for b in code_blocks(README, "python") if "replicate_generation.library" in b]
    assert blocks, "the README's Python example was not found"
    env = doc_environment(make_settings(), tmp_path)
    done = subprocess.run([sys.executable, "-c", WATCH + blocks[0] + CHECK], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CHECKED" in done.stdout
