"""Per-account bounds: jobs.record_bytes (what a job's items and shared values took when stored)
and an index to sum an account's jobs and bytes from; an index on finished_at for retention.
Older jobs are measured once, here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_record_bytes"
down_revision: str | None = "0002_job_fence"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("record_bytes", sa.BigInteger, nullable=False,
                                    server_default=sa.text("0")))
    op.create_index("jobs_usage", "jobs", ["account", "record_bytes"])
    op.create_index("jobs_finished", "jobs", ["finished_at"])
    op.execute(
        "UPDATE jobs SET record_bytes = "
        "COALESCE((SELECT SUM(LENGTH(spec)) FROM job_items WHERE job_items.job_id = jobs.id), 0)"
        " + COALESCE((SELECT SUM(LENGTH(value)) FROM job_values"
        " WHERE job_values.job_id = jobs.id), 0)")


def downgrade() -> None:
    op.drop_index("jobs_finished", "jobs")
    op.drop_index("jobs_usage", "jobs")
    op.drop_column("jobs", "record_bytes")
