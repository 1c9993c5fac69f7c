"""Pages of a job's items whose every item has ended: they can no longer change, so a process
keeps the most recently read ones, up to a byte bound, instead of building them again."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Per process: ~450 first pages of 50 ended items each.
MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class EndedPage:
    """Item bodies before signing (signed URLs expire), and where the next page starts."""

    items: list[dict[str, Any]]
    cursor: str | None
    size: int


class EndedPages:
    """A least-recently-used map of (job id, after, limit) to pages, bounded by bytes."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._pages: OrderedDict[tuple[str, int, int], EndedPage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> EndedPage | None:
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def put(self, key: tuple[str, int, int], items: list[dict[str, Any]],
            cursor: str | None) -> None:
        page = EndedPage(items, cursor, len(json.dumps(items, default=str)))
        if page.size > self._max_bytes:
            return
        with self._lock:
            old = self._pages.pop(key, None)
            self._bytes += page.size - (old.size if old else 0)
            self._pages[key] = page
            while self._bytes > self._max_bytes:
                _, evicted = self._pages.popitem(last=False)
                self._bytes -= evicted.size
