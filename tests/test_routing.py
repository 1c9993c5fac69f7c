"""models/: reference routing, fallback inputs and triggers, chains, cost, the placeholder."""

from __future__ import annotations

import itertools
import json
import struct
import zlib
from pathlib import Path

import pytest

from replicate_generation.errors import InvalidRequest
from replicate_generation.models import placeholder, routing
from replicate_generation.models.catalogue import MODELS, ModelSpec
from replicate_generation.models.chains import DEFAULT_CHAINS, FallbackChains
from replicate_generation.models.cost import estimate_cost
from replicate_generation.models.fallback import fallback_input, should_fall_back
from replicate_generation.models.routing import plan
from replicate_generation.models.validation import build_input
from replicate_generation.outputs import DownloadError

URL = "https://example.com/a.png"
URL2 = "https://example.com/b.png"
URL3 = "data:image/png;base64,iVBORw0KGgo="
AUDIO = "https://example.com/voice.wav"
DEFAULTS = FallbackChains.parse(None)
NO_REFERENCE = ("flux-dev", "qwen-image", "imagen-4-ultra")
SINGLE_KEYS = ("input_image", "image", "start_image", "image_prompt", "reference_image")
LIST_KEYS = ("image_input", "reference_images")


def m(model_id: str) -> ModelSpec:
    return MODELS[model_id]


def ids(specs: tuple[ModelSpec, ...]) -> list[str]:
    return [s.id for s in specs]


def default_input(model_id: str, **params: object) -> dict[str, object]:
    return build_input(m(model_id), "a prompt", params)


