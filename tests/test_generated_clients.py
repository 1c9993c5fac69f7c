"""Clients generated from the served /openapi.json with the generators' default settings work as
they are: openapi-python-client's submits a job, polls it and downloads a file from a real
gunicorn service (against the simulator); openapi-typescript's types let `tsc --strict` compile
/generate-batch bodies written as the README writes them."""

from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from jsonschema_rs import Draft202012Validator

from conftest import ADMIN, SERVER_TOKEN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.openapi.common import identifier
from replicate_generation.settings import Settings
from servers import Gunicorn

TYPESCRIPT = Path(__file__).resolve().parent / "typescript"
PACKAGE = "replicate_concurrent_generation_api_client"
PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
POLL_SECONDS = 30


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{where}/{index}")


def test_the_document_follows_the_rules_generators_need(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    assert all(PLAIN_NAME.match(name) for name in schemas), sorted(schemas)
    for where, node in _walk(spec):
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "array" in kinds and not where.endswith("/properties"):
            assert "items" in node, where
        if "object" in kinds and not where.endswith("/properties"):
            assert {"properties", "additionalProperties", "oneOf", "anyOf"} & set(node), where
    tags = [tag["name"] for tag in spec["tags"]]
    for path, operations in spec["paths"].items():
        assert not path.startswith("/console") and path != "/", path  # internal routes
        for operation in operations.values():
            assert len(operation["tags"]) == 1 and operation["tags"][0] in tags, path
    for name in ("Generate", "BatchPrompts", "Task"):  # an example body per model
        for model in client.get("/models").get_json()["models"]:
            assert schemas[identifier(f"{name}_{model}")]["examples"]
    for name, schema in schemas.items():  # each example is one its schema admits
        validator = Draft202012Validator({**schema, "components": spec["components"]})
        assert all(validator.is_valid(example) for example in schema.get("examples", [])), name
    job = schemas["Job"]
    assert {"items", "counts", "total", "state", "cost_usd"} <= set(job["required"])
    archive = spec["paths"]["/jobs/{job_id}/archive"]["get"]["responses"]["200"]["content"]
    assert archive["application/zip"]["schema"]["format"] == "binary"


# --------------------------------------------------------------------------- Python


def _generate_python_client(document: Path, out: Path) -> tuple[ModuleType, str]:
    """openapi-python-client's package for the document, imported from `out`."""
    tool = Path(sys.executable).with_name("openapi-python-client")
    done = subprocess.run([str(tool), "generate", "--path", str(document), "--meta", "none",
                           "--output-path", str(out / PACKAGE)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=out)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    sys.path.insert(0, str(out))
    return importlib.import_module(PACKAGE), log


@pytest.fixture
def generated_python(tmp_path: Path) -> Iterator[Callable[[Path], tuple[ModuleType, str]]]:
    yield lambda document: _generate_python_client(document, tmp_path)
    sys.path.remove(str(tmp_path))
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def test_the_python_client_submits_polls_and_downloads(
        make_settings: Callable[..., Settings], sim: Simulator,
        start_gunicorn: Callable[..., Gunicorn], tmp_path: Path,
        generated_python: Callable[[Path], tuple[ModuleType, str]]) -> None:
    settings = make_settings()
    server = start_gunicorn(settings, workers=1)
    document = tmp_path / "openapi.json"
    document.write_bytes(requests.get(f"{server.url}/openapi.json", timeout=10).content)
    package, log = generated_python(document)
    # Every schema and operation is generated; only the zip has no type this generator knows.
    assert "Unable to process schema" not in log and "Could not find reference" not in log, log
    assert log.count("WARNING parsing") <= 1 and "Unsupported content_type application/zip" in log
    api = importlib.import_module(f"{PACKAGE}.api")
    models = importlib.import_module(f"{PACKAGE}.models")
    generate_batch = importlib.import_module(f"{api.__name__}.generate.generate_batch")
    get_job = importlib.import_module(f"{api.__name__}.jobs.get_job")
    get_file = importlib.import_module(f"{api.__name__}.files.get_file")
    job_archive = importlib.import_module(f"{api.__name__}.jobs.job_archive")

    with package.Client(base_url=server.url, headers=ADMIN) as caller:
        body = models.BatchOfPromptsForFluxDev(
            model_name=models.BatchOfPromptsForFluxDevModelName.FLUX_DEV,
            prompts=["a red car", "a blue wave"], custom_filenames=["car", "wave"])
        accepted = generate_batch.sync_detailed(client=caller, body=body, prefer="respond-async")
        assert accepted.status_code == 202, accepted.content
        submitted = accepted.parsed
        assert isinstance(submitted, models.JobSummary) and submitted.total == 2
        job = _poll(get_job, caller, submitted.id)
        assert job.counts.succeeded == 2 and len(job.items) == 2
        first = job.items[0]
        assert first.state == "succeeded" and first.prompt == "a red car"
        relative = first.urls[0].removeprefix("/files/")
        downloaded = get_file.sync(relative=urllib.parse.unquote(relative), client=caller)
        assert isinstance(downloaded, package.types.File)
        assert downloaded.payload.read() == Path(first.files[0]).read_bytes()
        # The zip is untyped here (application/zip is not one of its types), yet callable.
        archive = job_archive.sync_detailed(job_id=job.id, client=caller)
        assert archive.status_code == 200
        assert len(zipfile.ZipFile(io.BytesIO(archive.content)).namelist()) == 2
    prompts = sorted(p["input"]["prompt"] for p in sim.predictions(SERVER_TOKEN))
    assert prompts == ["a blue wave", "a red car"]  # what Replicate (the simulator) was sent


def _poll(get_job: ModuleType, caller: Any, job_id: str) -> Any:
    """The job once it has ended, as a generated client's user would wait for it."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        job = get_job.sync(job_id=job_id, client=caller)
        if job.state not in ("queued", "running", "cancel_requested"):
            return job
        assert time.monotonic() < deadline, f"job still {job.state}"
        time.sleep(0.1)


# --------------------------------------------------------------------------- TypeScript


def _npm_packages() -> Path:
    """tests/typescript/node_modules as its lockfile says (`npm ci` where .ci/run has not)."""
    bin_dir = TYPESCRIPT / "node_modules" / ".bin"
    if not (bin_dir / "tsc").exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install tests/typescript's packages"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TYPESCRIPT, check=True,
                       capture_output=True, timeout=300)
    return bin_dir


def test_typescript_types_compile_a_generate_batch_body(client: FlaskClient,
                                                         tmp_path: Path) -> None:
    bin_dir = _npm_packages()
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(client.get("/openapi.json").get_json()))
    shutil.copy(TYPESCRIPT / "generate_batch.ts", tmp_path)
    generated = subprocess.run([str(bin_dir / "openapi-typescript"), str(document), "-o",
                                str(tmp_path / "api.d.ts")], capture_output=True, text=True,
                               timeout=120, check=False)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    compiled = subprocess.run([str(bin_dir / "tsc"), "--strict", "--noEmit", "--target", "es2022",
                               "--module", "nodenext", "--moduleResolution", "nodenext",
                               "generate_batch.ts"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
