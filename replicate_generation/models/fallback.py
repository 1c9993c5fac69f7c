"""When a model fails, what to try next: the trigger, and the input mapped to another model.

Values map too (webp -> png, nearest aspect ratio) and the changes are told; a fallback is refused
rather than lose the reference, change the kind of output or weaken a safety setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from replicate_generation.errors import InvalidRequest
from replicate_generation.models.catalogue import ModelSpec, Param
from replicate_generation.models.validation import build_input, check_value

FALLBACK_ERROR_KINDS = frozenset({
    "model_failed",          # the prediction failed on Replicate
    "upstream_unavailable",  # 5xx or unreachable, after the same model's retries
    "replicate_not_found",   # 404: the model is gone
    "replicate_invalid_input",  # 422: the model refused its input
    "empty_output",          # succeeded with nothing to download
})  # fmt: skip
"""GenerationError kinds that mean the model failed; anything else is not the model's fault."""

# Kept even at the source's default, so the output's shape and format do not depend on the model.
_CARRIED_DEFAULTS = frozenset({"aspect_ratio", "output_format", "output_quality", "num_outputs",
                               "megapixels", "seed"})
# Safety parameters where a higher number is more permissive: a fallback never raises one.
_PERMISSIVE_UPWARDS = frozenset({"safety_tolerance"})
# Booleans that weaken a safety filter when true: a fallback never sets one.
_SAFETY_SWITCHES = frozenset({"disable_safety_checker"})


def should_fall_back(error_kind: str, *, on_content_policy: bool) -> bool:
    """True only when the model itself failed; never for auth, budget, deadline or local errors."""
    if error_kind == "content_policy":
        return on_content_policy
    return error_kind in FALLBACK_ERROR_KINDS


def fallback_input(
    source: ModelSpec, source_input: Mapping[str, object], target: ModelSpec,
) -> tuple[dict[str, object], tuple[str, ...]] | None:
    """The input for `target` carrying `source_input` over, and notes on what changed.

    None when `target` would change the output's kind, drop the reference or weaken safety.
    """
    outcome = fallback_or_reason(source, source_input, target)
    return None if isinstance(outcome, str) else outcome


def fallback_or_reason(
    source: ModelSpec, source_input: Mapping[str, object], target: ModelSpec,
) -> tuple[dict[str, object], tuple[str, ...]] | str:
    """Like fallback_input, but a refusal is the reason, as text."""
    if target.id == source.id:
        return f"it is {source.id} itself"
    if target.kind != source.kind:
        return f"it makes {target.kind}, not {source.kind}"
    translated = translate(source, source_input, target, quiet_defaults=True)
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
        mapped[target.reference_key] = reference_value(target, items)
        if target.reference_key != source.reference_key:
            notes.append(f"reference {source.reference_key} sent to {target.id} as "
                         f"{target.reference_key}")
    try:
        built = build_input(target, source_input.get("prompt"), mapped)
    except InvalidRequest as exc:
        return f"its input would be invalid ({exc})"
    return built, tuple(notes)


def translate(
    source: ModelSpec, values: Mapping[str, object], target: ModelSpec, *, quiet_defaults: bool,
) -> tuple[dict[str, object], list[str]] | str:
    """Map every parameter but prompt and the reference; a str is why it cannot be done.

    `quiet_defaults`: defaults the target lacks share one note instead of one note each.
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


def reference_key(spec: ModelSpec) -> str:
    """The input the model takes its reference under; ValueError when it takes none."""
    if spec.reference_key is None:
        raise ValueError(f"{spec.id} takes no reference")
    return spec.reference_key


def reference_value(spec: ModelSpec, items: Sequence[str]) -> object:
    """The references as the model takes them: a list, or the one item."""
    param = spec.param(reference_key(spec))
    if param is not None and param.type == "uri_list":
        return list(items)
    return items[0]

