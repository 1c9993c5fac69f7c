"""What requests send: each model's parameters and the references it takes, the request options,
and the bodies of /generate, /generate-batch and /configure, as exact as JSON Schema can say.

What JSON Schema cannot say (one file name per prompt, names unique within a batch once case
and Unicode form are ignored, no Windows device names) is said in the descriptions.
"""

from __future__ import annotations

import json

from replicate_generation.http.limit_fields import LIMIT_FIELDS
from replicate_generation.limits.base import LIMIT_RANGES
from replicate_generation.models.catalogue import MODELS, ModelSpec, Param
from replicate_generation.models.routing import MULTI_IMAGE_MODEL, REFERENCE_KEYS
from replicate_generation.models.schemas import MODEL_NAME_PATTERN
from replicate_generation.openapi.common import Schema, nullable, ref
from replicate_generation.request_parsing import MAX_DEADLINE_SECONDS, OPTION_KEYS, PRIORITIES
from replicate_generation.settings import Settings

# What models/validation.py takes as a URI: http(s) (any case) with a host, printable ASCII, at
# most 2048 characters; or a data: URI. Brackets are left out: urllib refuses a bad IPv6 host.
HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://(?:(?![/?#\[\]])[!-~])+(?:[/?#][!-~]*)?$"
DATA_URI_PATTERN = r"^data:[^,]*,"
MAX_URL_LENGTH = 2048
# Python's str.strip() also strips \x1c-\x1f and \x85, which JSON Schema's \s leaves.
NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85]"
# The characters outputs/names.py refuses in a file name: separators, those Windows refuses,
# control and invisible (format, line and paragraph separator) characters.
_NAME_REFUSED = (r'/\\:<>"|?*\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u180e'
                 r"\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb")
# Not starting with '.' or whitespace, no '..', no whitespace before the extension or at the end.
FILE_NAME_PATTERN = (rf"^(?![.\s])(?!.*\.\.)(?!.*\s\.[^.]*$)[^{_NAME_REFUSED}]*"
                     rf"[^{_NAME_REFUSED}\s.]$")
MAX_FILE_NAME_CHARS = 120
# How routing (models/routing.py) reads a reference key: its media, and whether it takes a list.
AUDIO_REFERENCE_KEYS = ("audio_prompt",)
LIST_REFERENCE_KEYS = ("image_input", "reference_images")
# Each model's example body (components' `examples`, /docs' choice of bodies) asks for these.
EXAMPLE_PROMPTS = {"image": ("A lighthouse on a cliff at sunset, in watercolour",
                             "A red fox asleep in fresh snow"),
                   "video": ("A paper boat drifting down a rainy street, slow motion",
                             "Waves rolling onto a black sand beach at dawn"),
                   "audio": ("Welcome! Every word you hear was generated from this text.",
                             "Thank you for listening, and see you tomorrow.")}
EXAMPLE_PROMPTS["other"] = EXAMPLE_PROMPTS["image"]


# --------------------------------------------------------------------------- parameters


def param_schema(param: Param) -> Schema:
    """One catalogue parameter as JSON Schema: type, choices, range, length and default."""
    schema = _base_schema(param)
    schema["description"] = param.description
    if param.choices is not None:
        schema["enum"] = list(param.choices)
    if param.minimum is not None:
        schema["minimum"] = param.minimum
    if param.maximum is not None:
        schema["maximum"] = param.maximum
    if param.default is not None:
        schema["default"] = param.default
    return schema


def _base_schema(param: Param) -> Schema:
    if param.type == "uri":
        return uri_schema()
    if param.type == "uri_list":
        items: Schema = {"type": "array", "items": uri_schema(), "minItems": 1}
        if param.max_items is not None:
            items["maxItems"] = param.max_items
        return items
    schema: Schema = {"type": param.type}
    if param.type == "string" and param.max_length is not None:
        schema["maxLength"] = param.max_length
    if param.required and param.type == "string":
        schema.update(minLength=1, pattern=NOT_BLANK_PATTERN)
    return schema


def uri_schema() -> Schema:
    return {"type": "string", "description": "An http(s) URL (at most 2048 printable ASCII "
                                             "characters) or a data: URI; never a server path.",
            "anyOf": [{"pattern": HTTP_URL_PATTERN, "maxLength": MAX_URL_LENGTH},
                      {"pattern": DATA_URI_PATTERN}]}


