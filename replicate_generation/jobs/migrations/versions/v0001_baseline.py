"""Baseline: the job tables as the store made them before migrations (CREATE TABLE IF NOT EXISTS).

A state file from then has no alembic_version: only what is missing is created, so every row
stays. A frozen copy, not schema.py: later revisions change that.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    metadata = _baseline()
    metadata.create_all(bind, checkfirst=True)
    # A table that existed keeps its rows; an index it lacks is still made.
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    _baseline().drop_all(op.get_bind(), checkfirst=True)


def _baseline() -> sa.MetaData:
    metadata = sa.MetaData()
    _jobs(metadata)
    _items(metadata)
    sa.Table("job_files", metadata,
             sa.Column("path", sa.Text, primary_key=True),
             sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                       nullable=False),
             sa.Index("job_files_by_job", "job_id"))
    sa.Table("job_values", metadata,
             sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                       primary_key=True),
             sa.Column("digest", sa.Text, primary_key=True),
             sa.Column("value", sa.Text, nullable=False))
    sa.Table("job_workers", metadata,
             sa.Column("id", sa.Text, primary_key=True),
             sa.Column("heartbeat_at", sa.Double, nullable=False))
    # Made by the readiness probe on SQLite; here for PostgreSQL.
    sa.Table("ready_probe", metadata,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
             sa.Column("at", sa.Double))
    return metadata


def _jobs(metadata: sa.MetaData) -> None:
    zero = sa.text("0")
    jobs = sa.Table(
        "jobs", metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("origin", sa.Text, nullable=False, server_default="service"),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("owner", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("cancel_requested_at", sa.Double),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("request_hash", sa.Text),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_private", sa.Integer, nullable=False, server_default=zero),
        sa.Column("webhook_state", sa.Text),
        sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default=zero),
        sa.Column("webhook_next_at", sa.Double),
        sa.Column("webhook_error", sa.Text))
    keyed = jobs.c.idempotency_key.is_not(None)
    opened = jobs.c.state.in_(["queued", "running"])
    pending = jobs.c.webhook_state == "pending"
    sa.Index("jobs_idempotency", jobs.c.account, jobs.c.idempotency_key, unique=True,
             sqlite_where=keyed, postgresql_where=keyed)
    sa.Index("jobs_by_account", jobs.c.account, jobs.c.created_at.desc(), jobs.c.id.desc())
    sa.Index("jobs_open", jobs.c.state, sqlite_where=opened, postgresql_where=opened)
    sa.Index("jobs_webhooks", jobs.c.webhook_next_at, sqlite_where=pending,
             postgresql_where=pending)


def _items(metadata: sa.MetaData) -> None:
    sa.Table(
        "job_items", metadata,
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("prediction_id", sa.Text),
        sa.Column("prediction_model", sa.Text),
        sa.Column("model_used", sa.Text),
        sa.Column("attempts", sa.Text, nullable=False, server_default="[]"),
        sa.Column("files", sa.Text, nullable=False, server_default="[]"),
        sa.Column("error", sa.Text),
        sa.Column("error_type", sa.Text),
        sa.Column("cost_usd", sa.Double),
        sa.Column("placeholder", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("notes", sa.Text, nullable=False, server_default="[]"),
        sa.Column("queued_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double))
