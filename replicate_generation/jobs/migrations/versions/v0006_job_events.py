"""The event log a job's stream replays (job_events): one row per change, written in the change's
own transaction, ids in commit order and (SQLite AUTOINCREMENT) never reused."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_job_events"
down_revision: str | None = "0005_key_costs"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("job_events_by_job", "job_events", ["job_id", "id"])
    op.create_index("job_events_by_account", "job_events", ["account", "id"])
    keyed = sa.text("key_id IS NOT NULL")
    op.create_index("job_events_by_key", "job_events", ["key_id", "id"],
                    sqlite_where=keyed, postgresql_where=keyed)


def downgrade() -> None:
    op.drop_index("job_events_by_key", "job_events")
    op.drop_index("job_events_by_account", "job_events")
    op.drop_index("job_events_by_job", "job_events")
    op.drop_table("job_events")
