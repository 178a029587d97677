"""jobs: max_retries and retries (a lost run is resubmitted within the job's budget)

Revision ID: 0004_job_retries
Revises: 0003_manifest_pin
Create Date: 2026-12-01 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_retries"
down_revision = "0003_manifest_pin"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("max_retries", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("retries", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retries")
        batch.drop_column("max_retries")
