"""What a model outside the curated catalogue costs: Replicate bills it per second of
`metrics.predict_time` at its hardware's price, from a dated table; which hardware a model runs
on is the operator's word (MODEL_HARDWARE), since Replicate's model API does not say.

Pure data and parsing: no settings, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Replicate's public price per second of each hardware SKU (replicate.com/pricing), as of this
# date: a change there needs a new table here.
PRICES_AS_OF = "2026-03-01"
HARDWARE_USD_PER_SECOND: Mapping[str, float] = MappingProxyType({
    "cpu": 0.000100,
    "gpu-t4": 0.000225,
    "gpu-a40-small": 0.000575,
    "gpu-a40-large": 0.000725,
    "gpu-a40-large-2x": 0.001450,
    "gpu-a40-large-4x": 0.002900,
    "gpu-a40-large-8x": 0.005800,
    "gpu-l40s": 0.000975,
    "gpu-2x-l40s": 0.001950,
    "gpu-4x-l40s": 0.003900,
    "gpu-8x-l40s": 0.007800,
    "gpu-a100-large": 0.001400,
    "gpu-a100-large-2x": 0.002800,
    "gpu-a100-large-4x": 0.005600,
    "gpu-a100-large-8x": 0.011200,
    "gpu-h100": 0.001525,
    "gpu-h100-2x": 0.003050,
    "gpu-h100-4x": 0.006100,
    "gpu-h100-8x": 0.012200,
})
# Replicate ends any prediction after 30 minutes of running, whatever the caller does.
REPLICATE_MAX_RUN_SECONDS = 1800.0
_OWNER_OR_MODEL = re.compile(r"[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)?")


@dataclass(frozen=True)
class ModelHardware:
    """MODEL_HARDWARE: `owner/name=sku` or `owner=sku`, comma separated; a model's own entry
    wins over its owner's. Names are compared lower-case, as Replicate's are."""

    entries: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> ModelHardware:
        """:raises ValueError: naming the entry that is wrong."""
        entries: dict[str, str] = {}
        for entry in (text or "").split(","):
            if not entry.strip():
                continue
            model, _, sku = (part.strip().lower() for part in entry.partition("="))
            if not _OWNER_OR_MODEL.fullmatch(model):
                raise ValueError("MODEL_HARDWARE entries are owner/name=<hardware> or "
                                 f"owner=<hardware>; not {entry.strip()[:60]!r}")
            if sku not in HARDWARE_USD_PER_SECOND:
                raise ValueError(f"MODEL_HARDWARE: {sku[:40]!r} for {model} is not a hardware "
                                 f"the price table knows ({', '.join(HARDWARE_USD_PER_SECOND)})")
            entries[model] = sku
        return cls(tuple(sorted(entries.items())))

    def of(self, ref: str) -> str | None:
        """The hardware `owner/name` runs on, or None when the operator did not say."""
        known = dict(self.entries)
        model = ref.split(":", 1)[0].lower()
        return known.get(model, known.get(model.split("/", 1)[0]))


@dataclass(frozen=True)
class TimePrices:
    """Prices by billed time: a model's hardware price per second, and the longest one
    prediction can be billed (the service cancels it at its task timeout)."""

    hardware: ModelHardware = ModelHardware()
    longest_seconds: float = REPLICATE_MAX_RUN_SECONDS

    def per_second(self, ref: str) -> float | None:
        """USD per billed second of `owner/name`, or None when its hardware is unknown."""
        sku = self.hardware.of(ref)
        return None if sku is None else HARDWARE_USD_PER_SECOND[sku]


# No model's hardware known: every non-curated model's cost is unknown.
NO_TIME_PRICES = TimePrices()
