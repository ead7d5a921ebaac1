"""The registry as ddm 0.1 made it, before migrations: islands, invites, experts, leases,
uploads, artifacts, ensembles and the event log.

A registry made by ddm 0.1 holds exactly these tables and no alembic_version; `ddm-coordinator
migrate` stamps it at this revision and upgrades it from here.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "islands",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
        sa.Column("bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint_messages", sa.Integer(), nullable=False),
        sa.Column("checkpoint_message_bytes", sa.BigInteger(), nullable=False),
        sa.Column("heartbeats", sa.Integer(), nullable=False),
        sa.Column("heartbeat_bytes", sa.BigInteger(), nullable=False),
        sa.Column("control_messages", sa.Integer(), nullable=False),
        sa.Column("control_bytes", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "ensembles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("experts", sa.Integer(), nullable=False),
        sa.Column("router_step", sa.BigInteger(), nullable=False),
        sa.Column("router_steps", sa.BigInteger(), nullable=False),
        sa.Column("router_sha256", sa.String(64), nullable=True),
        sa.Column("manifest_json", sa.LargeBinary(), nullable=True),
        sa.Column("signature", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("island_id", sa.String(32), nullable=True),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_table(
        "invites",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("island_id", sa.String(32), sa.ForeignKey("islands.id"), nullable=True),
    )
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("shard_sha256", sa.String(64), nullable=False),
        sa.Column("shard_fingerprint", sa.String(64), nullable=False),
        sa.Column("island_id", sa.String(32), sa.ForeignKey("islands.id"), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("images_per_second", sa.Float(), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=True),
        sa.Column("entry_json", sa.LargeBinary(), nullable=True),
        sa.Column("signature", sa.LargeBinary(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("island_id", sa.String(32), sa.ForeignKey("islands.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("deadline_at", sa.Float(), nullable=False),
        sa.Column("last_heartbeat_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("leases.id"), nullable=False),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("island_id", sa.String(32), sa.ForeignKey("islands.id"), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("committed_offset", sa.BigInteger(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    for table in ("uploads", "leases", "experts", "invites", "events", "ensembles", "artifacts", "islands"):
        op.drop_table(table)
