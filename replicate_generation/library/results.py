"""What a library call takes and gives back: `Request`, `Result` and `GenerationFailed`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

FilePath = str | os.PathLike[str]


class GenerationFailed(Exception):
    """Raised by `Result.raise_for_error()`; `result` is the failed item."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"item {result.index} failed ({result.error_type}): {result.error}")
        self.result = result


@dataclass(frozen=True)
class Request:
    """One item of a mixed batch: what the upstream library called `BatchRequest`.

    A `pathlib.Path` reference is read here and sent as a data: URI; a str must be a URL or one.
    `prompt` is None for a model that takes none.
    """

    prompt: str | None
    model_name: str
    output_filepath: FilePath | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What one item came to. `files` are real paths of files that exist on this machine."""

    index: int
    prompt: str | None  # None: the model took none
    success: bool
    files: list[str]
    model_requested: str
    model_used: str | None
    attempts: list[dict[str, Any]]
    prediction_id: str | None
    error: str | None
    error_type: str | None
    cost_usd: float | None
    placeholder: bool
    routed: str | None
    notes: list[str]
    job_id: str
    state: str

    def raise_for_error(self) -> Result:
        """Return self when the item succeeded; raise GenerationFailed otherwise."""
        if not self.success:
            raise GenerationFailed(self)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
