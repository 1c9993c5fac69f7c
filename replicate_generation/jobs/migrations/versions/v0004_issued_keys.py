"""Issued keys (api_keys), the audit log, and jobs.key_id: the key that submitted a job, which
alone (and the admin) may see it."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_issued_keys"
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
    op.add_column("jobs", sa.Column("key_id", sa.Text))
    keyed = sa.text("key_id IS NOT NULL")
    op.create_index("jobs_by_key", "jobs", ["key_id", sa.text("created_at DESC"),
                                            sa.text("id DESC")],
                    sqlite_where=keyed, postgresql_where=keyed)


def downgrade() -> None:
    op.drop_index("jobs_by_key", "jobs")
    op.drop_column("jobs", "key_id")
    op.drop_table("audit_log")
    op.drop_index("api_keys_live_name", "api_keys")
    op.drop_table("api_keys")
