"""jobs: resumes (a paused job resumed is submitted again), result_files, estimated_finish,
hyperparameter_choices ("auto" hyperparameters, resolved at validation)

Revision ID: 0006_job_pause_results
Revises: 0005_frontdoor
Create Date: 2026-12-01 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_job_pause_results"
down_revision = "0005_frontdoor"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resumes", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("result_files", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("estimated_finish", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("hyperparameter_choices", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("hyperparameter_choices")
        batch.drop_column("estimated_finish")
        batch.drop_column("result_files")
        batch.drop_column("resumes")
