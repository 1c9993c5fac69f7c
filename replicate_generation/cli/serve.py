"""The `serve`, `simulator` and `demo` commands: run the service as the image does, or a demo."""

from __future__ import annotations

import argparse
import os
import sys

GUNICORN_CONFIG = "python:replicate_generation.gunicorn_conf"
WSGI_APP = "replicate_generation.app:create_app()"


def gunicorn_argv(python: str | None = None) -> list[str]:
    """The image's CMD, run with this interpreter: gunicorn with the package's own config."""
    return [python or sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, WSGI_APP]


def serve() -> int:
    """Replace this process with gunicorn (so it gets the signals), as the image's CMD runs."""
    argv = gunicorn_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv: this interpreter running gunicorn
    return 1  # not reached: execv replaces the process or raises


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `serve`, `simulator` and `demo`."""
    command = commands.add_parser(
        "serve", help="run the HTTP service under gunicorn (settings from the environment/.env)")
    command.set_defaults(func=lambda _args: serve())
    sim = commands.add_parser("simulator", add_help=False,
                              help="run the local Replicate simulator (dev tool; --help for its "
                              "options)")
    sim.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sim.set_defaults(func=_simulator)
    demo = commands.add_parser("demo", help="the simulator plus the service: no token, no network")
    demo.add_argument("--port", type=int, default=5003, help="service port")
    demo.add_argument("--sim-port", type=int, default=5055, help="simulator port")
    demo.add_argument("--run-seconds", type=float, default=2.0,
                      help="how long each simulated prediction runs")
    demo.set_defaults(func=_demo)


def _simulator(args: argparse.Namespace) -> int:
    from replicate_generation.devtools import simulator

    simulator.main(args.args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from replicate_generation.devtools.demo import run_demo

    return run_demo(args.port, args.sim_port, args.run_seconds)
