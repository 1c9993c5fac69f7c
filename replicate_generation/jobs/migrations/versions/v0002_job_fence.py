"""Fencing: jobs.fence, bumped by every claim, so a stale owner's late write changes nothing.

Jobs from before start at 0; the next claim makes it 1.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_fence"
down_revision: str | None = "0001_baseline"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("fence", sa.Integer, nullable=False,
                                    server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("jobs", "fence")
