"""Training curves: the points table keeps, per lease, the steps and losses that heartbeats
reported, for the curves `status --json` and the dashboard show.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "points",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("lease_id", sa.String(32), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_points_lease_id", "points", ["lease_id"])


def downgrade() -> None:
    op.drop_index("ix_points_lease_id", table_name="points")
    op.drop_table("points")
