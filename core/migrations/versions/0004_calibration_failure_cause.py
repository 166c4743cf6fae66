"""calibration run failure cause (expert / setup / transient): sweeps give up on an expert's own failures

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 07:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calibration_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cause", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calibration_runs", schema=None) as batch_op:
        batch_op.drop_column("cause")