def file_name_schema(nullable: bool = True) -> Schema:
    """A caller's file name (outputs/names.py); null, where allowed, asks for the default."""
    return {"type": ["string", "null"] if nullable else "string", "minLength": 1,
            "maxLength": MAX_FILE_NAME_CHARS, "pattern": FILE_NAME_PATTERN,
            "description": "A plain file name (the real extension wins): at most 200 bytes of "
                           "UTF-8 before the extension, not a Windows device name (con, nul, "
                           "com1...)" + ("; null for the default name." if nullable else ".")}


# --------------------------------------------------------------------------- references


def reference_limit(spec: ModelSpec, key: str) -> int:
    """How many references a request for this model may give under `key` (0: none). Its own
    media go under its own reference key; images for an image model without one are routed to
    a model that takes them."""
    media = "audio" if key in AUDIO_REFERENCE_KEYS else "image"
    if spec.reference_media == media:
        return spec.max_references
    if media == "image" and spec.kind == "image":
        return MODELS[MULTI_IMAGE_MODEL].max_references
    return 0


def _reference(spec: ModelSpec, key: str, most: int) -> Schema:
    schema: Schema = ({"type": "array", "items": uri_schema(), "minItems": 1, "maxItems": most}
                      if key in LIST_REFERENCE_KEYS else uri_schema())
    if spec.reference_key is not None:
        where = f"sent to this model as `{spec.reference_key}`"
    else:
        where = "the request is routed to a model that takes it (see `routed`)"
    return {**schema, "description": f"A reference under another name: {where}."}


def model_properties(spec: ModelSpec) -> Schema:
    """Every key a body may give this model: its parameters, then the references it takes."""
    props = {p.name: param_schema(p) for p in spec.params}
    for key in REFERENCE_KEYS:
        most = reference_limit(spec, key)
        if key not in props and most:
            props[key] = _reference(spec, key, most)
    return props


def request_properties(spec: ModelSpec) -> Schema:
    """model_properties for a request body, each default said in its description instead:
    openapi-typescript types a property with a `default` as always present."""
    props = model_properties(spec)
    for schema in props.values():
        if "default" in schema:
            default = json.dumps(schema.pop("default"))
            schema["description"] = f"{schema['description']} Default: {default}."
    return props


def example_body(spec: ModelSpec, batch: bool = False) -> Schema:
    """A body for this model as a caller would write it: a prompt (two in a batch, with their
    file names), a 16:9 frame and a seed where the model takes them."""
    first, second = EXAMPLE_PROMPTS[spec.kind]
    body: Schema = ({"model_name": spec.id, "prompts": [first, second],
                     "custom_filenames": [f"{spec.id}-1", f"{spec.id}-2"]} if batch
                    else {"model_name": spec.id, "prompt": first})
    ratio = spec.param("aspect_ratio")
    if ratio is not None and ratio.choices is not None and "16:9" in ratio.choices:
        body["aspect_ratio"] = "16:9"
    if spec.param("seed") is not None:
        body["seed"] = 42
    return body


def one_reference(props: Schema) -> Schema:
    """At most one reference key in an item (routing refuses two): each rules out the others."""
    keys = [key for key in REFERENCE_KEYS if key in props]
    if len(keys) < 2:
        return {}
    return {"dependentSchemas": {key: {"properties": {other: False for other in keys
                                                      if other != key}} for key in keys}}


# --------------------------------------------------------------------------- request bodies


def model_schema(spec: ModelSpec) -> Schema:
    """The component schema of one model's parameters (what /models describes)."""
    props = model_properties(spec)
    return {"type": "object", "title": spec.id, "description": spec.description,
            "properties": props, "additionalProperties": False,
            "required": [p.name for p in spec.params if p.required], **one_reference(props)}


def _model_name(spec: ModelSpec) -> Schema:
    return {"type": "string", "enum": [spec.id, spec.ref],
            "description": "Short id or full Replicate name."}


