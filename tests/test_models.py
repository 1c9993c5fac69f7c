"""All nine models over HTTP against the simulator: payloads, validation, and GET /models.

The tables below are written from the upstream registry (shared/reference/upstream-defects.md §4,
"Model registry" and "Observed payloads"), not from catalogue.py, so a wrong catalogue entry
fails here.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, SERVER_TOKEN
from replicate_generation.devtools import simulator as replicate_simulator
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.errors import InvalidRequest
from replicate_generation.models.catalogue import MODELS
from replicate_generation.models.validation import build_input

SEED_MAX = 2**32 - 1
BASIC_RATIOS = ("1:1", "16:9", "9:16", "3:4", "4:3")
URL = "https://example.com/ref.jpg"
DATA_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
AUDIO_URL = "https://example.com/voice.wav"

# name -> (type, choices, minimum, maximum, default), prompt excluded.
Spec = tuple[str, tuple[object, ...] | None, float | None, float | None, object]
SEED: Spec = ("integer", None, 0, SEED_MAX, None)
PARAMS: dict[str, dict[str, Spec]] = {
    "flux-dev": {
        "aspect_ratio": ("string", BASIC_RATIOS, None, None, "1:1"),
        "megapixels": ("string", ("1", "0.25"), None, None, "1"),
        "output_format": ("string", ("webp", "jpg", "png"), None, None, "webp"),
        "output_quality": ("integer", None, 0, 100, 80),
        "seed": SEED,
        "guidance": ("number", None, 0, 10, 3),
        "num_inference_steps": ("integer", None, 1, 50, 28),
        "prompt_strength": ("number", None, 0, 1, 0.8),
        "go_fast": ("boolean", None, None, None, True),
        "num_outputs": ("integer", None, 1, 4, 1),
        "disable_safety_checker": ("boolean", None, None, None, False),
    },
    "flux-kontext-max": {
        "input_image": ("uri", None, None, None, None),
        "aspect_ratio": ("string", ("match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4",
                                    "21:9", "9:21"), None, None, "match_input_image"),
        "output_format": ("string", ("jpg", "png"), None, None, "png"),
        "seed": SEED,
        "safety_tolerance": ("integer", None, 0, 6, 2),
        "prompt_upsampling": ("boolean", None, None, None, False),
    },
    "qwen-image": {
        "aspect_ratio": ("string", BASIC_RATIOS, None, None, "16:9"),
        "output_format": ("string", ("webp", "jpg", "png"), None, None, "webp"),
        "output_quality": ("integer", None, 0, 100, 80),
        "image_size": ("string", ("optimize_for_quality", "optimize_for_speed"), None, None,
                       "optimize_for_quality"),
        "guidance": ("number", None, 0, 10, 4),
        "num_inference_steps": ("integer", None, 1, 100, 50),
        "lora_scale": ("number", None, 0, 2, 1),
        "enhance_prompt": ("boolean", None, None, None, False),
        "negative_prompt": ("string", None, None, None, ""),
        "go_fast": ("boolean", None, None, None, True),
    },
    "imagen-4-ultra": {
        "aspect_ratio": ("string", ("1:1", "9:16", "16:9", "3:4", "4:3"), None, None, "1:1"),
        "output_format": ("string", ("jpg", "png"), None, None, "jpg"),
        "safety_filter_level": ("string", ("block_low_and_above", "block_medium_and_above",
                                           "block_only_high"), None, None, "block_only_high"),
    },
    "nano-banana": {
        "image_input": ("uri_list", None, None, None, None),
        "output_format": ("string", ("jpg", "png"), None, None, "jpg"),
    },
    "flux-1.1-pro-ultra": {
        "image_prompt": ("uri", None, None, None, None),
        "aspect_ratio": ("string", ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4",
                                    "2:3", "9:16", "9:21"), None, None, "1:1"),
        "output_format": ("string", ("jpg", "png"), None, None, "jpg"),
        "raw": ("boolean", None, None, None, False),
        "safety_tolerance": ("integer", None, 1, 6, 2),
        "seed": SEED,
        "image_prompt_strength": ("number", None, 0, 1, 0.1),
    },
    "veo-3-fast": {
        "image": ("uri", None, None, None, None),
        "resolution": ("string", ("720p", "1080p"), None, None, "720p"),
        "negative_prompt": ("string", None, None, None, ""),
        "seed": SEED,
    },
    "kling-v2.1-master": {
        "start_image": ("uri", None, None, None, None),
        "duration": ("integer", (5, 10), None, None, 5),
        "aspect_ratio": ("string", ("16:9", "9:16", "1:1"), None, None, "16:9"),
        "negative_prompt": ("string", None, None, None, ""),
    },
    "chatterbox": {
        "audio_prompt": ("uri", None, None, None, None),
        "seed": SEED,
        "cfg_weight": ("number", None, 0.2, 1.0, None),
        "temperature": ("number", None, 0.05, 5.0, None),
        "exaggeration": ("number", None, 0.25, 2.0, None),
    },
}

# id -> (Replicate name, kind, price in USD, price unit, reference key, its media, max items)
FACTS: dict[str, tuple[str, str, float, str, str | None, str | None, int]] = {
    "flux-dev": ("black-forest-labs/flux-dev", "image", 0.025, "image", None, None, 0),
    "flux-kontext-max": ("black-forest-labs/flux-kontext-max", "image", 0.08, "image",
                         "input_image", "image", 1),
    "qwen-image": ("qwen/qwen-image", "image", 0.025, "image", None, None, 0),
    "imagen-4-ultra": ("google/imagen-4-ultra", "image", 0.06, "image", None, None, 0),
    "nano-banana": ("google/nano-banana", "image", 0.039, "image", "image_input", "image", 3),
    "flux-1.1-pro-ultra": ("black-forest-labs/flux-1.1-pro-ultra", "image", 0.05, "image",
                           "image_prompt", "image", 1),
    "veo-3-fast": ("google/veo-3-fast", "video", 3.32, "call", "image", "image", 1),
    "kling-v2.1-master": ("kwaivgi/kling-v2.1-master", "video", 0.28, "second", "start_image",
                          "image", 1),
    "chatterbox": ("resemble-ai/chatterbox", "audio", 0.025, "1k characters", "audio_prompt",
                   "audio", 1),
}

# What reaches Replicate for a prompt alone (upstream §4 "Observed payloads"; kontext here
# without its optional input_image). None defaults are never sent.
PAYLOADS: dict[str, dict[str, object]] = {
    "flux-dev": {"go_fast": True, "guidance": 3, "megapixels": "1", "num_outputs": 1,
                 "aspect_ratio": "1:1", "output_format": "webp", "output_quality": 80,
                 "prompt_strength": 0.8, "num_inference_steps": 28,
                 "disable_safety_checker": False},
    "qwen-image": {"go_fast": True, "guidance": 4, "image_size": "optimize_for_quality",
                   "lora_scale": 1, "aspect_ratio": "16:9", "output_format": "webp",
                   "enhance_prompt": False, "output_quality": 80, "negative_prompt": "",
                   "num_inference_steps": 50},
    "flux-kontext-max": {"aspect_ratio": "match_input_image", "output_format": "png",
                         "safety_tolerance": 2, "prompt_upsampling": False},
    "imagen-4-ultra": {"aspect_ratio": "1:1", "output_format": "jpg",
                       "safety_filter_level": "block_only_high"},
    "nano-banana": {"output_format": "jpg"},
    "kling-v2.1-master": {"duration": 5, "aspect_ratio": "16:9", "negative_prompt": ""},
    "veo-3-fast": {"resolution": "720p", "negative_prompt": ""},
    "flux-1.1-pro-ultra": {"aspect_ratio": "1:1", "output_format": "jpg", "raw": False,
                           "safety_tolerance": 2, "image_prompt_strength": 0.1},
    "chatterbox": {},
}

# The extension and leading bytes of each model's default output.
OUTPUTS: dict[str, str] = {
    "flux-dev": ".webp", "flux-kontext-max": ".png", "qwen-image": ".webp",
    "imagen-4-ultra": ".jpg", "nano-banana": ".jpg", "flux-1.1-pro-ultra": ".jpg",
    "veo-3-fast": ".mp4", "kling-v2.1-master": ".mp4", "chatterbox": ".wav",
}

# A reference under each model's own key, as the caller sends it.
REFERENCES: dict[str, object] = {
    "flux-kontext-max": URL,
    "nano-banana": [URL, DATA_URI, "http://example.com/third.png"],
    "flux-1.1-pro-ultra": DATA_URI,
    "veo-3-fast": URL,
    "kling-v2.1-master": URL,
    "chatterbox": AUDIO_URL,
}

ALL = sorted(PARAMS)


def post(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/generate", json=body, headers=ADMIN)


def looks_like(path: Path, ext: str) -> bool:
    head = path.read_bytes()[:16]
    return {
        ".png": head.startswith(b"\x89PNG"),
        ".jpg": head.startswith(b"\xff\xd8\xff"),
        ".webp": head[:4] == b"RIFF" and head[8:12] == b"WEBP",
        ".mp4": head[4:8] == b"ftyp",
        ".wav": head[:4] == b"RIFF" and head[8:12] == b"WAVE",
    }[ext]


def test_the_tables_cover_the_catalogue() -> None:
    assert set(MODELS) == set(PARAMS) == set(FACTS) == set(PAYLOADS) == set(OUTPUTS)
    assert len(MODELS) == 9


def unseeded(sent: dict[str, Any]) -> dict[str, Any]:
    """The input without the seed the service adds to seeded models the caller gave none."""
    return {k: v for k, v in sent.items() if k != "seed"}


@pytest.mark.parametrize("model_id", ALL)
def test_the_simulator_knows_every_model_and_its_kind(model_id: str) -> None:
    ref, kind = FACTS[model_id][:2]
    assert replicate_simulator.MODELS[ref].kind == kind


@pytest.mark.parametrize("model_id", ALL)
def test_a_prompt_alone_sends_exactly_the_defaults(
        model_id: str, app: Flask, client: FlaskClient, sim: Simulator) -> None:
    prompt = f"A lighthouse at dawn, for {model_id}"
    response = post(client, {"model_name": model_id, "prompt": prompt})
    assert response.status_code == 200, response.get_json()
    data = response.get_json()
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert prediction["model"] == FACTS[model_id][0]
    sent = dict(prediction["input"])
    # A seeded model gets a seed of the service's choosing, returned with the result.
    seed = sent.pop("seed", None)
    assert sent == {"prompt": prompt, **PAYLOADS[model_id]}
    assert (seed is not None) == (MODELS[model_id].param("seed") is not None)
    assert data["results"][0]["seed"] == seed
    (shown,) = data["files"]
    path = app.extensions["settings"].output_dir.parent / shown
    assert path.suffix == OUTPUTS[model_id] and looks_like(path, OUTPUTS[model_id])


@pytest.mark.parametrize("model_id", sorted(REFERENCES))
def test_a_reference_under_the_models_own_key_reaches_replicate(
        model_id: str, client: FlaskClient, sim: Simulator) -> None:
    key = FACTS[model_id][4]
    assert key is not None
    body = {"model_name": FACTS[model_id][0], "prompt": "Use the reference",
            key: REFERENCES[model_id]}
    response = post(client, body)
    assert response.status_code == 200, response.get_json()
    (prediction,) = sim.predictions(SERVER_TOKEN)
    assert unseeded(prediction["input"]) == {"prompt": "Use the reference",
                                             key: REFERENCES[model_id],
                                   **PAYLOADS[model_id]}


def test_callers_values_win_and_reach_replicate(client: FlaskClient, sim: Simulator) -> None:
    bodies: list[dict[str, Any]] = [
        {"model_name": "kling-v2.1-master", "prompt": "x", "duration": 10, "aspect_ratio": "1:1"},
        {"model_name": "chatterbox", "prompt": "Hello.", "seed": 7, "cfg_weight": 0.5,
         "temperature": 0.8, "exaggeration": 1.5},
        {"model_name": "flux-1.1-pro-ultra", "prompt": "x", "aspect_ratio": "21:9",
         "raw": True, "safety_tolerance": 1, "output_format": "png"},
        {"model_name": "google/imagen-4-ultra", "prompt": "x",
         "safety_filter_level": "block_low_and_above"},
    ]
    for body in bodies:
        assert post(client, body).status_code == 200
    sent = {p["input"]["prompt"] + p["model"]: p["input"] for p in sim.predictions()}
    for body in bodies:
        spec = MODELS[body["model_name"].split("/")[-1]]
        given = {k: v for k, v in body.items() if k != "model_name"}
        assert sent[body["prompt"] + spec.ref].items() >= given.items()
    assert sent["Hello.resemble-ai/chatterbox"] == {
        "prompt": "Hello.", "seed": 7, "cfg_weight": 0.5, "temperature": 0.8,
        "exaggeration": 1.5}


def test_whole_floats_are_integers_and_reach_replicate_as_ints(
        client: FlaskClient, sim: Simulator) -> None:
    body = {"model_name": "flux-dev", "prompt": "x", "num_inference_steps": 30.0,
            "num_outputs": 2.0, "seed": 7.0, "output_quality": 90.0}
    response = post(client, body)
    assert response.status_code == 200, response.get_json()
    (prediction,) = sim.predictions(SERVER_TOKEN)
    sent = {name: prediction["input"][name] for name in body if name not in ("model_name",
                                                                             "prompt")}
    assert sent == {"num_inference_steps": 30, "num_outputs": 2, "seed": 7, "output_quality": 90}
    assert all(type(value) is int for value in sent.values()), sent
    assert response.get_json()["results"][0]["seed"] == 7


WRONG_TYPE: dict[str, list[object]] = {
    "string": [5, None, ["1:1"]],
    "integer": ["5", 2.5, True],
    "number": ["0.5", False, None],
    "boolean": [1, "true", None],
    "uri": ["/etc/passwd", "file:///etc/passwd", "ftp://example.com/a.png", 5, [URL]],
    "uri_list": [URL, [], [URL, "/etc/passwd"], [URL] * 4, [5]],
}


def bad_values(spec: Spec) -> list[object]:
    """A wrong choice, each side of the range, and wrong types."""
    kind, choices, low, high, _default = spec
    values: list[object] = list(WRONG_TYPE[kind])
    if choices is not None:
        values.append(7 if kind == "integer" else "not-a-choice")
    if low is not None:
        values.append(low - (1 if kind == "integer" else 0.01))
    if high is not None:
        values.append(high + (1 if kind == "integer" else 0.01))
    return values


CASES = [(m, name, value) for m in ALL for name, spec in PARAMS[m].items()
         for value in bad_values(spec)]


def test_every_constrained_parameter_refuses_bad_values_with_400(
        client: FlaskClient, sim: Simulator) -> None:
    for model_id, name, value in CASES:
        response = post(client, {"model_name": model_id, "prompt": "x", name: value})
        error = response.get_json()
        assert response.status_code == 400, (model_id, name, value, error)
        assert error["field"].split("[")[0] == name, (model_id, name, value, error)
        assert name in error["error"], error
    assert sim.predictions() == []


def test_list_reference_errors_name_the_item(client: FlaskClient) -> None:
    cases = [
        ([URL, "/etc/passwd"], "image_input[1]"),
        ([URL, DATA_URI, "data:no-comma"], "image_input[2]"),
        ([URL] * 4, "image_input"),
        ([], "image_input"),
        (URL, "image_input"),
    ]
    for value, field in cases:
        response = post(client, {"model_name": "nano-banana", "prompt": "x",
                                 "image_input": value})
        assert response.status_code == 400 and response.get_json()["field"] == field, value


def test_unknown_parameters_and_missing_prompts_get_400(client: FlaskClient) -> None:
    for model_id in ALL:
        response = post(client, {"model_name": model_id, "prompt": "x", "guidance_scale": 1})
        assert response.status_code == 400 and response.get_json()["field"] == "guidance_scale"
        response = post(client, {"model_name": model_id})
        assert response.status_code == 400 and response.get_json()["field"] == "prompt"


@pytest.mark.parametrize("model_id", ALL)
def test_boundaries_and_every_choice_are_accepted(model_id: str) -> None:
    spec = MODELS[model_id]
    for name, (kind, choices, low, high, _default) in PARAMS[model_id].items():
        good: list[object] = list(choices or ())
        good += [b for b in (low, high) if b is not None]
        if kind == "boolean":
            good += [True, False]
        for value in good:
            assert build_input(spec, "x", {name: value})[name] == value
    with pytest.raises(InvalidRequest):
        build_input(spec, "", {})


def test_models_shows_kind_price_reference_and_every_parameter(client: FlaskClient) -> None:
    body = client.get("/models").get_json()
    assert body["model_count"] == 9 and body["supported_models"] == ALL
    for model_id in ALL:
        shown = body["models"][model_id]
        ref, kind, price, unit, key, media, most = FACTS[model_id]
        assert shown["replicate_model"] == ref and shown["kind"] == kind
        assert shown["price"] == {"usd": price, "per": unit}
        expected_ref = None if key is None else {"key": key, "media": media, "max_items": most}
        assert shown["reference_input"] == expected_ref, model_id
        params = shown["parameters"]
        assert set(params) == {"prompt", *PARAMS[model_id]}, model_id
        assert params["prompt"]["required"] is True and params["prompt"]["type"] == "string"
        for name, (ptype, choices, low, high, default) in PARAMS[model_id].items():
            got = params[name]
            assert got["type"] == ptype, (model_id, name)
            assert got["default"] == default and got["required"] is False, (model_id, name)
            assert got.get("choices") == (list(choices) if choices is not None else None)
            assert got.get("minimum") == low and got.get("maximum") == high, (model_id, name)
            assert got["description"]
        if key is not None:
            assert params[key]["type"] in ("uri", "uri_list")
    assert body["models"]["nano-banana"]["parameters"]["image_input"]["max_items"] == 3
