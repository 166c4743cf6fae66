"""crawl item attempts (transient failures are fetched again, a bounded number of times)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("crawl_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("crawl_items", schema=None) as batch_op:
        batch_op.drop_column("attempts")
