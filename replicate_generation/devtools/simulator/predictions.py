"""Reading predictions: get (the polling hot path), cancel, and the list with its date filters
and keyset cursors, newest first, 100 a page."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from flask import Flask, Response, g, request

from replicate_generation.devtools.simulator.config import Shared
from replicate_generation.devtools.simulator.ledger import Ledger
from replicate_generation.devtools.simulator.lifecycle import TERMINAL_STATUSES, Prediction
from replicate_generation.devtools.simulator.rendering import Renderer
from replicate_generation.devtools.simulator.web import (
    NOT_FOUND,
    ApiError,
    base_url,
    json_response,
)

_PAGE_SIZE = 100
_LIST_FILTERS = ("created_after", "created_before", "source")
# An unescaped "+" of a UTC offset arrives as a space in a query string.
_SPACED_OFFSET = re.compile(r"T.* (\d{2}(?::?\d{2})?)$")


def parse_iso8601(text: str) -> datetime:
    """Parse an ISO 8601 date-time: ``Z``, ``+02:00`` and fractional seconds; naive means UTC.

    Raises ValueError. A ``+`` that arrived unescaped in a query string (as a space) is restored.
    """
    text = text.strip()
    spaced = _SPACED_OFFSET.search(text)
    if spaced is not None:
        text = f"{text[: spaced.start(1) - 1]}+{spaced.group(1)}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class PredictionRoutes:
    """GET /v1/predictions/{id}, its cancel, and GET /v1/predictions."""

    def __init__(self, shared: Shared, ledger: Ledger, renderer: Renderer) -> None:
        self._shared = shared
        self._ledger = ledger
        self._renderer = renderer

    def add_routes(self, app: Flask) -> None:
        route = app.add_url_rule
        route("/v1/predictions", view_func=self._list_predictions, methods=["GET"])
        route("/v1/predictions/<pid>", view_func=self._get_prediction, methods=["GET"])
        route("/v1/predictions/<pid>/cancel", view_func=self._cancel_prediction, methods=["POST"])

    def _owned_locked(self, pid: str) -> Prediction:
        pred = self._ledger.predictions.get(pid)
        if pred is None or pred.token_hash != g.token_hash:
            raise ApiError(404, NOT_FOUND)
        return pred

    def _get_prediction(self, pid: str) -> Response:
        """GET /v1/predictions/{id}: the polling hot path."""
        base = base_url()
        with self._shared.lock:
            self._ledger.count_locked(g.token_hash, "gets")
            pred = self._owned_locked(pid)
            return json_response(200, self._renderer.render_locked(pred, base))

    def _cancel_prediction(self, pid: str) -> Response:
        """POST /v1/predictions/{id}/cancel: 200; a terminal prediction is left unchanged."""
        base = base_url()
        with self._shared.lock:
            self._ledger.count_locked(g.token_hash, "cancels")
            pred = self._owned_locked(pid)
            now = self._shared.now()
            if pred.status(now) not in TERMINAL_STATUSES:
                pred.canceled_at = now
                self._shared.changed.notify_all()  # a held create of it answers now
            return json_response(200, self._renderer.render_locked(pred, base))

    def _list_predictions(self) -> Response:
        """GET /v1/predictions: the caller's predictions, filtered, newest first, 100 a page.

        Keyset cursors stay stable as predictions arrive; no ``logs``; old inputs read ``{}``.
        """
        base, filters = base_url(), _list_filters()
        cursor = request.args.get("cursor")
        position = _decode_cursor(cursor) if cursor else None
        with self._shared.lock:
            self._ledger.count_locked(g.token_hash, "lists")
            matches = [
                pred
                for pred in self._ledger.newest_first_locked(g.token_hash)
                if filters.admits(self._shared.wall(pred.created), "api")
            ]
            page, older, newer = _select_page(matches, position)
            results = [self._renderer.list_item_locked(pred, base) for pred in page]
        return json_response(
            200,
            {
                "next": _page_link(base, filters, older),
                "previous": _page_link(base, filters, newer),
                "results": results,
            },
        )


@dataclass(frozen=True)
class _ListFilters:
    """The filters of GET /v1/predictions, parsed, and as given (carried into next/previous)."""

    after: datetime | None
    before: datetime | None
    source: str | None
    raw: dict[str, str]

    def admits(self, created: datetime, source: str) -> bool:
        """created_after is inclusive and created_before exclusive, as Replicate documents."""
        if self.after is not None and created < self.after:
            return False
        if self.before is not None and created >= self.before:
            return False
        return self.source is None or self.source == source


def _list_filters() -> _ListFilters:
    """Read the list filters from the query string; a date that is not ISO 8601 is a 400."""
    raw = {name: request.args[name] for name in _LIST_FILTERS if request.args.get(name)}
    return _ListFilters(
        after=_date_arg(raw, "created_after"),
        before=_date_arg(raw, "created_before"),
        source=raw.get("source"),
        raw=raw,
    )


def _date_arg(raw: Mapping[str, str], name: str) -> datetime | None:
    if name not in raw:
        return None
    try:
        return parse_iso8601(raw[name])
    except ValueError:
        detail = f"{name} must be an ISO 8601 date-time"
        raise ApiError(400, {"detail": detail, "status": 400}) from None


def _encode_cursor(direction: str, seq: int) -> str:
    """Return an opaque cursor: list the predictions ``older`` or ``newer`` than number seq."""
    return base64.urlsafe_b64encode(f"{direction}:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    """Invert _encode_cursor; a cursor we did not make is a 400."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, _, seq = raw.partition(":")
        if direction in ("older", "newer"):
            return direction, int(seq)
    except ValueError:
        pass
    raise ApiError(400, {"detail": "Invalid cursor", "status": 400})


def _page_link(base: str, filters: _ListFilters, cursor_at: tuple[str, int] | None) -> str | None:
    """Return the absolute URL of a neighbouring page, with the same filters as given."""
    if cursor_at is None:
        return None
    query = {**filters.raw, "cursor": _encode_cursor(*cursor_at)}
    return f"{base}/v1/predictions?{urlencode(query)}"


def _select_page(
    newest_first: list[Prediction], cursor: tuple[str, int] | None
) -> tuple[list[Prediction], tuple[str, int] | None, tuple[str, int] | None]:
    """Return one page (newest first) and the cursors of the older and the newer pages."""
    if cursor is None:
        page = newest_first[:_PAGE_SIZE]
    elif cursor[0] == "older":
        page = [p for p in newest_first if p.seq < cursor[1]][:_PAGE_SIZE]
    else:
        page = [p for p in newest_first if p.seq > cursor[1]][-_PAGE_SIZE:]
    if page:
        low, high = page[-1].seq, page[0].seq
    elif cursor is None:
        return page, None, None
    else:  # an empty page keeps the way back to where the cursor pointed
        seq = cursor[1]
        low, high = (seq, seq - 1) if cursor[0] == "older" else (seq + 1, seq)
    older = ("older", low) if any(p.seq < low for p in newest_first) else None
    newer = ("newer", high) if any(p.seq > high for p in newest_first) else None
    return page, older, newer
