"""model_versions.manifest_sha256: the manifest pin thinkforge keeps itself

Revision ID: 0003_manifest_pin
Revises: 0002_leader_lease
Create Date: 2026-12-01 12:25:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_manifest_pin"
down_revision = "0002_leader_lease"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("manifest_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("manifest_sha256")
