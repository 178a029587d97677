"""distillations and their events (POST /v1/datasets/distill)

Revision ID: 0007_distillations
Revises: 0006_job_pause_results
Create Date: 2026-12-01 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_distillations"
down_revision = "0006_job_pause_results"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "distillations",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("question_file", sa.String(40), nullable=False),
        sa.Column("teacher", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("output_file", sa.String(40), nullable=True),
        sa.Column("output_sha256", sa.String(64), nullable=True),
        sa.Column("traces_file", sa.String(40), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_distillations_project_id", "distillations", ["project_id"])
    op.create_index("ix_distillations_status", "distillations", ["status"])
    op.create_index("ix_distillations_output_sha256", "distillations", ["output_sha256"])
    op.create_table(
        "distill_events",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column(
            "distill_id",
            sa.String(40),
            sa.ForeignKey("distillations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("distill_id", "number"),
    )
    op.create_index("ix_distill_events_distill_id", "distill_events", ["distill_id"])


def downgrade() -> None:
    op.drop_table("distill_events")
    op.drop_table("distillations")
