"""The `edge` command, the image's CMD: nginx in front of gunicorn (replicate_generation/edge/).

Light on purpose: as PID 1 it is parsed without loading the other commands (Flask, SQLAlchemy...).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = ("run nginx on FLASK_PORT in front of gunicorn on a private socket, as the image does "
        "(needs nginx)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="HOST:PORT",
                        help="nginx alone, in front of gunicorns serving there (a balancer)")
    parser.set_defaults(func=run_edge)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `edge`."""
    add_arguments(commands.add_parser("edge", help=HELP))


def run_edge(args: argparse.Namespace) -> int:
    from replicate_generation.edge import run

    return run(args.upstream)


def main(argv: Sequence[str]) -> int:
    """`replicate-generation edge ARGS`, parsed alone."""
    parser = argparse.ArgumentParser(prog="replicate-generation edge", description=HELP)
    add_arguments(parser)
    return run_edge(parser.parse_args(argv))