def refuses(spec: ModelSpec, params: dict[str, object], field: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        plan(spec, "x", params, chains=DEFAULTS)
    assert info.value.field == field, str(info.value)
    return info.value


# --------------------------------------------------------------------------- plan


def test_reference_keys_are_every_callers_spelling() -> None:
    assert set(routing.REFERENCE_KEYS) == {
        "input_image", "image_input", "image", "start_image", "image_prompt",
        "reference_image", "reference_images", "audio_prompt"}
    own = {s.reference_key for s in MODELS.values() if s.reference_key}
    assert own <= set(routing.REFERENCE_KEYS)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_without_a_reference_the_requested_model_runs_with_its_chain(model_id: str) -> None:
    result = plan(m(model_id), "a prompt", {}, chains=DEFAULTS)
    assert result.requested is result.spec is m(model_id)
    assert result.input == default_input(model_id)
    assert result.routed is None and result.notes == ()
    assert result.chain == DEFAULTS.chain(model_id)
    assert plan(m(model_id), "a prompt", {}, chains=DEFAULTS, fallback=False).chain == ()


@pytest.mark.parametrize(("model_id", "key"), itertools.product(NO_REFERENCE, SINGLE_KEYS))
def test_one_image_to_a_model_without_references_goes_to_kontext(model_id: str, key: str) -> None:
    result = plan(m(model_id), "edit it", {key: URL}, chains=DEFAULTS)
    assert result.requested.id == model_id and result.spec.id == "flux-kontext-max"
    assert result.input["input_image"] == URL and result.input["prompt"] == "edit it"
    assert result.routed is not None
    assert model_id in result.routed and "flux-kontext-max" in result.routed
    # kontext's default chain is empty; no model without a reference slot is ever listed.
    assert result.chain == ()


@pytest.mark.parametrize(("model_id", "key", "count"),
                         itertools.product(NO_REFERENCE, LIST_KEYS, (1, 2, 3)))
def test_a_list_of_images_goes_to_kontext_or_nano_banana(
        model_id: str, key: str, count: int) -> None:
    images = [URL, URL2, URL3][:count]
    result = plan(m(model_id), "combine", {key: images}, chains=DEFAULTS)
    if count == 1:
        assert result.spec.id == "flux-kontext-max" and result.input["input_image"] == URL
    else:
        assert result.spec.id == "nano-banana" and result.input["image_input"] == images
        # nano-banana's fallback (imagen) would lose the images: left out, and said so.
        assert result.chain == ()
        assert any("imagen-4-ultra" in note for note in result.notes)
    assert result.routed is not None and model_id in result.routed


def test_routing_maps_the_callers_parameters_and_says_so() -> None:
    params = {"input_image": URL, "output_format": "webp", "guidance": 3.5,
              "aspect_ratio": "9:16", "num_outputs": 2, "seed": 42}
    result = plan(m("flux-dev"), "red hair", params, chains=DEFAULTS)
    assert result.spec.id == "flux-kontext-max"
    assert result.input == {"prompt": "red hair", "input_image": URL, "output_format": "png",
                            "aspect_ratio": "9:16", "seed": 42, "safety_tolerance": 2,
                            "prompt_upsampling": False}
    notes = " | ".join(result.notes)
    assert "'webp' -> 'png'" in notes
    assert "guidance=3.5 dropped" in notes and "num_outputs=2 dropped" in notes
    # Parameters the caller did not give take the new model's own defaults, silently.
    assert "megapixels" not in notes and "go_fast" not in notes


def test_routing_to_nano_banana_drops_the_aspect_ratio_with_a_note() -> None:
    result = plan(m("qwen-image"), "x", {"image_input": [URL, URL2], "aspect_ratio": "16:9",
                                          "output_format": "png"}, chains=DEFAULTS)
    assert result.spec.id == "nano-banana"
    assert result.input == {"prompt": "x", "image_input": [URL, URL2], "output_format": "png"}
    assert any("aspect_ratio='16:9' dropped" in note for note in result.notes)


@pytest.mark.parametrize(("model_id", "params", "key", "value"), [
    ("flux-kontext-max", {"input_image": URL}, "input_image", URL),
    ("flux-kontext-max", {"reference_images": [URL]}, "input_image", URL),
    ("flux-kontext-max", {"image": URL}, "input_image", URL),
    ("nano-banana", {"input_image": URL}, "image_input", [URL]),
    ("nano-banana", {"reference_images": [URL, URL2, URL3]}, "image_input", [URL, URL2, URL3]),
    ("flux-1.1-pro-ultra", {"reference_image": URL}, "image_prompt", URL),
    ("veo-3-fast", {"image": URL}, "image", URL),
    ("veo-3-fast", {"start_image": URL}, "image", URL),
    ("kling-v2.1-master", {"image_input": [URL]}, "start_image", URL),
    ("chatterbox", {"audio_prompt": AUDIO}, "audio_prompt", AUDIO),
])
def test_a_model_that_takes_references_gets_them_under_its_own_key(
        model_id: str, params: dict[str, object], key: str, value: object) -> None:
    result = plan(m(model_id), "x", params, chains=DEFAULTS)
    assert result.spec.id == model_id and result.routed is None
    assert result.input[key] == value
    given = next(iter(params))
    assert [k for k in routing.REFERENCE_KEYS if k in result.input] == [key]
    assert (result.notes == ()) == (given == key)


def test_references_that_cannot_be_honoured_are_refused_naming_the_field() -> None:
    refuses(m("flux-kontext-max"), {"image_input": [URL, URL2]}, "image_input")
    refuses(m("veo-3-fast"), {"reference_images": [URL, URL2]}, "reference_images")
    refuses(m("nano-banana"), {"image_input": [URL] * 4}, "image_input")
    refuses(m("flux-dev"), {"reference_images": [URL] * 4}, "reference_images")
    refuses(m("flux-dev"), {"image_input": []}, "image_input")
    refuses(m("flux-dev"), {"input_image": [URL, URL2]}, "input_image")
    refuses(m("flux-dev"), {"image_input": URL}, "image_input")
    error = refuses(m("chatterbox"), {"input_image": URL}, "input_image")
    assert "chatterbox" in str(error)
    for model_id in sorted(set(MODELS) - {"chatterbox"}):
        error = refuses(m(model_id), {"audio_prompt": AUDIO}, "audio_prompt")
        assert model_id in str(error)
    refuses(m("flux-dev"), {"input_image": URL, "image_input": [URL2]}, "image_input")


@pytest.mark.parametrize("bad", ["/etc/passwd", "file:///app/.env", "../x.png", 5, None,
                                 "javascript:alert(1)"])
def test_a_reference_must_be_a_url_or_data_uri_never_a_path(bad: object) -> None:
    refuses(m("flux-dev"), {"input_image": bad}, "input_image")
    refuses(m("flux-kontext-max"), {"input_image": bad}, "input_image")
    refuses(m("qwen-image"), {"image_input": [URL, bad]}, "image_input[1]")
    refuses(m("chatterbox"), {"audio_prompt": bad}, "audio_prompt")


def test_other_parameters_are_still_validated_against_the_requested_model() -> None:
    refuses(m("flux-dev"), {"input_image": URL, "bogus": 1}, "bogus")
    refuses(m("flux-dev"), {"input_image": URL, "guidance": 11}, "guidance")
    refuses(m("flux-kontext-max"), {"input_image": URL, "guidance": 3}, "guidance")
    with pytest.raises(InvalidRequest) as info:
        plan(m("qwen-image"), "x", {"image_input": [URL, "/etc/x"]}, prefix="tasks[2].",
             chains=DEFAULTS)
    assert info.value.field == "tasks[2].image_input[1]"
    with pytest.raises(InvalidRequest) as info:
        plan(m("flux-dev"), "  ", {"input_image": URL}, chains=DEFAULTS)
    assert info.value.field == "prompt"


def test_the_chain_keeps_only_models_that_can_honour_the_request() -> None:
    chains = FallbackChains.parse(json.dumps({
        "flux-kontext-max": ["qwen-image", "nano-banana", "flux-1.1-pro-ultra"]}))
    with_ref = plan(m("flux-kontext-max"), "x", {"input_image": URL}, chains=chains)
    assert ids(with_ref.chain) == ["nano-banana", "flux-1.1-pro-ultra"]
    assert any("qwen-image" in note for note in with_ref.notes)
    text_only = plan(m("flux-kontext-max"), "x", {}, chains=chains)
    assert ids(text_only.chain) == ["qwen-image", "nano-banana", "flux-1.1-pro-ultra"]
    routed = plan(m("flux-dev"), "x", {"input_image": URL}, chains=chains)
    assert routed.spec.id == "flux-kontext-max" and ids(routed.chain) == [
        "nano-banana", "flux-1.1-pro-ultra"]


# --------------------------------------------------------------------------- fallback_input


def test_a_reference_is_never_lost_in_a_fallback() -> None:
    kontext = default_input("flux-kontext-max", input_image=URL)
    assert fallback_input(m("flux-kontext-max"), kontext, m("qwen-image")) is None
    assert fallback_input(m("flux-kontext-max"), kontext, m("flux-dev")) is None
    assert fallback_input(m("flux-kontext-max"), kontext, m("imagen-4-ultra")) is None
    nano = default_input("nano-banana", image_input=[URL, URL2])
    assert fallback_input(m("nano-banana"), nano, m("imagen-4-ultra")) is None
    assert fallback_input(m("nano-banana"), nano, m("flux-kontext-max")) is None  # 2 > 1
    mapped = fallback_input(m("flux-kontext-max"), kontext, m("nano-banana"))
    assert mapped is not None and mapped[0]["image_input"] == [URL]
    assert any("as image_input" in note for note in mapped[1])
    one = default_input("nano-banana", image_input=[URL])
    mapped = fallback_input(m("nano-banana"), one, m("flux-kontext-max"))
    assert mapped is not None and mapped[0]["input_image"] == URL
    assert fallback_input(m("veo-3-fast"), default_input("veo-3-fast", image=URL),
                          m("kling-v2.1-master")) is not None


def test_a_fallback_never_changes_the_kind_of_output() -> None:
    for source, target in itertools.permutations(MODELS.values(), 2):
        if source.kind != target.kind:
            assert fallback_input(source, default_input(source.id), target) is None


def test_kontext_to_qwen_without_a_reference_maps_match_input_image() -> None:
    mapped = fallback_input(m("flux-kontext-max"), default_input("flux-kontext-max"),
                            m("qwen-image"))
    assert mapped is not None
    model_input, notes = mapped
    assert model_input["aspect_ratio"] == "16:9"  # qwen's own default
    assert model_input["output_format"] == "png" and model_input["enhance_prompt"] is False
    assert any("match_input_image" in note for note in notes)


def test_webp_becomes_png_for_models_without_webp() -> None:
    for target in ("flux-kontext-max", "imagen-4-ultra", "nano-banana", "flux-1.1-pro-ultra"):
        mapped = fallback_input(m("flux-dev"), default_input("flux-dev"), m(target))
        assert mapped is not None, target
        assert mapped[0]["output_format"] == "png"
        assert any("'webp' -> 'png'" in note for note in mapped[1])
    kept = fallback_input(m("flux-dev"), default_input("flux-dev", output_format="jpg"),
                          m("imagen-4-ultra"))
    assert kept is not None and kept[0]["output_format"] == "jpg"


@pytest.mark.parametrize(("ratio", "nearest"), [
    ("21:9", "16:9"), ("16:9", "16:9"), ("3:2", "4:3"), ("5:4", "4:3"), ("4:5", "3:4"),
    ("2:3", "3:4"), ("9:21", "9:16"), ("1:1", "1:1"),
])
def test_aspect_ratios_go_to_the_nearest_allowed(ratio: str, nearest: str) -> None:
    source = default_input("flux-1.1-pro-ultra", aspect_ratio=ratio)
    mapped = fallback_input(m("flux-1.1-pro-ultra"), source, m("flux-dev"))
    assert mapped is not None and mapped[0]["aspect_ratio"] == nearest
    assert any(ratio in note for note in mapped[1]) == (ratio != nearest)


def test_fallback_notes_say_what_was_mapped_and_dropped() -> None:
    source = default_input("qwen-image", num_inference_steps=80, negative_prompt="blur",
                           guidance=6)
    mapped = fallback_input(m("qwen-image"), source, m("flux-dev"))
    assert mapped is not None
    model_input, notes = mapped
    assert model_input["num_inference_steps"] == 50 and model_input["guidance"] == 6
    text = " | ".join(notes)
    assert "num_inference_steps 80 -> 50" in text
    assert "negative_prompt='blur' dropped" in text
    assert "image_size" in text and "lora_scale" in text  # defaults left out, named
    ultra = fallback_input(m("flux-1.1-pro-ultra"), default_input(
        "flux-1.1-pro-ultra", raw=True), m("flux-dev"))
    assert ultra is not None and any("raw=True dropped" in n for n in ultra[1])


def test_a_fallback_never_weakens_safety() -> None:
    for source, target in itertools.permutations(MODELS.values(), 2):
        mapped = fallback_input(source, default_input(source.id), target)
        if mapped is not None:
            assert mapped[0].get("disable_safety_checker", False) is False, (source, target)
    strict = default_input("flux-kontext-max", safety_tolerance=0)
    assert fallback_input(m("flux-kontext-max"), strict, m("flux-1.1-pro-ultra")) is None
    lenient = default_input("flux-kontext-max", safety_tolerance=6)
    mapped = fallback_input(m("flux-kontext-max"), lenient, m("flux-1.1-pro-ultra"))
    assert mapped is not None and mapped[0]["safety_tolerance"] == 6
    qwen = fallback_input(m("qwen-image"), default_input("qwen-image"), m("flux-dev"))
    assert qwen is not None and qwen[0]["disable_safety_checker"] is False


def test_every_fallback_input_is_valid_for_its_target() -> None:
    references: dict[str, dict[str, object]] = {
        "flux-kontext-max": {"input_image": URL}, "nano-banana": {"image_input": [URL]},
        "flux-1.1-pro-ultra": {"image_prompt": URL}, "veo-3-fast": {"image": URL},
        "kling-v2.1-master": {"start_image": URL}, "chatterbox": {"audio_prompt": AUDIO}}
    for source, target in itertools.permutations(MODELS.values(), 2):
        no_extra: dict[str, object] = {}
        for extra in (no_extra, references.get(source.id, no_extra)):
            source_input = default_input(source.id, **extra)
            mapped = fallback_input(source, source_input, target)
            if mapped is None:
                continue
            model_input, _notes = mapped
            assert build_input(target, model_input["prompt"], {
                k: v for k, v in model_input.items() if k != "prompt"}) == model_input
            assert model_input["prompt"] == "a prompt"
            if extra:
                assert target.reference_key is not None
                assert model_input.get(target.reference_key) in (URL, [URL], AUDIO)


# --------------------------------------------------------------------------- should_fall_back


@pytest.mark.parametrize("kind", ["model_failed", "upstream_unavailable", "replicate_not_found",
                                  "replicate_invalid_input", "empty_output"])
def test_model_failures_trigger_a_fallback(kind: str) -> None:
    assert should_fall_back(kind, on_content_policy=False)
    assert should_fall_back(kind, on_content_policy=True)


def test_content_policy_falls_back_only_when_asked() -> None:
    assert not should_fall_back("content_policy", on_content_policy=False)
    assert should_fall_back("content_policy", on_content_policy=True)


@pytest.mark.parametrize("kind", [
    "deadline_exceeded", "replicate_unauthorized", "replicate_payment_required",
    "create_uncertain", "download_failed", "storage_error", "canceled", "shutting_down",
    "internal_error", "upstream_error", "throttling", "throttled", "invalid_request", "",
])
def test_everything_else_never_falls_back(kind: str) -> None:
    assert not should_fall_back(kind, on_content_policy=False)
    assert not should_fall_back(kind, on_content_policy=True)


# --------------------------------------------------------------------------- chains


def test_default_chains() -> None:
    assert DEFAULTS.as_dict() == {
        "flux-dev": ["qwen-image"], "flux-kontext-max": [], "qwen-image": ["flux-dev"],
        "imagen-4-ultra": ["flux-dev"], "nano-banana": ["imagen-4-ultra"],
        "flux-1.1-pro-ultra": ["flux-dev"], "veo-3-fast": [], "kling-v2.1-master": [],
        "chatterbox": []}
    assert FallbackChains.parse("").as_dict() == FallbackChains.parse("  ").as_dict() \
        == FallbackChains.default().as_dict() == {
            k: list(v) for k, v in DEFAULT_CHAINS.items()}


def test_every_chain_ends_without_repeats() -> None:
    for chains in (DEFAULTS, FallbackChains.parse(json.dumps({
            "flux-dev": ["qwen-image", "imagen-4-ultra"], "qwen-image": ["flux-dev"],
            "imagen-4-ultra": ["qwen-image", "flux-dev"]}))):
        for spec in MODELS.values():
            tried = [spec, *chains.chain(spec.id)]  # the whole walk: chains are not followed
            assert len(tried) == len(set(tried)) <= len(MODELS)
            assert all(t.kind == spec.kind for t in tried)


def test_parse_overrides_the_named_models_and_accepts_full_names() -> None:
    chains = FallbackChains.parse(json.dumps({
        "black-forest-labs/flux-dev": ["imagen-4-ultra", "qwen/qwen-image"],
        "qwen-image": [], "veo-3-fast": ["kling-v2.1-master"]}))
    assert ids(chains.chain("flux-dev")) == ["imagen-4-ultra", "qwen-image"]
    assert chains.chain("qwen-image") == ()
    assert ids(chains.chain("google/veo-3-fast")) == ["kling-v2.1-master"]
    assert ids(chains.chain("nano-banana")) == ["imagen-4-ultra"]  # untouched: the default


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not valid JSON"),
    ('["flux-dev"]', "JSON object"),
    ('{"flux-pro": []}', "unknown model 'flux-pro'"),
    ('{"flux-dev": ["sdxl"]}', "unknown model 'sdxl'"),
    ('{"flux-dev": ["flux-dev"]}', "own chain"),
    ('{"flux-dev": ["black-forest-labs/flux-dev"]}', "own chain"),
    ('{"flux-dev": ["qwen-image", "qwen/qwen-image"]}', "twice"),
    ('{"flux-dev": ["veo-3-fast"]}', "makes image"),
    ('{"chatterbox": ["flux-dev"]}', "makes audio"),
    ('{"flux-dev": "qwen-image"}', "list"),
    ('{"flux-dev": [1]}', "strings"),
    ('{"flux-dev": [], "flux-dev": ["qwen-image"]}', "twice"),
    ('{"flux-dev": [], "black-forest-labs/flux-dev": []}', "twice"),
])
def test_parse_rejects_bad_chains_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        FallbackChains.parse(text)
    assert "REPLICATE_FALLBACK_CHAINS" in str(info.value)


