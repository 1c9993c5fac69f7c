"""Turn a request body (the service's JSON, or a library/CLI call) into validated tasks.

Flask-free; problems are `InvalidRequest`s naming the field. Request options (async, webhook,
dry_run, fallback, placeholder, priority, deadline_seconds) are taken out first, so they never
reach a model's parameters.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from replicate_generation.errors import ExpandedRequestTooLarge, InvalidRequest
from replicate_generation.generation import Task
from replicate_generation.models import schemas
from replicate_generation.models.catalogue import ModelSpec
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.cost import estimate_cost
from replicate_generation.models.hardware import NO_TIME_PRICES, TimePrices
from replicate_generation.models.routing import plan
from replicate_generation.models.validation import resolve_model
from replicate_generation.outputs import default_stem, safe_filename
from replicate_generation.outputs.names import shared_name

OPTION_KEYS = ("async", "webhook", "dry_run", "fallback", "fallback_on_content_policy",
               "placeholder", "priority", "deadline_seconds")
PRIORITIES = ("interactive", "batch")
# The longest start deadline a request may ask for: a day.
MAX_DEADLINE_SECONDS = 86_400


@dataclass(frozen=True)
class Options:
    """How to run a request, as opposed to what to generate."""

    run_async: bool = False
    webhook: str | None = None
    dry_run: bool = False
    fallback: bool = True
    fallback_on_content_policy: bool = False
    placeholder: bool = False
    # None: interactive when the caller waits for the answer, batch when it runs async.
    priority: str | None = None
    # Seconds from acceptance by which each item's prediction must be created (None: no limit).
    deadline_seconds: float | None = None


@dataclass(frozen=True)
class Parsed:
    tasks: list[Task]
    options: Options


def request_hash(route: str, body: dict[str, Any]) -> str:
    """A stable fingerprint of a request: same route and same JSON (key order aside)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()


