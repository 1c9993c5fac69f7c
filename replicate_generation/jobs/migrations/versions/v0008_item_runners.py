"""The process running each item (job_items.runner): a big job's items are claimed a window at a
time by any process with room, not only by the job's owner."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_item_runners"
down_revision: str | None = "0007_job_counts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("job_items", sa.Column("runner", sa.Text))
    claimed = sa.text("runner IS NOT NULL")
    op.create_index("job_items_by_runner", "job_items", ["runner"], sqlite_where=claimed,
                    postgresql_where=claimed)


def downgrade() -> None:
    op.drop_index("job_items_by_runner", "job_items")
    op.drop_column("job_items", "runner")
