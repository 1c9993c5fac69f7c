"""The model catalogue: data only. Every model, its kind, price and every parameter it accepts.

Facts from the upstream registry (shared/reference/upstream-defects.md §4); non-`None` defaults
are sent explicitly, so a request is reproducible from its logged input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

ParamType = Literal["string", "integer", "number", "boolean", "uri", "uri_list"]
Kind = Literal["image", "video", "audio", "other"]  # other: a non-curated model
Media = Literal["image", "audio"]
PriceUnit = Literal["image", "call", "second", "1k characters"]

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Param:
    """One input parameter of a model, as the caller may send it.

    `uri`: an http(s) URL or data: URI, never a server path; `uri_list`: 1..`max_items` of them.
    """

    name: str
    type: ParamType
    description: str
    default: object = None
    choices: tuple[object, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    max_length: int | None = None
    max_items: int | None = None

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
        if self.max_items is not None:
            out["max_items"] = self.max_items
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A Replicate model the service can run, at `price_usd` per `price_unit`.

    `reference_key` is the input for its reference (`reference_media`); a `uri_list` takes several.
    """

    id: str
    ref: str
    kind: Kind
    description: str
    price_usd: float
    price_unit: PriceUnit
    params: tuple[Param, ...]
    reference_key: str | None = None
    reference_media: Media | None = None
    version: str | None = None  # a pinned Replicate version (non-curated models only)
    curated: bool = True  # False: validated from the model's own schema (schemas.py)

    def param(self, name: str) -> Param | None:
        """Return the named parameter, or None when the model has no such input."""
        for param in self.params:
            if param.name == name:
                return param
        return None

    @property
    def max_references(self) -> int:
        """How many reference files the model takes under its reference key (0 = none)."""
        param = self.param(self.reference_key) if self.reference_key else None
        if param is None:
            return 0
        if param.type == "uri_list" and param.max_items is not None:
            return param.max_items
        return 1

    def describe(self) -> dict[str, object]:
        """Return the public description `/models` shows."""
        reference: dict[str, object] | None = None
        if self.reference_key is not None:
            reference = {"key": self.reference_key, "media": self.reference_media,
                         "max_items": self.max_references}
        return {
            "id": self.id,
            "replicate_model": self.ref,
            "kind": self.kind,
            "description": self.description,
            "price": {"usd": self.price_usd, "per": self.price_unit},
            "reference_input": reference,
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
    reference_media="image",
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

IMAGEN_4_ULTRA = ModelSpec(
    id="imagen-4-ultra",
    ref="google/imagen-4-ultra",
    kind="image",
    description="High-quality, detailed text-to-image generation.",
    price_usd=0.06,
    price_unit="image",
    params=(
        PROMPT,
        Param("aspect_ratio", "string", "Aspect ratio of the image.", "1:1",
              ("1:1", "9:16", "16:9", "3:4", "4:3")),
        _output_format("jpg", ("jpg", "png")),
        Param(
            "safety_filter_level",
            "string",
            "How strictly to block: block_low_and_above is the strictest.",
            "block_only_high",
            ("block_low_and_above", "block_medium_and_above", "block_only_high"),
        ),
    ),
)

NANO_BANANA = ModelSpec(
    id="nano-banana",
    ref="google/nano-banana",
    kind="image",
    description="Generation and editing from up to 3 reference images; square output only.",
    price_usd=0.039,
    price_unit="image",
    reference_key="image_input",
    reference_media="image",
    params=(
        PROMPT,
        Param("image_input", "uri_list",
              "Reference images: a list of 1 to 3 http(s) URLs or data: URIs.", max_items=3),
        _output_format("jpg", ("jpg", "png")),
    ),
)

FLUX_11_PRO_ULTRA = ModelSpec(
    id="flux-1.1-pro-ultra",
    ref="black-forest-labs/flux-1.1-pro-ultra",
    kind="image",
    description="High-resolution text-to-image, optionally guided by an image prompt.",
    price_usd=0.05,
    price_unit="image",
    reference_key="image_prompt",
    reference_media="image",
    params=(
        PROMPT,
        Param("image_prompt", "uri",
              "Image to guide composition: an http(s) URL or a data: URI."),
        Param(
            "aspect_ratio",
            "string",
            "Aspect ratio of the image.",
            "1:1",
            ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21"),
        ),
        _output_format("jpg", ("jpg", "png")),
        Param("raw", "boolean", "Less processed, more natural-looking images.", False),
        Param("safety_tolerance", "integer", "1 is strictest, 6 most permissive.", 2, None, 1, 6),
        SEED,
        Param("image_prompt_strength", "number", "How much the image prompt counts.", 0.1,
              None, 0, 1),
    ),
)

VEO_3_FAST = ModelSpec(
    id="veo-3-fast",
    ref="google/veo-3-fast",
    kind="video",
    description="Fast text-to-video with audio, optionally from a start image.",
    price_usd=3.32,
    price_unit="call",
    reference_key="image",
    reference_media="image",
    params=(
        PROMPT,
        Param("image", "uri",
              "Start image (ideally 1280x720): an http(s) URL or a data: URI."),
        Param("resolution", "string", "Resolution of the video.", "720p", ("720p", "1080p")),
        Param("negative_prompt", "string", "What to avoid in the video.", "", max_length=20000),
        SEED,
    ),
)

KLING_V21_MASTER = ModelSpec(
    id="kling-v2.1-master",
    ref="kwaivgi/kling-v2.1-master",
    kind="video",
    description="1080p video of 5 or 10 seconds, optionally from a start image.",
    price_usd=0.28,
    price_unit="second",
    reference_key="start_image",
    reference_media="image",
    params=(
        PROMPT,
        Param("start_image", "uri",
              "First frame of the video: an http(s) URL or a data: URI."),
        Param("duration", "integer", "Length of the video in seconds.", 5, (5, 10)),
        Param("aspect_ratio", "string", "Aspect ratio (ignored with a start_image).", "16:9",
              ("16:9", "9:16", "1:1")),
        Param("negative_prompt", "string", "What to avoid in the video.", "", max_length=20000),
    ),
)

CHATTERBOX = ModelSpec(
    id="chatterbox",
    ref="resemble-ai/chatterbox",
    kind="audio",
    description="Text to speech, optionally in the voice of a reference recording.",
    price_usd=0.025,
    price_unit="1k characters",
    reference_key="audio_prompt",
    reference_media="audio",
    params=(
        Param("prompt", "string", "The text to speak.", required=True, max_length=20000),
        Param("audio_prompt", "uri",
              "Reference voice recording: an http(s) URL or a data: URI."),
        SEED,
        Param("cfg_weight", "number", "Pace and guidance weight.", None, None, 0.2, 1.0),
        Param("temperature", "number", "Sampling randomness.", None, None, 0.05, 5.0),
        Param("exaggeration", "number", "Emotional intensity.", None, None, 0.25, 2.0),
    ),
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.id: spec
        for spec in (
            FLUX_DEV,
            FLUX_KONTEXT_MAX,
            QWEN_IMAGE,
            IMAGEN_4_ULTRA,
            NANO_BANANA,
            FLUX_11_PRO_ULTRA,
            VEO_3_FAST,
            KLING_V21_MASTER,
            CHATTERBOX,
        )
    }
)
