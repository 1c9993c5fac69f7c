"""Callers and what they spend: issued keys (api_keys), the audit log, the spend ledger; jobs.key_id
(the key that submitted a job, which alone and the admin may see it), jobs.caller (the name
the ledger gives it), jobs.priority and jobs.start_deadline (deadline_seconds: no item created
after it); job_items.reserved_usd (held against a budget while the item is open)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_callers_and_spend"
down_revision: str | None = "0003_record_bytes"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.Text, nullable=False, unique=True),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("previous_hash", sa.Text, unique=True),
        sa.Column("previous_until", sa.Double),
        sa.Column("budget_usd", sa.Double),
        sa.Column("budget_period", sa.Text),
        sa.Column("max_concurrent", sa.Integer),
        sa.Column("weight", sa.Double, nullable=False, server_default=sa.text("1")),
        sa.Column("models", sa.Text),
        sa.Column("expires_at", sa.Double),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("rotated_at", sa.Double),
        sa.Column("revoked_at", sa.Double),
    )
    live = sa.text("revoked_at IS NULL")
    op.create_index("api_keys_live_name", "api_keys", ["name"], unique=True,
                    sqlite_where=live, postgresql_where=live)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text),
        sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_table(
        "spend_ledger",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("item_idx", sa.Integer, primary_key=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("caller", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("prediction_id", sa.Text),
        sa.Column("billed_seconds", sa.Double),
        sa.Column("cost_usd", sa.Double),
    )
    op.create_index("spend_by_time", "spend_ledger", ["at"])
    op.create_index("spend_by_key", "spend_ledger", ["key_id", "at"],
                    sqlite_where=sa.text("key_id IS NOT NULL"),
                    postgresql_where=sa.text("key_id IS NOT NULL"))
    op.add_column("jobs", sa.Column("key_id", sa.Text))
    op.add_column("jobs", sa.Column("caller", sa.Text))
    op.add_column("jobs", sa.Column("priority", sa.Text))
    op.add_column("jobs", sa.Column("start_deadline", sa.Double))
    op.add_column("job_items", sa.Column("reserved_usd", sa.Double))
    keyed = sa.text("key_id IS NOT NULL")
    op.create_index("jobs_by_key", "jobs", ["key_id", sa.text("created_at DESC"),
                                            sa.text("id DESC")],
                    sqlite_where=keyed, postgresql_where=keyed)


def downgrade() -> None:
    op.drop_column("job_items", "reserved_usd")
    op.drop_column("jobs", "start_deadline")
    op.drop_column("jobs", "priority")
    op.drop_column("jobs", "caller")
    op.drop_index("jobs_by_key", "jobs")
    op.drop_column("jobs", "key_id")
    op.drop_index("spend_by_key", "spend_ledger")
    op.drop_index("spend_by_time", "spend_ledger")
    op.drop_table("spend_ledger")
    op.drop_table("audit_log")
    op.drop_index("api_keys_live_name", "api_keys")
    op.drop_table("api_keys")
