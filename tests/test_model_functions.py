"""Pure pieces of clients and models/: 429 hints, account names, the catalogue's shape."""

from __future__ import annotations

import httpx
import pytest

from replicate_generation.clients import account_key, retry_after_of
from replicate_generation.errors import InvalidRequest
from replicate_generation.models.catalogue import MODELS
from replicate_generation.models.validation import build_input, resolve_model

THROTTLED = "Request was throttled. Your rate limit resets in ~7s."


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ({"Retry-After": "3"}, {"detail": THROTTLED}, 3.0),          # the header wins
    ({}, {"detail": THROTTLED, "retry_after": 5}, 5.0),           # then the body's field
    ({}, {"detail": THROTTLED}, 7.0),                             # then "resets in ~Ns"
    ({}, {"detail": "slow down"}, None),                          # nothing to go on
    ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, {"detail": THROTTLED}, 7.0),
])
def test_retry_after_is_read_from_header_body_or_detail(
        headers: dict[str, str], body: dict[str, object], expected: float | None) -> None:
    response = httpx.Response(429, headers=headers, json=body)
    assert retry_after_of(response) == expected


def test_retry_after_tolerates_a_non_json_body() -> None:
    assert retry_after_of(httpx.Response(429, text="<html>busy</html>")) is None


def test_accounts_are_named_by_a_hash_never_the_token() -> None:
    key = account_key("r8_secret_value")
    assert key.startswith("acct_") and "secret" not in key
    assert key == account_key("r8_secret_value") != account_key("r8_other_value")


def test_every_catalogue_model_takes_a_prompt_and_valid_defaults() -> None:
    for spec in MODELS.values():
        assert resolve_model(spec.id) is spec and resolve_model(spec.ref) is spec
        prompt = spec.param("prompt")
        assert prompt is not None and prompt.required
        # Each default, sent explicitly, passes the model's own validation.
        defaults = {p.name: p.default for p in spec.params
                    if p.default is not None and p.name != "prompt"}
        assert build_input(spec, "x", defaults) == build_input(spec, "x", {})


def test_build_input_names_the_field_with_its_prefix() -> None:
    with pytest.raises(InvalidRequest) as info:
        build_input(MODELS["flux-dev"], "x", {"guidance": 11}, prefix="tasks[2].")
    assert info.value.field == "tasks[2].guidance"
