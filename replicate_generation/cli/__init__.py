"""The `replicate-generation` command (also `python -m replicate_generation`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from replicate_generation import __version__
from replicate_generation.cli import serve_edge


def build_parser() -> argparse.ArgumentParser:
    # Here, not at the top: `edge` (the image's PID 1) runs without loading these.
    from replicate_generation.cli import batch, migrate, serve, status

    parser = argparse.ArgumentParser(
        prog="replicate-generation",
        description="Generate with Replicate models within each account's limits.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    batch.add_parser(commands)
    status.add_parser(commands)
    serve.add_parsers(commands)
    serve_edge.add_parser(commands)
    migrate.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; return its exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["simulator"]:
        from replicate_generation.cli import serve

        # argparse's REMAINDER drops options that come first (`simulator --port 5055`).
        return serve.run_simulator(words[1:])
    if words[:1] == ["edge"]:
        return serve_edge.main(words[1:])
    args = build_parser().parse_args(words)
    code: int = args.func(args)
    return code
