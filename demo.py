"""One-command demo: the Replicate simulator and the real service (gunicorn) on this machine.

No token and no network needed. It never runs by accident: the service itself has no fallback
to the simulator, so a production start without REPLICATE_API_TOKEN fails loudly instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from replicate_simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent
DEMO_TOKEN = "r8_demo_simulator_token"  # only the simulator accepts it
DEMO_ADMIN_KEY = "demo-admin-key"


def main() -> int:
    """Start the simulator in this process and gunicorn as a child; stop both on Ctrl-C."""
    args = _parse_args()
    simulator = Simulator(SimConfig(run_seconds=args.run_seconds))
    base_url = simulator.start("127.0.0.1", args.sim_port)
    env = {**os.environ, "REPLICATE_BASE_URL": base_url, "REPLICATE_API_TOKEN": DEMO_TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": DEMO_ADMIN_KEY, "FLASK_HOST": "127.0.0.1",
           # Demo only, so webhooks can be tried; a real deployment sets its own secret.
           "WEBHOOK_SIGNING_KEY": "demo-webhook-signing-key",
           "FLASK_PORT": str(args.port), "STATE_FILE": "data/demo.sqlite3",
           # Relative to the service's working directory (ROOT), so results read "output/...".
           "OUTPUT_DIR": "output"}
    gunicorn = Path(sys.executable).parent / "gunicorn"
    service = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(gunicorn), "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, env=env)
    _banner(args.port, base_url)
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


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=5003, help="service port")
    parser.add_argument("--sim-port", type=int, default=5055, help="simulator port")
    parser.add_argument("--run-seconds", type=float, default=2.0,
                        help="how long each simulated prediction runs")
    return parser.parse_args()


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


if __name__ == "__main__":
    sys.exit(main())
