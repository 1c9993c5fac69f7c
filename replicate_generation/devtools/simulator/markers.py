"""Prompt markers: what one prediction does, chosen by its prompt, and how long it runs.

``#fail``/``#nsfw``/``#oom`` fail (real error strings), ``#empty`` gives ``[]``, ``#hang`` never
ends, ``#slow=<s>`` sets the time; ``#fail@flux-dev`` scopes any marker to one model of a chain.
Hostile outputs, what a community model's author can serve (`OutputTricks`): ``#output_url=<url>``,
``#redirect_to=<url>``, ``#drip=<bytes/s>``, ``#outputs=<n>``, ``#size=<bytes>``,
``#gzip_bomb=<bytes>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from replicate_generation.devtools.simulator.config import SimConfig

ERROR_TRANSIENT = "Director: unexpected error handling prediction (E6716)"
ERROR_SENSITIVE = "The input or output was flagged as sensitive. (E005)"
ERROR_OOM = (
    "CUDA out of memory. Tried to allocate 5.92 GiB (GPU 0; 23.69 GiB total capacity; "
    "17.28 GiB already allocated; 4.94 GiB free; 17.42 GiB reserved in total by PyTorch)"
)

_SLOW_MARKER = re.compile(r"#slow=(\d+(?:\.\d+)?)")
_SCOPED_MARKER = re.compile(r"(#(?:fail|nsfw|oom|empty|hang))@([\w.\-/]+)")
_FAIL_MARKERS = (("#fail", ERROR_TRANSIENT), ("#nsfw", ERROR_SENSITIVE), ("#oom", ERROR_OOM))


@dataclass(frozen=True)
class Behaviour:
    """What the prompt markers ask this prediction to do."""

    error: str | None = None  # set: the prediction fails with this error
    run_seconds: float | None = None  # #slow=N
    hang: bool = False
    empty: bool = False


def behaviour(prompt: str, ref: str = "") -> Behaviour:
    """Read the markers; ``#fail@<name>`` (any marker) applies only to models whose ref
    (``owner/name``) ends with that name, so a test can fail one model of a fallback chain."""
    name = ref.rsplit("/", 1)[-1]
    applies = {m.group(0) for m in _SCOPED_MARKER.finditer(prompt) if m.group(2) in (name, ref)}
    plain = _SCOPED_MARKER.sub(lambda m: m.group(1) if m.group(0) in applies else "", prompt)
    slow = _SLOW_MARKER.search(plain)
    error = next((text for marker, text in _FAIL_MARKERS if marker in plain), None)
    return Behaviour(
        error=error,
        run_seconds=float(slow.group(1)) if slow else None,
        hang="#hang" in plain,
        empty="#empty" in plain,
    )


def _spread_fraction(prompt: str, seed: Any) -> float:
    """Return u in [0, 1) from the prompt and the seed input only, the same in every run."""
    key = json.dumps([prompt, seed], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def run_seconds_for(prompt: str, config: SimConfig, *, seed: Any = None, model: str = "") -> float:
    """Return the processing time a prediction of this prompt gets (``math.inf`` for #hang).

    ``#slow=N`` wins, else a spread hashed from prompt and seed: benchmarks can predict makespans.
    """
    found = behaviour(prompt, model)
    if found.hang:
        return math.inf
    if found.run_seconds is not None:
        return found.run_seconds
    if config.run_seconds_spread <= 0:
        return config.run_seconds
    return config.run_seconds + config.run_seconds_spread * _spread_fraction(prompt, seed)


_TRICK = re.compile(r"#(output_url|redirect_to|drip|outputs|size|gzip_bomb)=(\S+)")
_NUMBERS = {"drip": float, "outputs": int, "size": int, "gzip_bomb": int}


@dataclass(frozen=True)
class OutputTricks:
    """How a prediction's outputs turn hostile (all None: an honest model)."""

    output_url: str | None = None  # every output is this URL (an internal page, say)
    redirect_to: str | None = None  # each output's URL answers 302 to this one
    drip: float | None = None  # output bytes served at this many per second
    outputs: int | None = None  # this many outputs, whatever the input asked
    size: int | None = None  # each output padded to about this many bytes
    gzip_bomb: int | None = None  # served gzip-encoded, inflating to this many bytes


@lru_cache(maxsize=256)
def output_tricks(prompt: str) -> OutputTricks:
    """Read the hostile-output markers of a prompt; a malformed number is ignored."""
    found: dict[str, Any] = {}
    for name, value in _TRICK.findall(prompt):
        kind = _NUMBERS.get(name)
        try:
            found[name] = value if kind is None else kind(value)
        except ValueError:
            continue
    return OutputTricks(**found)
