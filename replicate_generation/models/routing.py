"""Which model a request item runs on, with what input, and which fallbacks could take it.

A reference goes to a model that can take it (one image: flux-kontext-max, two or three:
nano-banana), never dropped; an unknown parameter is an error, never a reason to switch models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from replicate_generation.errors import InvalidRequest
from replicate_generation.models.catalogue import MODELS, ModelSpec, Param
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.fallback import (
    fallback_or_reason,
    reference_key,
    reference_value,
    translate,
)
from replicate_generation.models.validation import build_input, check_value

REFERENCE_KEYS: tuple[str, ...] = (
    "input_image", "image_input", "image", "start_image", "image_prompt",
    "reference_image", "reference_images", "audio_prompt",
)  # fmt: skip
"""Every key a caller may put a reference under, whatever the model calls it."""

_LIST_KEYS = frozenset({"image_input", "reference_images"})
_AUDIO_KEYS = frozenset({"audio_prompt"})
SINGLE_IMAGE_MODEL = "flux-kontext-max"
MULTI_IMAGE_MODEL = "nano-banana"


@dataclass(frozen=True)
class Plan:
    """What to run for one request item."""

    requested: ModelSpec
    spec: ModelSpec
    """The model called first (after reference routing)."""
    input: dict[str, object]
    """The validated, complete input for `spec`."""
    routed: str | None
    """Why `spec` is not `requested`, or None when it is."""
    notes: tuple[str, ...]
    """Every parameter mapped or dropped while routing, and every chain model left out."""
    chain: tuple[ModelSpec, ...]
    """Models to try after `spec`, in order; only those that can honour the request."""


@dataclass(frozen=True)
class _Reference:
    key: str
    field: str
    media: str
    items: tuple[str, ...]


def plan(
    requested: ModelSpec,
    prompt: object,
    params: Mapping[str, object],
    *,
    prefix: str = "",
    chains: FallbackChains,
    fallback: bool = True,
) -> Plan:
    """Validate a request item, route its reference, and list the fallbacks that could take it.

    InvalidRequest names the field, also for a reference no model can take as asked.
    """
    reference = _find_reference(params, prefix)
    notes: tuple[str, ...] = ()
    if reference is None:
        spec, routed = requested, None
        model_input = build_input(requested, prompt, params, prefix)
    else:
        others = {k: v for k, v in params.items() if k != reference.key}
        spec, model_input, routed, notes = _place_reference(
            requested, prompt, others, reference, prefix)
    chain: tuple[ModelSpec, ...] = ()
    if fallback:
        chain, skipped = _usable_chain(spec, model_input, chains.chain(spec.id))
        notes = (*notes, *skipped)
    return Plan(requested=requested, spec=spec, input=model_input, routed=routed,
                notes=tuple(notes), chain=chain)


def _find_reference(params: Mapping[str, object], prefix: str) -> _Reference | None:
    """Find and check the one reference the caller gave, under whichever key."""
    given = [key for key in params if key in REFERENCE_KEYS]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequest(f"{prefix}{given[1]}", "Give references under one key, not "
                             + " and ".join(given))
    key = given[0]
    field = f"{prefix}{key}"
    value = params[key]
    media = "audio" if key in _AUDIO_KEYS else "image"
    if key in _LIST_KEYS:
        if not isinstance(value, list):
            raise InvalidRequest(field, f"{field} must be a list of http(s) URLs or data: URIs")
        check_value(Param(key, "uri_list", "references"), value, field)
        items = tuple(str(item) for item in value)
    else:
        if isinstance(value, list):
            raise InvalidRequest(field, f"{field} takes one {media}; give several images as "
                                 "image_input or reference_images")
        items = (str(check_value(Param(key, "uri", "reference"), value, field)),)
    return _Reference(key=key, field=field, media=media, items=items)


def _place_reference(
    requested: ModelSpec, prompt: object, others: Mapping[str, object], ref: _Reference,
    prefix: str,
) -> tuple[ModelSpec, dict[str, object], str | None, tuple[str, ...]]:
    """Put the reference under the requested model's own key, or route to a model that takes it."""
    if requested.reference_media == ref.media:
        return _own_key(requested, prompt, others, ref, prefix)
    if ref.media == "audio":
        takers = [s.id for s in MODELS.values() if s.reference_media == "audio"]
        raise InvalidRequest(ref.field, f"{requested.id} takes no reference audio; "
                             f"{ref.key} is for {', '.join(takers)}")
    if requested.kind != "image":
        raise InvalidRequest(ref.field, f"{requested.id} makes {requested.kind} and takes no "
                             f"reference image; its reference is {requested.reference_key}")
    count = len(ref.items)
    target = MODELS[SINGLE_IMAGE_MODEL if count == 1 else MULTI_IMAGE_MODEL]
    if count > target.max_references:
        raise InvalidRequest(ref.field, f"{ref.field} has {count} images; at most "
                             f"{target.max_references} reference images are supported "
                             f"(by {target.id})")
    source_input = build_input(requested, prompt, others, prefix)
    explicit = {name: source_input[name] for name in others}
    translated = translate(requested, explicit, target, quiet_defaults=False)
    if isinstance(translated, str):
        raise InvalidRequest(ref.field, f"{requested.id} takes no reference image and "
                             f"{target.id} cannot take this request: {translated}")
    mapped, notes = translated
    key = reference_key(target)
    mapped[key] = reference_value(target, ref.items)
    model_input = build_input(target, source_input["prompt"], mapped, prefix)
    what = "the reference image" if count == 1 else f"the {count} reference images"
    routed = (f"{requested.id} takes no reference image, so this runs on {target.id}, which "
              f"takes {what} as {key}")
    if ref.key != key:
        notes.insert(0, f"reference {ref.key} sent to {target.id} as {key}")
    return target, model_input, routed, tuple(notes)


def _own_key(
    spec: ModelSpec, prompt: object, others: Mapping[str, object], ref: _Reference, prefix: str,
) -> tuple[ModelSpec, dict[str, object], str | None, tuple[str, ...]]:
    key = reference_key(spec)
    count, most = len(ref.items), spec.max_references
    if count > most:
        what = "one reference image" if most == 1 else f"at most {most} reference images"
        if ref.media == "audio":
            what = "one reference recording"
        raise InvalidRequest(ref.field, f"{spec.id} takes {what} (as {key}); {count} given")
    model_input = build_input(spec, prompt, {**others, key: reference_value(spec, ref.items)},
                              prefix)
    notes = () if ref.key == key else (f"reference {ref.key} sent to {spec.id} as {key}",)
    return spec, model_input, None, notes


def _usable_chain(
    spec: ModelSpec, model_input: Mapping[str, object], chain: Sequence[ModelSpec],
) -> tuple[tuple[ModelSpec, ...], tuple[str, ...]]:
    kept: list[ModelSpec] = []
    skipped: list[str] = []
    for target in chain:
        outcome = fallback_or_reason(spec, model_input, target)
        if isinstance(outcome, str):
            skipped.append(f"fallback {target.id} left out: {outcome}")
        elif target.id != spec.id and target not in kept:
            kept.append(target)
    return tuple(kept), tuple(skipped)
