"""The `serve`, `simulator` and `demo` commands: run the service under gunicorn alone (the image
runs `edge`, cli/serve_edge.py, instead), or a demo."""

from __future__ import annotations

import argparse

from replicate_generation.launch import serve


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `serve`, `simulator` and `demo`."""
    command = commands.add_parser(
        "serve", help="run the HTTP service under gunicorn alone, for a deployment with its own "
        "proxy in front (settings from the environment/.env)")
    command.set_defaults(func=lambda _args: serve())
    sim = commands.add_parser("simulator", add_help=False,
                              help="run the local Replicate simulator (dev tool; --help for its "
                              "options)")
    sim.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sim.set_defaults(func=lambda args: run_simulator(args.args))
    demo = commands.add_parser("demo", help="the simulator plus the service: no token, no network")
    demo.add_argument("--port", type=int, default=5003, help="service port")
    demo.add_argument("--sim-port", type=int, default=5055, help="simulator port")
    demo.add_argument("--run-seconds", type=float, default=2.0,
                      help="how long each simulated prediction runs")
    demo.set_defaults(func=_demo)


def run_simulator(argv: list[str]) -> int:
    """The simulator parses its own options."""
    from replicate_generation.devtools import simulator

    simulator.main(argv)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from replicate_generation.devtools.demo import run_demo

    return run_demo(args.port, args.sim_port, args.run_seconds)
