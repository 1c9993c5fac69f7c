"""Which model a request runs on, with what input, and what to try when that model fails.

Pure functions over the catalogue: no Flask, no network. The upstream library's ideas, without its
defects (shared/reference/upstream-defects.md §1.3, §1.4, §6):

* A reference given to a model that cannot take it goes to one that can (one image:
  flux-kontext-max, two or three: nano-banana), and the caller is told; a reference is never
  dropped, and an unknown parameter is an error, never a reason to switch models.
* Fallback happens only when a model itself fails (`should_fall_back`). Each model's chain is an
  explicit list tried in order and never followed transitively, so it always ends.
* A fallback maps the input to the next model (values too: webp -> png, aspect ratios to the
  nearest allowed) and says what it changed; it is refused when it would lose the reference,
  change the kind of output or weaken a safety setting, and it never adds a safety downgrade.
* The black 1600x900 placeholder is a separate, explicit call (`write_placeholder`): whoever uses
  it must report it as a placeholder, never as a success.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from replicate_generation.catalogue import MODELS, ModelSpec, Param
from replicate_generation.errors import InvalidRequest
from replicate_generation.model_functions import build_input, check_value
from replicate_generation.outputs import SavedFile, save_outputs

__all__ = [
    "DEFAULT_CHAINS",
    "FALLBACK_ERROR_KINDS",
    "PLACEHOLDER_SIZE",
    "REFERENCE_KEYS",
    "FallbackChains",
    "Plan",
    "estimate_cost",
    "fallback_input",
    "placeholder_png",
    "plan",
    "should_fall_back",
    "write_placeholder",
]

REFERENCE_KEYS: tuple[str, ...] = (
    "input_image", "image_input", "image", "start_image", "image_prompt",
    "reference_image", "reference_images", "audio_prompt",
)  # fmt: skip
"""Every key a caller may put a reference under, whatever the model calls it."""

_LIST_KEYS = frozenset({"image_input", "reference_images"})
_AUDIO_KEYS = frozenset({"audio_prompt"})
SINGLE_IMAGE_MODEL = "flux-kontext-max"
MULTI_IMAGE_MODEL = "nano-banana"

FALLBACK_ERROR_KINDS = frozenset({
    "model_failed",          # the prediction failed on Replicate
    "upstream_unavailable",  # 5xx or unreachable, after the same model's retries
    "replicate_not_found",   # 404: the model is gone
    "replicate_invalid_input",  # 422: the model refused its input
    "empty_output",          # succeeded with nothing to download
})  # fmt: skip
"""GenerationError kinds that mean the model failed; anything else is not the model's fault."""

# Parameters that shape the output: a fallback keeps them even at the source model's default, so
# the caller gets the same shape and format whichever model made it. Other parameters still at the
# source's default give way to the target's own default.
_CARRIED_DEFAULTS = frozenset({"aspect_ratio", "output_format", "output_quality", "num_outputs",
                               "megapixels", "seed"})
# Safety parameters where a higher number is more permissive: a fallback never raises one.
_PERMISSIVE_UPWARDS = frozenset({"safety_tolerance"})
# Booleans that weaken a safety filter when true: a fallback never sets one.
_SAFETY_SWITCHES = frozenset({"disable_safety_checker"})

PLACEHOLDER_SIZE = (1600, 900)

_ENV = "REPLICATE_FALLBACK_CHAINS"


# --------------------------------------------------------------------------- plan


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

    :raises InvalidRequest: naming the field, for any bad or unknown parameter and for a
        reference no model can take as asked (wrong media, too many images).
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
    translated = _translate(requested, explicit, target, quiet_defaults=False)
    if isinstance(translated, str):
        raise InvalidRequest(ref.field, f"{requested.id} takes no reference image and "
                             f"{target.id} cannot take this request: {translated}")
    mapped, notes = translated
    key = _reference_key(target)
    mapped[key] = _reference_value(target, ref.items)
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
    key = _reference_key(spec)
    count, most = len(ref.items), spec.max_references
    if count > most:
        what = "one reference image" if most == 1 else f"at most {most} reference images"
        if ref.media == "audio":
            what = "one reference recording"
        raise InvalidRequest(ref.field, f"{spec.id} takes {what} (as {key}); {count} given")
    model_input = build_input(spec, prompt, {**others, key: _reference_value(spec, ref.items)},
                              prefix)
    notes = () if ref.key == key else (f"reference {ref.key} sent to {spec.id} as {key}",)
    return spec, model_input, None, notes


def _reference_key(spec: ModelSpec) -> str:
    if spec.reference_key is None:
        raise ValueError(f"{spec.id} takes no reference")
    return spec.reference_key