def parse_options(body: dict[str, Any]) -> tuple[Options, dict[str, Any]]:
    """Split the request options from the rest of the body."""
    rest = {k: v for k, v in body.items() if k not in OPTION_KEYS}
    flags = {}
    for name in ("async", "dry_run", "fallback", "fallback_on_content_policy", "placeholder"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(name, f"{name} must be true or false")
        flags[name] = value
    webhook = body.get("webhook")
    if webhook is not None and not isinstance(webhook, str):
        raise InvalidRequest("webhook", "webhook must be a URL string")
    priority = body.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise InvalidRequest("priority", "priority must be interactive or batch")
    options = Options(
        run_async=bool(flags["async"]), webhook=webhook, dry_run=bool(flags["dry_run"]),
        fallback=flags["fallback"] is not False,
        fallback_on_content_policy=bool(flags["fallback_on_content_policy"]),
        placeholder=bool(flags["placeholder"]), priority=priority,
        deadline_seconds=_deadline_seconds(body.get("deadline_seconds")))
    return options, rest


def _deadline_seconds(value: object) -> float | None:
    """A JSON number in (0, MAX_DEADLINE_SECONDS]; booleans (ints to Python) are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value <= MAX_DEADLINE_SECONDS):
        raise InvalidRequest("deadline_seconds", "deadline_seconds must be a number of seconds "
                             f"greater than 0 and at most {MAX_DEADLINE_SECONDS}")
    return float(value)


def parse_single(body: dict[str, Any], chains: FallbackChains) -> Parsed:
    """The body of POST /generate: one prompt for one model."""
    options, rest = parse_options(body)
    params = {k: v for k, v in rest.items() if k not in ("model_name", "custom_filename")}
    requested = resolve_model(rest.get("model_name"))
    stem = (safe_filename(rest["custom_filename"], "custom_filename")
            if rest.get("custom_filename") is not None else default_stem(requested.id, None))
    task = _task(0, requested, params.pop("prompt", None), params, stem, options, chains, "")
    return Parsed(tasks=[task], options=options)


def parse_batch(body: dict[str, Any], max_items: int, chains: FallbackChains) -> Parsed:
    """The body of POST /generate-batch: `prompts` for one model, or a `tasks` list."""
    options, rest = parse_options(body)
    if "tasks" in rest and "prompts" in rest:
        raise InvalidRequest("tasks", "Give either tasks or prompts, not both")
    if "tasks" in rest:
        tasks = _tasks_mode(rest, max_items, options, chains)
        check_unique_names(tasks, lambda i: f"tasks[{i}].custom_filename")
    elif "prompts" in rest:
        tasks = _prompts_mode(rest, max_items, options, chains)
        check_unique_names(tasks, lambda i: f"custom_filenames[{i}]")
    else:
        raise InvalidRequest("prompts", "Either tasks array or prompts array is required")
    return Parsed(tasks=tasks, options=options)


def _task(index: int, requested: Any, prompt: object, params: dict[str, Any], stem: str,
          options: Options, chains: FallbackChains, prefix: str) -> Task:
    if not requested.curated:  # checked against its own schema; no routing, no fallback
        if options.placeholder:
            raise InvalidRequest("placeholder", "placeholders exist only for curated image "
                                 "models")
        model_input = schemas.validate(requested, prompt, params, prefix)
        return Task(index=index, spec=schemas.runnable(requested), input=model_input, stem=stem,
                    requested=requested)
    if options.placeholder and requested.kind != "image":
        raise InvalidRequest("placeholder", f"{requested.id} makes {requested.kind}: the black "
                             "placeholder exists only for image models")
    planned = plan(requested, prompt, params, prefix=prefix, chains=chains,
                   fallback=options.fallback)
    return Task(index=index, spec=planned.spec, input=_with_seed(planned.spec, planned.input),
                stem=stem,
                requested=planned.requested, chain=planned.chain, routed=planned.routed,
                notes=planned.notes,
                fallback_on_content_policy=options.fallback_on_content_policy,
                placeholder=options.placeholder)


def _with_seed(spec: ModelSpec, model_input: dict[str, object]) -> dict[str, object]:
    """Give every item of a seeded model its own seed unless the caller chose one: two items
    with the same prompt then differ, so a lost create's lookup can never adopt the other's
    prediction, and the result is reproducible (the seed is returned)."""
    seed = spec.param("seed")
    if seed is None or "seed" in model_input:
        return model_input
    top = int(seed.maximum) if seed.maximum is not None else 2**31 - 1
    return {**model_input, "seed": secrets.randbelow(top + 1)}


def _items(body: dict[str, Any], key: str, max_items: int) -> list[Any]:
    items = body[key]
    if not isinstance(items, list) or not items:
        raise InvalidRequest(key, f"{key} must be a non-empty array")
    if len(items) > max_items:
        raise InvalidRequest(key, f"{key} has {len(items)} items; at most {max_items} per batch")
    return items


def _prompts_mode(body: dict[str, Any], max_items: int, options: Options,
                  chains: FallbackChains) -> list[Task]:
    prompts = _items(body, "prompts", max_items)
    names = body.get("custom_filenames")
    if names is not None and (not isinstance(names, list) or len(names) != len(prompts)):
        raise InvalidRequest("custom_filenames",
                             "custom_filenames length must match prompts length")
    requested = resolve_model(body.get("model_name"))
    shared = {k: v for k, v in body.items()
              if k not in ("model_name", "prompts", "custom_filenames")}
    tasks = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequest(f"prompts[{i}]", f"prompts[{i}] must be a non-empty string")
        stem = (safe_filename(names[i], f"custom_filenames[{i}]") if names is not None
                else default_stem(requested.id, i))
        tasks.append(_task(i, requested, prompt, dict(shared), stem, options, chains, ""))
    return tasks


def _tasks_mode(body: dict[str, Any], max_items: int, options: Options,
                chains: FallbackChains) -> list[Task]:
    items = _items(body, "tasks", max_items)
    shared = {k: v for k, v in body.items() if k not in ("model_name", "tasks")}
    if "prompt" in shared:
        # Each task's own prompt would silently win over it: say so instead.
        raise InvalidRequest("prompt", "With tasks, put each prompt inside its task")
    tasks = []
    for i, item in enumerate(items):
        where = f"tasks[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(where, f"Task {i} must be a dictionary")
        requested = resolve_model(item.get("model_name", body.get("model_name")),
                                  f"{where}.model_name")
        own = {k: v for k, v in item.items() if k not in ("model_name", "custom_filename")}
        if "prompt" not in own and requested.curated:
            raise InvalidRequest(f"{where}.prompt", f"Task {i} missing required field: prompt")
        params = {**shared, **own}
        stem = (safe_filename(item["custom_filename"], f"{where}.custom_filename")
                if item.get("custom_filename") is not None else default_stem(requested.id, i))
        # A non-curated model may take no prompt: its own schema says what it requires.
        tasks.append(_task(i, requested, params.pop("prompt", None), params, stem, options,
                           chains, f"{where}."))
    return tasks


def check_expanded_size(tasks: list[Task], limit: int) -> None:
    """Refuse a request whose items' inputs, as sent, add up to more than `limit` bytes."""
    sizes: dict[int, int] = {}
    total = 0
    for task in tasks:
        total += _json_size(task.input, sizes)
        if total > limit:
            raise ExpandedRequestTooLarge(total, limit)


# Strings this long are measured once per object: items share them rather than copy them.
_MEASURED_ONCE_CHARS = 1024


def _json_size(value: object, sizes: dict[int, int]) -> int:
    """len(json.dumps(value)) without building it (the tasks keep every id() alive)."""
    if isinstance(value, str) and len(value) >= _MEASURED_ONCE_CHARS:
        if id(value) not in sizes:
            sizes[id(value)] = len(json.dumps(value))
        return sizes[id(value)]
    if isinstance(value, dict):
        inner = sum(_json_size(str(k), sizes) + 2 + _json_size(v, sizes)
                    for k, v in value.items())
        return 2 + inner + 2 * max(0, len(value) - 1)
    if isinstance(value, list):
        inner = sum(_json_size(v, sizes) for v in value)
        return 2 + inner + 2 * max(0, len(value) - 1)
    return len(json.dumps(value))


def check_unique_names(tasks: list[Task], field: Callable[[int], str]) -> None:
    """Two items may not write the same file: the `_N` names of multi-output items are reserved,
    and every `<name>_...` of a non-curated model's item (how many files it makes is not known)."""
    clash = shared_name((task.index, task.stem, _file_count(task)) for task in tasks)
    if clash is not None:
        index, other, name = clash
        raise InvalidRequest(field(index), f"item {index} could write '{name}', as item {other} "
                             "may; file names must be unique within a batch (names differing "
                             "only in case or Unicode form count as one)")


def _file_count(task: Task) -> int | None:
    """How many files the item writes; None when the model decides (non-curated)."""
    if not task.spec.curated:
        return None
    count = task.input.get("num_outputs", 1)
    return count if isinstance(count, int) and not isinstance(count, bool) else 1


def estimate(tasks: list[Task], prices: TimePrices = NO_TIME_PRICES) -> dict[str, Any]:
    """What a request would cost and which models it would use, without calling Replicate
    (a non-curated model's most possible cost by `prices`, when its hardware is known)."""
    items: list[dict[str, Any]] = []
    if any(not task.spec.curated for task in tasks):
        return _estimate_unknown(tasks, prices)
    for task in tasks:
        items.append({
            "index": task.index, "model_requested": task.model_requested.id,
            "model": task.spec.id, "routed": task.routed, "notes": list(task.notes),
            "fallback_chain": [m.id for m in task.chain],
            "estimated_cost_usd": estimate_cost(task.spec, task.input),
            "max_cost_usd_with_fallbacks": task.max_cost_usd(),
        })
    total = round(sum(estimate_cost(t.spec, t.input) for t in tasks), 6)
    return {"dry_run": True, "estimated_cost_usd": total, "total_items": len(items),
            "models": sorted({str(i["model"]) for i in items}), "items": items}


UNKNOWN_COST_NOTE = ("cost unknown: the service has no price for non-curated models; see the "
                     "model's page on replicate.com")
TIME_COST_NOTE = ("billed by time on the hardware MODEL_HARDWARE names: unknown until it ends, "
                  "at most max_cost_usd_with_fallbacks")


def _estimate_unknown(tasks: list[Task], prices: TimePrices) -> dict[str, Any]:
    """A dry run with a non-curated model: its cost is unknown, so the total is too (null)."""
    items: list[dict[str, Any]] = []
    for task in tasks:
        known = task.spec.curated
        cost = estimate_cost(task.spec, task.input) if known else None
        most = task.max_cost_usd(prices)
        note = [] if known else [UNKNOWN_COST_NOTE if most is None else TIME_COST_NOTE]
        items.append({"index": task.index, "model_requested": task.model_requested.id,
                      "model": task.spec.id, "routed": task.routed,
                      "notes": list(task.notes) + note,
                      "fallback_chain": [m.id for m in task.chain], "estimated_cost_usd": cost,
                      "max_cost_usd_with_fallbacks": most})
    timed = all(item["max_cost_usd_with_fallbacks"] is not None for item in items)
    return {"dry_run": True, "estimated_cost_usd": None, "cost_usd": None,
            "cost_note": TIME_COST_NOTE if timed else UNKNOWN_COST_NOTE, "total_items": len(items),
            "models": sorted({str(i["model"]) for i in items}), "items": items}
