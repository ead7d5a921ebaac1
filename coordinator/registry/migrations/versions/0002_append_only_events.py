"""The event log is append-only, enforced by the database itself on every backend: SQLite
triggers (ddm 0.1 made them already), and on PostgreSQL a trigger function that refuses UPDATE,
DELETE and TRUNCATE of events.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

REFUSAL = "the event log is append-only"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION ddm_events_append_only() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER events_no_change BEFORE UPDATE OR DELETE ON events"
            " FOR EACH ROW EXECUTE FUNCTION ddm_events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events"
            " FOR EACH STATEMENT EXECUTE FUNCTION ddm_events_append_only()"
        )
    else:
        for change in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER IF NOT EXISTS events_no_{change.lower()} BEFORE {change} ON events"
                f" BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS events_no_truncate ON events")
        op.execute("DROP TRIGGER IF EXISTS events_no_change ON events")
        op.execute("DROP FUNCTION IF EXISTS ddm_events_append_only()")
    else:
        for change in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS events_no_{change}")
