"""The model catalogue: data only. Every model, its kind, price and every parameter it accepts.

Adding a model means adding an entry here; validation, `/models` and input building read it.
Parameter facts come from the upstream registry (shared/reference/upstream-defects.md §4) and
the service README; `None` defaults are not sent, every other default is sent explicitly so a
request is reproducible from its logged input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

ParamType = Literal["string", "integer", "number", "boolean", "uri"]
Kind = Literal["image", "video", "audio"]

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Param:
    """One input parameter of a model, as the caller may send it."""

    name: str
    type: ParamType
    description: str
    default: object = None
    choices: tuple[object, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    max_length: int | None = None

    def describe(self) -> dict[str, object]:
        """Return the public description `/models` shows."""
        out: dict[str, object] = {"type": self.type, "description": self.description}
        out["required"] = self.required
        out["default"] = self.default
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.max_length is not None:
            out["max_length"] = self.max_length
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A Replicate model the service can run."""

    id: str
    ref: str
    kind: Kind
    description: str
    price_usd: float
    price_unit: str
    params: tuple[Param, ...]
    reference_key: str | None = None

    def param(self, name: str) -> Param | None:
        """Return the named parameter, or None when the model has no such input."""
        for param in self.params:
            if param.name == name:
                return param
        return None

    def describe(self) -> dict[str, object]:
        """Return the public description `/models` shows."""
        return {
            "id": self.id,
            "replicate_model": self.ref,
            "kind": self.kind,
            "description": self.description,
            "price": {"usd": self.price_usd, "per": self.price_unit},
            "reference_input": self.reference_key,
            "parameters": {p.name: p.describe() for p in self.params},
        }


PROMPT = Param("prompt", "string", "What to generate.", required=True, max_length=20000)
SEED = Param("seed", "integer", "Random seed for reproducible output.", minimum=0, maximum=SEED_MAX)
BASIC_RATIOS = ("1:1", "16:9", "9:16", "3:4", "4:3")


def _output_format(default: str, choices: tuple[str, ...]) -> Param:
    return Param("output_format", "string", "File format of the output.", default, choices)


def _quality() -> Param:
    return Param(
        "output_quality", "integer", "JPEG/WebP quality (ignored for png).", 80, None, 0, 100
    )


FLUX_DEV = ModelSpec(
    id="flux-dev",
    ref="black-forest-labs/flux-dev",
    kind="image",
    description="Fast text-to-image generation.",
    price_usd=0.025,
    price_unit="image",
    params=(
        PROMPT,
        Param("aspect_ratio", "string", "Aspect ratio of the image.", "1:1", BASIC_RATIOS),
        Param("megapixels", "string", "Approximate size in megapixels.", "1", ("1", "0.25")),
        _output_format("webp", ("webp", "jpg", "png")),
        _quality(),
        SEED,
        Param("guidance", "number", "Prompt adherence.", 3, None, 0, 10),
        Param("num_inference_steps", "integer", "Denoising steps.", 28, None, 1, 50),
        Param("prompt_strength", "number", "Prompt influence strength.", 0.8, None, 0, 1),
        Param("go_fast", "boolean", "Run the faster, quantised model.", True),
        Param("num_outputs", "integer", "Images to generate.", 1, None, 1, 4),
        Param("disable_safety_checker", "boolean", "Disable the NSFW filter.", False),
    ),
)

FLUX_KONTEXT_MAX = ModelSpec(
    id="flux-kontext-max",
    ref="black-forest-labs/flux-kontext-max",
    kind="image",
    description="Image editing and context-aware generation from a reference image.",
    price_usd=0.08,
    price_unit="image",
    reference_key="input_image",
    params=(
        PROMPT,
        Param("input_image", "uri", "Reference image: an http(s) URL or a data: URI."),
        Param(
            "aspect_ratio",
            "string",
            "Aspect ratio of the image.",
            "match_input_image",
            ("match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"),
        ),
        _output_format("png", ("jpg", "png")),
        SEED,
        Param("safety_tolerance", "integer", "0 is strictest, 6 most permissive.", 2, None, 0, 6),
        Param("prompt_upsampling", "boolean", "Let the model enrich the prompt.", False),
    ),
)

QWEN_IMAGE = ModelSpec(
    id="qwen-image",
    ref="qwen/qwen-image",
    kind="image",
    description="Image generation with strong text rendering; good with Chinese prompts.",
    price_usd=0.025,
    price_unit="image",
    params=(
        PROMPT,
        Param("aspect_ratio", "string", "Aspect ratio of the image.", "16:9", BASIC_RATIOS),
        _output_format("webp", ("webp", "jpg", "png")),
        _quality(),
        Param(
            "image_size",
            "string",
            "Trade quality for speed.",
            "optimize_for_quality",
            ("optimize_for_quality", "optimize_for_speed"),
        ),
        Param("guidance", "number", "Prompt adherence.", 4, None, 0, 10),
        Param("num_inference_steps", "integer", "Denoising steps.", 50, None, 1, 100),
        Param("lora_scale", "number", "LoRA influence.", 1, None, 0, 2),
        Param("enhance_prompt", "boolean", "Let the model enrich the prompt.", False),
        Param(
            "negative_prompt", "string", "What to avoid in the image.", "", max_length=20000
        ),
        Param("go_fast", "boolean", "Run the faster, quantised model.", True),
    ),
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {spec.id: spec for spec in (FLUX_DEV, FLUX_KONTEXT_MAX, QWEN_IMAGE)}
)