def test_unknown_models_have_no_chain() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        DEFAULTS.chain("flux-pro")


# --------------------------------------------------------------------------- cost


def test_cost_follows_the_price_table() -> None:
    assert estimate_cost(m("flux-dev"), default_input("flux-dev")) == 0.025
    assert estimate_cost(m("flux-dev"), default_input("flux-dev", num_outputs=3)) == 0.075
    assert estimate_cost(m("flux-kontext-max"), default_input("flux-kontext-max")) == 0.08
    assert estimate_cost(m("qwen-image"), default_input("qwen-image")) == 0.025
    assert estimate_cost(m("imagen-4-ultra"), default_input("imagen-4-ultra")) == 0.06
    assert estimate_cost(m("nano-banana"), default_input("nano-banana")) == 0.039
    assert estimate_cost(m("flux-1.1-pro-ultra"), default_input("flux-1.1-pro-ultra")) == 0.05
    assert estimate_cost(m("veo-3-fast"), default_input("veo-3-fast", resolution="1080p")) \
        == 3.32
    assert estimate_cost(m("kling-v2.1-master"), default_input("kling-v2.1-master")) == 1.4
    assert estimate_cost(m("kling-v2.1-master"),
                         default_input("kling-v2.1-master", duration=10)) == 2.8
    speech = build_input(m("chatterbox"), "x" * 2000, {})
    assert estimate_cost(m("chatterbox"), speech) == 0.05


