"""GET /usage: what was spent, from the ledger, grouped by key, model or day, as JSON or CSV; the
admin sees every caller, an issued key its own, a user token its own account's."""

from __future__ import annotations

import csv
import io
import time
from calendar import timegm
from datetime import UTC, date, datetime

from flask import Blueprint, Response, g, jsonify, request

from replicate_generation.errors import InvalidRequest
from replicate_generation.http import context
from replicate_generation.http.auth import require_key
from replicate_generation.jobs.spend import GROUPS, period_start

usage_bp = Blueprint("usage", __name__)
COLUMNS = ("key", "model", "day", "predictions", "cost_usd", "billed_seconds")


@usage_bp.get("/usage")
@require_key()
def usage() -> Response:
    """Predictions and cost per group in [from, to); `to` as a date includes that whole day."""
    group_by = _group_by(request.args.get("group_by", "key"))
    now = time.time()
    since = _moment("from", request.args.get("from"), period_start("month", now), end=False)
    until = _moment("to", request.args.get("to"), now + 1, end=True)
    if until <= since:
        raise InvalidRequest("to", "to must be after from")
    caller = g.caller
    rows = context.runner().store.spend.usage(
        group_by, since, until, key_id=caller.key.id if caller.key is not None else None,
        account=None if caller.admin or caller.key is not None else caller.account)
    if request.args.get("format", "json") == "csv":
        return Response(_csv(rows), mimetype="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="usage.csv"'})
    if request.args.get("format", "json") != "json":
        raise InvalidRequest("format", "format must be json or csv")
    return jsonify(object="list", group_by=list(group_by), data=rows,
                   total_cost_usd=round(sum(r["cost_usd"] for r in rows), 6))


def _group_by(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names or any(name not in GROUPS for name in names):
        raise InvalidRequest("group_by", f"group_by must name one or more of {', '.join(GROUPS)}"
                             " (comma-separated)")
    return names


def _moment(field: str, raw: str | None, default: float, *, end: bool) -> float:
    """A date (YYYY-MM-DD, UTC) or an ISO 8601 time with its zone, as epoch seconds."""
    if raw is None:
        return default
    if len(raw) <= 10:
        try:
            day = date.fromisoformat(raw)
        except ValueError:
            raise InvalidRequest(field, f"{field} must be YYYY-MM-DD or an ISO 8601 time") from None
        # The end of a day added in seconds: the day after 9999-12-31 is no date.
        return float(timegm(day.timetuple()) + (86_400 if end else 0))
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(field, f"{field} must be YYYY-MM-DD or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _csv(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
