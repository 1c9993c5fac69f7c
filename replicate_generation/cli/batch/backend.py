"""What the run loop asks of where its jobs run: a service (remote) or this process (in_process)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from replicate_generation.cli.batch.reader import Row
from replicate_generation.outputs import IfExists


@dataclass
class JobView:
    """A job as the run loop sees it at one look."""

    state: str
    counts: dict[str, int]
    items: list[dict[str, Any]]

    @property
    def terminal(self) -> bool:
        return self.state in ("succeeded", "partially_failed", "failed", "canceled")


class Backend(Protocol):
    """Submit a job (raising Busy when there is no room), look at it, place an item's files;
    before that, say a model's parameter types and check a chunk as the job would be parsed."""

    mode: str  # "service" or "in-process", for the manifest and messages

    def parameter_types(self, model: str) -> Mapping[str, str] | None: ...

    def check(self, body: dict[str, Any], max_items: int) -> None: ...

    def submit(self, body: dict[str, Any], key: str) -> tuple[str, bool]: ...

    def exists(self, job_id: str) -> bool: ...

    def poll(self, job_id: str) -> JobView | None: ...

    def place(self, item: dict[str, Any], row: Row, output_dir: Path | None,
              if_exists: IfExists) -> list[str]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...