# --------------------------------------------------------------------------- placeholder


def read_png(data: bytes) -> tuple[tuple[int, ...], bytes]:
    """Return IHDR's fields and the decompressed image data, checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    header = struct.unpack(">IIBBBBB", chunks[0][1])
    return header, zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))


def test_the_placeholder_is_a_black_1600x900_png(tmp_path: Path) -> None:
    root = tmp_path / "output"
    saved = placeholder.write_placeholder(m("qwen-image"), root / "req1", "cover", root=root)
    assert saved.path == (root / "req1" / "cover.png").resolve()
    assert saved.relative == "req1/cover.png" and saved.content_type == "image/png"
    data = saved.path.read_bytes()
    assert saved.size == len(data)
    header, pixels = read_png(data)
    assert header == (1600, 900, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    assert len(pixels) == 900 * (1 + 1600 * 3) and not any(pixels)
    assert [p.name for p in (root / "req1").iterdir()] == ["cover.png"]  # no temp file left


def test_the_placeholder_is_only_for_images_and_only_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "output"
    for model_id in ("veo-3-fast", "kling-v2.1-master", "chatterbox"):
        with pytest.raises(ValueError, match="placeholder"):
            placeholder.write_placeholder(m(model_id), root / "r", "x", root=root)
    with pytest.raises(DownloadError):
        placeholder.write_placeholder(m("flux-dev"), tmp_path / "elsewhere", "x", root=root)
    with pytest.raises(ValueError):
        placeholder.write_placeholder(m("flux-dev"), root / "r", "../x", root=root)
    assert not (tmp_path / "elsewhere").exists()
