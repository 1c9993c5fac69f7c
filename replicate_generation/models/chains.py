"""Each model's fallback chain: the defaults, REPLICATE_FALLBACK_CHAINS parsed and checked.

A chain is an explicit list tried in order and never followed transitively, so it always ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from replicate_generation.models.catalogue import MODELS, ModelSpec

_ENV = "REPLICATE_FALLBACK_CHAINS"


DEFAULT_CHAINS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "flux-dev": ("qwen-image",),
    "flux-kontext-max": (),   # every other image model would lose its reference image
    "qwen-image": ("flux-dev",),
    "imagen-4-ultra": ("flux-dev",),
    "nano-banana": ("imagen-4-ultra",),
    "flux-1.1-pro-ultra": ("flux-dev",),
    "veo-3-fast": (),
    "kling-v2.1-master": (),
    "chatterbox": (),
})  # fmt: skip
"""Each model's fallbacks, tried in order after it and never followed further.

From the upstream README's list (nano-banana -> imagen-4-ultra, qwen-image -> flux-dev, ...)
without its flux-dev <-> qwen ping-pong: a chain is a plain list, so it always ends.
"""


class FallbackChains:
    """Validated fallback chains: known models, same kind, no model in its own chain, no repeat."""

    def __init__(self, chains: Mapping[str, Sequence[str]]) -> None:
        resolved: dict[str, tuple[ModelSpec, ...]] = {spec.id: () for spec in MODELS.values()}
        for name, targets in chains.items():
            spec = _model(name, f"{_ENV}: unknown model {name!r}")
            if isinstance(targets, str) or not isinstance(targets, Sequence):
                raise ValueError(f"{_ENV}: the chain of {spec.id} must be a list of model ids")
            chain: list[ModelSpec] = []
            for target_name in targets:
                if not isinstance(target_name, str):
                    raise ValueError(f"{_ENV}: the chain of {spec.id} must list model ids "
                                     f"(strings), not {target_name!r}")
                target = _model(target_name, f"{_ENV}: unknown model {target_name!r} in the "
                                f"chain of {spec.id}")
                if target is spec:
                    raise ValueError(f"{_ENV}: {spec.id} is listed in its own chain")
                if target in chain:
                    raise ValueError(f"{_ENV}: {target.id} is listed twice in the chain of "
                                     f"{spec.id}")
                if target.kind != spec.kind:
                    raise ValueError(f"{_ENV}: {spec.id} makes {spec.kind} but its chain lists "
                                     f"{target.id}, which makes {target.kind}")
                chain.append(target)
            resolved[spec.id] = tuple(chain)
        self._chains = resolved

    @classmethod
    def default(cls) -> FallbackChains:
        return cls(DEFAULT_CHAINS)

    @classmethod
    def parse(cls, text: str | None) -> FallbackChains:
        """Parse `{"model": ["next", ...]}`; models it does not name keep their default chain.

        None or blank gives the defaults, `[]` turns a fallback off; ValueError names a problem.
        """
        if text is None or not text.strip():
            return cls.default()
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_ENV} is not valid JSON: {exc.msg} at position {exc.pos}") \
                from None
        if not isinstance(data, dict):
            raise ValueError(f'{_ENV} must be a JSON object such as {{"flux-dev": ["qwen-image"]}}')
        merged: dict[str, Sequence[str]] = dict(DEFAULT_CHAINS)
        seen: set[str] = set()
        for name, targets in data.items():
            spec = _model(name, f"{_ENV}: unknown model {name!r}")
            if spec.id in seen:
                raise ValueError(f"{_ENV}: {spec.id} is given twice")
            seen.add(spec.id)
            if not isinstance(targets, list):
                raise ValueError(f"{_ENV}: the chain of {spec.id} must be a list of model ids")
            merged[spec.id] = targets
        return cls(merged)

    def chain(self, model_id: str) -> tuple[ModelSpec, ...]:
        """The models to try, in order, after `model_id` (a short id or owner/name) fails."""
        return self._chains[_model(model_id, f"unknown model {model_id!r}").id]

    def as_dict(self) -> dict[str, list[str]]:
        return {name: [s.id for s in chain] for name, chain in self._chains.items()}

    # Settings holds one: compared, hashed and shown by value, as its other fields are.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, FallbackChains) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple((name, tuple(ids)) for name, ids in self.as_dict().items()))

    def __repr__(self) -> str:
        return f"FallbackChains({self.as_dict()!r})"


def _model(name: str, message: str) -> ModelSpec:
    for spec in MODELS.values():
        if name in (spec.id, spec.ref):
            return spec
    raise ValueError(message)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{_ENV}: {key!r} is given twice")
        out[key] = value
    return out