def _reference_value(spec: ModelSpec, items: Sequence[str]) -> object:
    param = spec.param(_reference_key(spec))
    if param is not None and param.type == "uri_list":
        return list(items)
    return items[0]


def _usable_chain(
    spec: ModelSpec, model_input: Mapping[str, object], chain: Sequence[ModelSpec],
) -> tuple[tuple[ModelSpec, ...], tuple[str, ...]]:
    kept: list[ModelSpec] = []
    skipped: list[str] = []
    for target in chain:
        outcome = _fallback(spec, model_input, target)
        if isinstance(outcome, str):
            skipped.append(f"fallback {target.id} left out: {outcome}")
        elif target.id != spec.id and target not in kept:
            kept.append(target)
    return tuple(kept), tuple(skipped)


# --------------------------------------------------------------------------- fallback


def should_fall_back(error_kind: str, *, on_content_policy: bool) -> bool:
    """True only when the model itself failed; never for auth, budget, deadline or local errors."""
    if error_kind == "content_policy":
        return on_content_policy
    return error_kind in FALLBACK_ERROR_KINDS


def fallback_input(
    source: ModelSpec, source_input: Mapping[str, object], target: ModelSpec,
) -> tuple[dict[str, object], tuple[str, ...]] | None:
    """The input for `target` carrying `source_input` over, and notes on what changed.

    None when `target` cannot honour the request: another kind of output, a reference it cannot
    take (it is never dropped), or a safety setting it could only weaken.
    """
    outcome = _fallback(source, source_input, target)
    return None if isinstance(outcome, str) else outcome


def _fallback(
    source: ModelSpec, source_input: Mapping[str, object], target: ModelSpec,
) -> tuple[dict[str, object], tuple[str, ...]] | str:
    """Like fallback_input, but a refusal is the reason, as text."""
    if target.id == source.id:
        return f"it is {source.id} itself"
    if target.kind != source.kind:
        return f"it makes {target.kind}, not {source.kind}"
    translated = _translate(source, source_input, target, quiet_defaults=True)
    if isinstance(translated, str):
        return translated
    mapped, notes = translated
    reference = source_input.get(source.reference_key) if source.reference_key else None
    if reference is not None:
        items = [str(i) for i in reference] if isinstance(reference, list) else [str(reference)]
        taken = "reference audio" if source.reference_media == "audio" else "reference image"
        if target.reference_media != source.reference_media or target.reference_key is None:
            return f"it takes no {taken}, which would be lost"
        if len(items) > target.max_references:
            return f"it takes at most {target.max_references} reference images, not {len(items)}"
        mapped[target.reference_key] = _reference_value(target, items)
        if target.reference_key != source.reference_key:
            notes.append(f"reference {source.reference_key} sent to {target.id} as "
                         f"{target.reference_key}")
    try:
        built = build_input(target, source_input.get("prompt"), mapped)
    except InvalidRequest as exc:
        return f"its input would be invalid ({exc})"
    return built, tuple(notes)


def _translate(
    source: ModelSpec, values: Mapping[str, object], target: ModelSpec, *, quiet_defaults: bool,
) -> tuple[dict[str, object], list[str]] | str:
    """Map every parameter but prompt and the reference; a str is why it cannot be done.

    With `quiet_defaults`, source parameters still at the source's default that the target
    lacks are named together in one note instead of one note each.
    """
    out: dict[str, object] = {}
    notes: list[str] = []
    defaults_left: list[str] = []
    defaults_replaced: list[str] = []
    for name, value in values.items():
        if name == "prompt" or name == source.reference_key or value is None:
            continue
        mine = source.param(name)
        theirs = target.param(name)
        at_default = quiet_defaults and mine is not None and _same(value, mine.default)
        if theirs is None or theirs.type in ("uri", "uri_list"):
            if at_default:
                defaults_left.append(name)
            else:
                notes.append(f"{name}={value!r} dropped: {target.id} has no {name}")
            continue
        if at_default and name not in _CARRIED_DEFAULTS and theirs.default is not None:
            # A tuning knob the caller never set: the target's own default suits it better.
            if not _same(value, theirs.default):
                defaults_replaced.append(f"{name} {value!r} -> {theirs.default!r}")
            continue
        result = _map_value(name, value, theirs, target)
        if isinstance(result, _Refusal):
            return result.reason
        mapped, note = result
        if note:
            notes.append(note)
        if mapped is not _DROP:
            out[name] = mapped
    if defaults_left:
        notes.append(f"{source.id} defaults left out, {target.id} has no such parameters: "
                     + ", ".join(defaults_left))
    if defaults_replaced:
        notes.append(f"{source.id} defaults replaced by those of {target.id}: "
                     + ", ".join(defaults_replaced))
    return out, notes


