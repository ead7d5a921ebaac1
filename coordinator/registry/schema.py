"""The registry's schema version, and its migrations (Alembic, in migrations/).

A new registry is made by running every migration. A registry holds its revision in Alembic's
``alembic_version`` table; one made by ddm 0.1, before migrations, has its tables and no such
table, and counts as the first revision. `serve` refuses a registry that is not at ``HEAD``,
naming `ddm-coordinator migrate`, which upgrades it in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema of ddm 0.1, made before migrations existed
# Alembic's plugin and context chatter (logged as it is imported) is not the operator's
# business; `migrate` says what it did. Hence the imports inside the functions, after this.
logging.getLogger("alembic").setLevel(logging.WARNING)


def _config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def revision(engine: Engine) -> str | None:
    """The registry's revision: None for an empty database, BASELINE for one ddm 0.1 made."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and inspect(connection).has_table("experts"):
            return BASELINE
        return current


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Run every migration the registry lacks, in one transaction where the database allows;
    (revision before, revision after)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    before = revision(engine)
    with engine.begin() as connection:
        config = _config(connection)
        if before == BASELINE and MigrationContext.configure(connection).get_current_revision() is None:
            command.stamp(config, BASELINE)  # a ddm 0.1 registry: its tables are the baseline's
        command.upgrade(config, "head")
    return before, head()
