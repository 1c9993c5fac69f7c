"""What a call should cost, from the catalogue's prices."""

from __future__ import annotations

from collections.abc import Mapping

from replicate_generation.models.catalogue import ModelSpec


def estimate_cost(spec: ModelSpec, model_input: Mapping[str, object]) -> float:
    """What the call should cost in USD, from the catalogue's price.

    Per image x num_outputs, per call, per second x duration or per 1,000 prompt characters.
    """
    unit = spec.price_unit
    if unit == "call":
        amount = 1.0
    elif unit == "image":
        amount = _count(model_input, spec, "num_outputs", 1)
    elif unit == "second":
        amount = _count(model_input, spec, "duration", 0)
    else:
        amount = len(str(model_input.get("prompt", ""))) / 1000
    return round(spec.price_usd * amount, 6)


def _count(model_input: Mapping[str, object], spec: ModelSpec, name: str, fallback: int) -> float:
    param = spec.param(name)
    value = model_input.get(name, param.default if param is not None else fallback)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float(fallback)
