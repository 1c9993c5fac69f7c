"""The audit log: who (a key's name or "admin", never a secret) changed what and when; appended
only, read newest first."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.schema import audit_log


class AuditLog:
    """Append-only records on the job store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db

    def append(self, actor: str, action: str, target: str | None,
               details: Mapping[str, Any], now: float) -> None:
        with self._db.write() as conn:
            conn.execute(audit_log.insert().values(
                at=now, actor=actor, action=action, target=target,
                details=json.dumps(dict(details), sort_keys=True, default=str)))

    def newest(self, limit: int, before: int | None = None) -> list[dict[str, Any]]:
        """Up to `limit` records, newest first, older than the record id `before` if given."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if before is not None:
            query = query.where(audit_log.c.id < before)
        with self._db.read() as conn:
            return [{"id": row.id, "at": row.at, "actor": row.actor, "action": row.action,
                     "target": row.target, "details": json.loads(row.details)}
                    for row in conn.execute(query)]