def options_properties(webhooks: bool, placeholder: bool = True) -> Schema:
    """The request options taken out of the body before validation (request_parsing); `webhook`
    only where the server signs webhooks (WEBHOOK_SIGNING_KEY), else it is a 400, and
    `placeholder` true only for curated image models."""
    flags = {"async": "Answer 202 with the job at once (as `Prefer: respond-async`).",
             "dry_run": "Answer the cost and the models without calling Replicate.",
             "fallback": "Follow the model's fallback chain when it fails (default true).",
             "fallback_on_content_policy": "Fall back on content-policy failures too.",
             "placeholder": "Image models: write a black placeholder when every model failed."}
    props: Schema = {name: {"type": ["boolean", "null"], "description": text} for name, text in
                     flags.items()}
    props["webhook"] = {"type": ["string", "null"], "format": "uri", "pattern": "^https?://",
                        "description": "POST the finished job here (Standard Webhooks): https "
                                       "to a public address (http and private ones too with "
                                       "the admin key)."}
    props["priority"] = {"enum": [*PRIORITIES, None],
                         "description": "Who goes first within the account (default: "
                                        "interactive when waiting, batch when async)."}
    props["deadline_seconds"] = nullable(
        "number", exclusiveMinimum=0, maximum=MAX_DEADLINE_SECONDS,
        description="Items not created within this many seconds end `expired` (a synchronous "
                    "call that expires answers 504).")
    assert set(props) == set(OPTION_KEYS)  # noqa: S101 - a new option must be described
    if not webhooks:
        del props["webhook"]
    if not placeholder:  # false or null only (a const, which generators read; no bool enum)
        props["placeholder"] = {"anyOf": [{"const": False}, {"type": "null"}],
                                "description": props["placeholder"]["description"]}
    return props


def model_options(spec: ModelSpec, webhooks: bool) -> Schema:
    return options_properties(webhooks, placeholder=spec.kind == "image")


def generate_schema(spec: ModelSpec, options: Schema) -> Schema:
    own = request_properties(spec)
    props = {"model_name": _model_name(spec), **own, "custom_filename": file_name_schema(),
             **options}
    return {"type": "object", "title": f"generate {spec.id}", "properties": props,
            "required": ["model_name", "prompt"], "additionalProperties": False,
            "examples": [example_body(spec)], **one_reference(own)}


def batch_prompts_schema(spec: ModelSpec, max_items: int, options: Schema) -> Schema:
    own = request_properties(spec)
    prompt = own.pop("prompt")
    names = {"type": ["array", "null"], "items": file_name_schema(nullable=False), "minItems": 1,
             "maxItems": max_items, "uniqueItems": True,
             "description": "One per prompt (exactly as many as `prompts`), each a different "
                            "file: names differing only in case or Unicode form count as one, "
                            "and an item of n outputs also writes `<name>_1` to `<name>_n`; "
                            "null for the default names."}
    props = {"model_name": _model_name(spec),
             "prompts": {"type": "array", "items": prompt, "minItems": 1, "maxItems": max_items},
             "custom_filenames": names, **own, **options}
    return {"type": "object", "title": f"batch of prompts for {spec.id}", "properties": props,
            "required": ["model_name", "prompts"], "additionalProperties": False,
            "examples": [example_body(spec, batch=True)], **one_reference(own)}


def task_schema(spec: ModelSpec) -> Schema:
    own = request_properties(spec)
    props = {"model_name": _model_name(spec), **own, "custom_filename": file_name_schema()}
    return {"type": "object", "title": f"task for {spec.id}", "properties": props,
            "required": ["model_name", "prompt"], "additionalProperties": False,
            "examples": [example_body(spec)], **one_reference(own)}


def operation_examples(batch: bool) -> Schema:
    """/generate's (or /generate-batch's) example bodies, one per curated model, flux-dev
    first: /docs offers them in a list."""
    specs = sorted(MODELS.values(), key=lambda spec: spec.id != "flux-dev")
    return {spec.id: {"summary": f"{spec.id} ({spec.kind})",
                      "value": example_body(spec, batch)} for spec in specs}


