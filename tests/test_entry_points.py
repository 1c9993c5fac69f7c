"""The ways to start the service from a checkout: `python app.py` and `python -m
replicate_generation serve` both serve as the image does, and stop cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from conftest import ADMIN
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, service_env

COMMANDS = {
    "python app.py": [sys.executable, "app.py"],
    "python -m replicate_generation serve": [sys.executable, "-m", "replicate_generation",
                                             "serve"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_command_serves_and_stops_on_sigterm(name: str,
                                                 make_settings: Callable[..., Settings],
                                                 sim: Simulator, tmp_path: Path) -> None:
    settings = make_settings()
    server = Gunicorn({**service_env(settings, workers=1), "PYTHONPATH": str(ROOT)},
                      tmp_path / "serve.log", command=COMMANDS[name])
    try:
        server.wait_ready()
        answer = server.post("/generate", {"model_name": "flux-dev", "prompt": "from " + name},
                             ADMIN, timeout=30)
        assert answer.status_code == 200, answer.text
        assert requests.get(server.url + "/health", timeout=5).json()["status"] == "healthy"
        server.proc.send_signal(signal.SIGTERM)  # to the command's own pid, as Docker would
        assert server.proc.wait(timeout=30) == 0, server.log()
    finally:
        server.stop()
    assert len(sim.predictions(settings.replicate_api_token)) == 1


def test_the_cli_explains_itself() -> None:
    done = subprocess.run([sys.executable, "-m", "replicate_generation", "--help"],
                          capture_output=True, text=True, timeout=30, check=True, cwd=ROOT)
    for command in ("run", "status", "serve", "simulator", "demo"):
        assert f"    {command}" in done.stdout