class _Refusal:
    def __init__(self, reason: str) -> None:
        self.reason = reason


_DROP = object()


def _map_value(
    name: str, value: object, param: Param, target: ModelSpec,
) -> tuple[object, str | None] | _Refusal:
    """The value the target gets for `name` (or _DROP for its own default) and a note."""
    if name in _SAFETY_SWITCHES and value is True:
        return _DROP, f"{name}=True not carried over to {target.id}"
    try:
        return check_value(param, value, name), None
    except InvalidRequest:
        pass
    default_note = f"its default {param.default!r} applies" if param.default is not None \
        else "it is left unset"
    if param.choices is not None and isinstance(value, str):
        choice = _map_choice(name, value, param)
        if choice is not None:
            return choice, f"{name} {value!r} -> {choice!r}: {target.id} has no {value!r}"
        return _DROP, f"{name}={value!r} dropped: {target.id} does not take it; {default_note}"
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and param.type in ("integer", "number") and param.choices is None):
        low = param.minimum if param.minimum is not None else value
        high = param.maximum if param.maximum is not None else value
        clamped = min(max(value, low), high)
        if name in _PERMISSIVE_UPWARDS and clamped > value:
            return _Refusal(f"its {name} cannot be as strict as {value!r} (minimum {low:g})")
        new: object = clamped
        if param.type == "integer":
            new = min(max(round(clamped), math.ceil(low)), math.floor(high))
        try:
            mapped = check_value(param, new, name)
        except InvalidRequest:
            return _DROP, f"{name}={value!r} dropped: {target.id} does not take it; " \
                + default_note
        return mapped, f"{name} {value!r} -> {mapped!r}: the range on {target.id} is " \
            f"{_fmt(param.minimum)}..{_fmt(param.maximum)}"
    if name in _PERMISSIVE_UPWARDS:
        return _Refusal(f"its {name} cannot take {value!r}")
    return _DROP, f"{name}={value!r} dropped: {target.id} does not take it; {default_note}"


def _map_choice(name: str, value: str, param: Param) -> object | None:
    """The closest allowed choice, for the parameters where closeness means something."""
    choices = param.choices or ()
    if name == "output_format":
        if value == "webp" and "png" in choices:
            return "png"  # lossless: nothing of the requested quality is lost
        return None
    if name == "aspect_ratio":
        wanted = _ratio(value)
        if wanted is None:
            return None  # match_input_image has no equivalent without the image
        best: tuple[float, str] | None = None
        for choice in choices:
            ratio = _ratio(choice) if isinstance(choice, str) else None
            if ratio is not None:
                distance = abs(math.log(ratio / wanted))
                if best is None or distance < best[0]:
                    best = (distance, str(choice))
        return best[1] if best is not None else None
    return None


def _ratio(text: str) -> float | None:
    width, colon, height = text.partition(":")
    try:
        w, h = float(width), float(height)
    except ValueError:
        return None
    return w / h if colon and w > 0 and h > 0 else None


def _same(value: object, default: object) -> bool:
    return type(value) is type(default) and value == default


def _fmt(bound: float | None) -> str:
    return "" if bound is None else f"{bound:g}"


# --------------------------------------------------------------------------- chains


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

        None or blank gives the defaults. `[]` turns a model's fallback off.
        :raises ValueError: naming the problem.
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


# --------------------------------------------------------------------------- cost


def estimate_cost(spec: ModelSpec, model_input: Mapping[str, object]) -> float:
    """What the call should cost in USD, from the catalogue's price.

    Per image x num_outputs, per call, per second x duration, or per 1,000 characters of the
    prompt (pro rata).
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


# --------------------------------------------------------------------------- placeholder


@functools.cache
def placeholder_png() -> bytes:
    """A black 1600x900 RGB PNG, built with zlib and struct alone."""
    width, height = PLACEHOLDER_SIZE
    raw = (b"\x00" + bytes(width * 3)) * height  # filter byte 0, then black pixels, per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data


def write_placeholder(spec: ModelSpec, dest_dir: Path, stem: str, *, root: Path) -> SavedFile:
    """Write the black placeholder as `<stem>.png`, atomically, under `root`.

    Only for image models. The caller must report it as a placeholder, never as a success.
    :raises ValueError: for a video or audio model, or a malformed stem.
    :raises outputs.DownloadError: when dest_dir is outside root or the write fails.
    """
    if spec.kind != "image":
        raise ValueError(f"{spec.id} makes {spec.kind}; a placeholder image would be a lie")
    (saved,) = save_outputs([_Bytes(placeholder_png())], dest_dir, stem, root=root,
                            deadline=time.time() + 60)
    return saved
