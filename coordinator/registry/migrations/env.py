"""Alembic's entry point for the registry's migrations: run on the connection ddm hands it
(coordinator/registry/schema.py), never on a URL of its own."""

from alembic import context

from coordinator.registry.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
)
with context.begin_transaction():
    context.run_migrations()
