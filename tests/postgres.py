"""PostgreSQL for the tests: a fresh, uniquely named database per test on the local cluster.

The tests reach the cluster over its Unix socket (``HOST``) as the OS user, through peer
authentication, so that user needs a role allowed to create databases (as root:
``su postgres -c "createuser -s root"``). Each database is made from the ``postgres``
maintenance database and dropped WITH (FORCE) afterwards, so a test that leaves connections
open cannot leak it.

When the cluster cannot be reached the tests that need it are skipped, saying how to start it;
with ``DDM_REQUIRE_POSTGRES=1`` (CI sets it) they fail instead, so that nothing is hidden there.
"""

from __future__ import annotations

import functools
import getpass
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

HOST = "/var/run/postgresql"
REQUIRED = "DDM_REQUIRE_POSTGRES"


def url(database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the local cluster."""
    return f"postgresql+psycopg:///{database}?host={HOST}"


def connect(database_url: str = url("postgres")):
    """A plain psycopg connection (autocommit), outside SQLAlchemy, to the database of ``database_url``."""
    import psycopg
    from sqlalchemy.engine import make_url

    return psycopg.connect(dbname=make_url(database_url).database, host=HOST, autocommit=True, connect_timeout=5)


@functools.cache
def unreachable() -> str | None:
    """Why PostgreSQL cannot be used here (one line), or None when it can; asked once per run."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        with connect() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot connect to PostgreSQL at {HOST}: {first}"
    return None


def require() -> None:
    """Skip the calling test when PostgreSQL is unreachable, or fail it under DDM_REQUIRE_POSTGRES=1."""
    reason = unreachable()
    if reason is None:
        return
    if os.environ.get(REQUIRED) == "1":
        pytest.fail(f"{REQUIRED}=1 but {reason}", pytrace=False)
    pytest.skip(
        f"{reason}; to run the PostgreSQL tests, start the cluster (pg_lsclusters names it:"
        " pg_ctlcluster --skip-systemctl-redirect VERSION main start) and give this user a role"
        f" (su postgres -c 'createuser -s {getpass.getuser()}')"
    )


@contextmanager
def fresh_database(template: str | None = None) -> Iterator[str]:
    """A new database for one test, empty or, given the SQLAlchemy URL of another database, a copy
    of it (CREATE DATABASE ... TEMPLATE: nothing may be connected to that one meanwhile); yields
    its SQLAlchemy URL and drops it afterwards."""
    require()
    from sqlalchemy.engine import make_url

    name = f"ddm_test_{uuid.uuid4().hex[:16]}"
    copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
    with connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield url(name)
    finally:
        with connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_database(source_url: str, target_url: str) -> None:
    """Make the database of ``target_url`` again, as a copy of the one of ``source_url`` (dropped
    first WITH (FORCE) if it exists; nothing may be connected to the source meanwhile)."""
    from sqlalchemy.engine import make_url

    source, target = make_url(source_url).database, make_url(target_url).database
    with connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')
