"""A job's item counts by state and summed cost kept on its row as items change
(jobs.<state>_items, jobs.cost_usd), finished jobs' totals for /metrics (job_totals), and the
index the admin's list reads newest first (jobs_by_created), and one for a job's items in one
state (job_items_by_state). Existing jobs are counted once, here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_job_counts"
down_revision: str | None = "0006_job_events"
branch_labels: str | None = None
depends_on: str | None = None

ITEM_STATES = ("queued", "running", "succeeded", "failed", "canceled", "expired")
FINISHED = "('succeeded', 'partially_failed', 'failed', 'canceled')"


def upgrade() -> None:
    for state in ITEM_STATES:
        op.add_column("jobs", sa.Column(f"{state}_items", sa.Integer, nullable=False,
                                        server_default=sa.text("0")))
    op.add_column("jobs", sa.Column("cost_usd", sa.Double, nullable=False,
                                    server_default=sa.text("0")))
    op.create_index("jobs_by_created", "jobs", [sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("job_items_by_state", "job_items", ["job_id", "state", "idx"])
    op.create_table(
        "job_totals",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )
    counted = ", ".join(
        f"{state}_items = (SELECT COUNT(*) FROM job_items"  # noqa: S608 - fixed names
        f" WHERE job_items.job_id = jobs.id AND job_items.state = '{state}')"
        for state in ITEM_STATES)
    op.execute(f"UPDATE jobs SET {counted}, cost_usd = COALESCE((SELECT SUM(cost_usd)"  # noqa: S608
               " FROM job_items WHERE job_items.job_id = jobs.id), 0)")
    op.execute("INSERT INTO job_totals (kind, state, count) SELECT 'jobs', state,"  # noqa: S608
               f" COUNT(*) FROM jobs WHERE state IN {FINISHED} GROUP BY state")
    for state in ITEM_STATES:
        op.execute("INSERT INTO job_totals (kind, state, count) SELECT 'items',"  # noqa: S608
                   f" '{state}', COALESCE(SUM({state}_items), 0) FROM jobs"
                   f" WHERE state IN {FINISHED}")


def downgrade() -> None:
    op.drop_table("job_totals")
    op.drop_index("job_items_by_state", "job_items")
    op.drop_index("jobs_by_created", "jobs")
    op.drop_column("jobs", "cost_usd")
    for state in reversed(ITEM_STATES):
        op.drop_column("jobs", f"{state}_items")
