"""The ``replicate-generation simulator`` command: the simulator in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from replicate_generation.devtools.simulator.config import SimConfig
from replicate_generation.devtools.simulator.facade import Simulator


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Local simulator of Replicate's HTTP API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--run-seconds", type=float, default=SimConfig.run_seconds)
    parser.add_argument("--queue-seconds", type=float, default=SimConfig.queue_seconds)
    parser.add_argument("--create-rpm", type=float, default=SimConfig.create_rate_per_minute)
    parser.add_argument("--create-burst", type=int, default=SimConfig.create_burst)
    parser.add_argument("--other-rpm", type=float, default=SimConfig.other_rate_per_minute)
    parser.add_argument("--other-burst", type=int, default=SimConfig.other_burst)
    parser.add_argument("--run-seconds-spread", type=float, default=SimConfig.run_seconds_spread)
    parser.add_argument("--output-bytes", type=int, default=SimConfig.output_bytes)
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        run_seconds=args.run_seconds,
        queue_seconds=args.queue_seconds,
        create_rate_per_minute=args.create_rpm,
        create_burst=args.create_burst,
        other_rate_per_minute=args.other_rpm,
        other_burst=args.other_burst,
        run_seconds_spread=args.run_seconds_spread,
        output_bytes=args.output_bytes,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the simulator in the foreground until Ctrl-C."""
    args = build_arg_parser().parse_args(argv)
    sim = Simulator(config_from_args(args))
    url = sim.start(args.host, args.port)
    print(f"Replicate simulator on {url} (any non-empty token works)")
    print(f"  export REPLICATE_BASE_URL={url} REPLICATE_API_TOKEN=r8_demo")
    print(f"  control: {url}/_sim/stats  {url}/_sim/predictions  POST {url}/_sim/config")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
