"""One-command demo: the Replicate simulator and the real service (gunicorn) on this machine.

No token and no network needed. It never runs by accident: the service itself has no fallback
to the simulator, so a production start without REPLICATE_API_TOKEN fails loudly instead.
"""

from __future__ import annotations

import os
import signal
import subprocess

from replicate_generation.devtools.simulator import SimConfig, Simulator
from replicate_generation.launch import gunicorn_argv

DEMO_TOKEN = "r8_demo_simulator_token"  # only the simulator accepts it
DEMO_ADMIN_KEY = "demo-admin-key"


def run_demo(port: int, sim_port: int, run_seconds: float) -> int:
    """Start the simulator in this process and gunicorn as a child; stop both on Ctrl-C."""
    simulator = Simulator(SimConfig(run_seconds=run_seconds))
    base_url = simulator.start("127.0.0.1", sim_port)
    env = {**os.environ, "REPLICATE_BASE_URL": base_url, "REPLICATE_API_TOKEN": DEMO_TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": DEMO_ADMIN_KEY, "FLASK_HOST": "127.0.0.1",
           # Demo only, so webhooks can be tried; a real deployment sets its own secret.
           "WEBHOOK_SIGNING_KEY": "demo-webhook-signing-key",
           "FLASK_PORT": str(port), "STATE_FILE": "data/demo.sqlite3",
           # Relative to the working directory, so results read "output/...".
           "OUTPUT_DIR": "output"}
    service = subprocess.Popen(gunicorn_argv(), env=env)  # noqa: S603 - fixed argv
    _banner(port, base_url)
    # `kill` (SIGTERM) stops the demo as Ctrl-C does, instead of orphaning gunicorn.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return service.wait()
    except KeyboardInterrupt:
        service.send_signal(signal.SIGTERM)
        return service.wait(timeout=30)
    finally:
        simulator.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _banner(port: int, sim_url: str) -> None:
    print(f"""
  DEMO MODE: the service talks to a local Replicate simulator at {sim_url}, not to Replicate.
  Service:   http://127.0.0.1:{port}      admin key: {DEMO_ADMIN_KEY}
  Try:       curl -s http://127.0.0.1:{port}/health
             curl -s -X POST http://127.0.0.1:{port}/generate \\
               -H 'Content-Type: application/json' -H 'X-Admin-API-Key: {DEMO_ADMIN_KEY}' \\
               -d '{{"model_name": "flux-dev", "prompt": "A serene mountain landscape"}}'
  Files land in ./output. Ctrl-C stops both.
""", flush=True)
