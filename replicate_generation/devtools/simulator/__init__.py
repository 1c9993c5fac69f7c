"""A local, threaded simulator of Replicate's HTTP API for the tests, the benchmarks and the demo.

The real ``replicate`` client runs against it unchanged; other processes drive it under ``/_sim/``;
``replicate-generation simulator --port 5055`` serves it alone (any non-empty token works).
"""

from replicate_generation.devtools.simulator.catalogue import MODELS, ModelSpec
from replicate_generation.devtools.simulator.cli import build_arg_parser, config_from_args, main
from replicate_generation.devtools.simulator.config import SimConfig
from replicate_generation.devtools.simulator.creates import parse_cancel_after, parse_prefer_wait
from replicate_generation.devtools.simulator.facade import Simulator
from replicate_generation.devtools.simulator.faults import CLOUDFLARE_502_HTML, CREATE_FAULT_KINDS
from replicate_generation.devtools.simulator.ledger import token_hash
from replicate_generation.devtools.simulator.markers import (
    ERROR_OOM,
    ERROR_SENSITIVE,
    ERROR_TRANSIENT,
    run_seconds_for,
)
from replicate_generation.devtools.simulator.output_files import output_bytes
from replicate_generation.devtools.simulator.predictions import parse_iso8601

__all__ = [
    "CLOUDFLARE_502_HTML",
    "CREATE_FAULT_KINDS",
    "ERROR_OOM",
    "ERROR_SENSITIVE",
    "ERROR_TRANSIENT",
    "MODELS",
    "ModelSpec",
    "SimConfig",
    "Simulator",
    "build_arg_parser",
    "config_from_args",
    "main",
    "output_bytes",
    "parse_cancel_after",
    "parse_iso8601",
    "parse_prefer_wait",
    "run_seconds_for",
    "token_hash",
]
