"""What a call should cost: a curated model at the catalogue's price, any other model at its
hardware's price per billed second (models/hardware.py), else unknown (None)."""

from __future__ import annotations

from collections.abc import Mapping

from replicate_generation.models.catalogue import ModelSpec
from replicate_generation.models.hardware import TimePrices


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


def max_cost(spec: ModelSpec, model_input: Mapping[str, object],
             prices: TimePrices) -> float | None:
    """The most one prediction may cost: a curated model's price, another model's hardware
    price for the longest it can be billed; None when its hardware is unknown."""
    if spec.curated:
        return estimate_cost(spec, model_input)
    rate = prices.per_second(spec.ref)
    return None if rate is None else round(rate * prices.longest_seconds, 6)


def billed_cost(spec: ModelSpec, model_input: Mapping[str, object],
                billed_seconds: float | None, prices: TimePrices) -> float | None:
    """What a finished prediction cost: a curated model's price, another model's billed
    seconds (metrics.predict_time) at its hardware's price; None when either is unknown."""
    if spec.curated:
        return estimate_cost(spec, model_input)
    rate = prices.per_second(spec.ref)
    if rate is None or billed_seconds is None:
        return None
    return round(rate * billed_seconds, 6)


def _count(model_input: Mapping[str, object], spec: ModelSpec, name: str, fallback: int) -> float:
    param = spec.param(name)
    value = model_input.get(name, param.default if param is not None else fallback)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float(fallback)
