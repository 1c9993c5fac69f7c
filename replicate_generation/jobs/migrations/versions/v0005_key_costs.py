"""Issued keys may run models of unknown cost: api_keys.allow_unknown_cost (0 or 1; a budgeted
key is refused such models unless it is 1)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_key_costs"
down_revision: str | None = "0004_callers_and_spend"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("allow_unknown_cost", sa.Integer, nullable=False,
                                        server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("api_keys", "allow_unknown_cost")
