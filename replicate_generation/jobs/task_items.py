"""A submission's tasks as the job store's new items, each built when the store reads it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from replicate_generation.generation import Task
from replicate_generation.jobs.rows import NewItem
from replicate_generation.models.hardware import TimePrices


class TaskItems(Sequence[NewItem]):
    """The store packs each item as it reads it, so a 5,000-item job's specs (plans, inputs and
    names as dicts) never all exist at once beside its tasks."""

    def __init__(self, tasks: Sequence[Task], request_id: str | None, prices: TimePrices) -> None:
        self._tasks = tasks
        self._request_id = request_id
        self._prices = prices

    def __len__(self) -> int:
        return len(self._tasks)

    @overload
    def __getitem__(self, index: int) -> NewItem: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[NewItem]: ...

    def __getitem__(self, index: int | slice) -> NewItem | Sequence[NewItem]:
        if isinstance(index, slice):
            return [self._item(task) for task in self._tasks[index]]
        return self._item(self._tasks[index])

    def _item(self, task: Task) -> NewItem:
        return NewItem(spec={**task.to_record(), "http_request_id": self._request_id},
                       reserved_usd=task.max_cost_usd(self._prices))