def _one_of_models(prefix: str, generic: bool = False) -> Schema:
    """One schema per curated model; with `generic` (MODEL_POLICY not curated) one more for any
    other `owner/name(:version)`, whose model_name no mapping can list (so no discriminator)."""
    mapping = {}
    for spec in MODELS.values():
        mapping[spec.id] = f"#/components/schemas/{prefix}_{spec.id}"
        mapping[spec.ref] = f"#/components/schemas/{prefix}_{spec.id}"
    one_of = [ref(f"{prefix}_{s.id}") for s in MODELS.values()]
    if generic:
        return {"oneOf": [*one_of, ref(f"{prefix}_other")]}
    return {"oneOf": one_of, "discriminator": {"propertyName": "model_name", "mapping": mapping}}


def other_model_schema(title: str, first: Schema) -> Schema:
    """A non-curated model's request: free-form parameters, checked against its own schema."""
    curated = sorted({name for s in MODELS.values() for name in (s.id, s.ref)})
    name = {"type": "string", "pattern": MODEL_NAME_PATTERN, "not": {"enum": curated},
            "description": "Any other Replicate model, `owner/name` or `owner/name:<version>`, "
                           "where MODEL_POLICY allows it. Its parameters are those of its own "
                           "schema (GET /models/{owner}/{name}); unknown ones are a 400."}
    return {"type": "object", "title": title, "properties": {"model_name": name, **first},
            "required": ["model_name"], "additionalProperties": True}


def batch_tasks_schema(max_items: int, options: Schema) -> Schema:
    images = sorted({name for s in MODELS.values() if s.kind == "image" for name in (s.id, s.ref)})
    image_tasks = {"properties": {"tasks": {"items": {"properties": {"model_name": {
        "enum": images}}}}}}
    return {"type": "object", "title": "batch of tasks",
            "description": "Mixed models, each task's file name a different one (as for "
                           "`custom_filenames`). Top-level keys beside these are parameters "
                           "shared by every task (a task's own win), so each must suit every "
                           "task's model, with at most one reference key in each task once "
                           "merged; `prompt` belongs in each task.",
            "properties": {"tasks": {"type": "array", "items": ref("Task"), "minItems": 1,
                                     "maxItems": max_items},
                           **options},
            "required": ["tasks"], "additionalProperties": False,
            # A placeholder is a black image: every task must then make images.
            "if": {"properties": {"placeholder": {"const": True}}, "required": ["placeholder"]},
            "then": image_tasks}


def configure_schema() -> Schema:
    """POST /configure: each limit in the range the limit stores accept, or null to clear it."""
    return {"type": "object", "minProperties": 1, "additionalProperties": False,
            "properties": {public: nullable("integer", minimum=LIMIT_RANGES[name][0],
                                            maximum=LIMIT_RANGES[name][1])
                           for public, name in LIMIT_FIELDS.items()}}


def request_schemas(settings: Settings) -> dict[str, Schema]:
    """Components for every request body, for these settings (batch size, policy, webhooks)."""
    webhooks = bool(settings.webhook_signing_key)
    most = settings.max_batch_size
    schemas: dict[str, Schema] = {f"Model_{s.id}": model_schema(s) for s in MODELS.values()}
    for spec in MODELS.values():
        options = model_options(spec, webhooks)
        schemas[f"Generate_{spec.id}"] = generate_schema(spec, options)
        schemas[f"BatchPrompts_{spec.id}"] = batch_prompts_schema(spec, most, options)
        schemas[f"Task_{spec.id}"] = task_schema(spec)
    generic = settings.model_policy.mode != "curated"
    if generic:
        other = options_properties(webhooks, placeholder=False)
        schemas["Generate_other"] = other_model_schema("generate any other model", other)
        schemas["BatchPrompts_other"] = other_model_schema(
            "batch of prompts for any other model", {"prompts": {
                "type": "array", "items": {"type": "string"}, "minItems": 1,
                "maxItems": most}, **other})
        schemas["Task_other"] = other_model_schema("task for any other model", {})
    schemas["GenerateRequest"] = _one_of_models("Generate", generic)
    schemas["BatchPromptsRequest"] = _one_of_models("BatchPrompts", generic)
    schemas["Task"] = _one_of_models("Task", generic)
    schemas["BatchTasksRequest"] = batch_tasks_schema(most, options_properties(webhooks))
    schemas["GenerateBatchRequest"] = {"oneOf": [ref("BatchPromptsRequest"),
                                                 ref("BatchTasksRequest")]}
    schemas["ConfigureRequest"] = configure_schema()
    return schemas
