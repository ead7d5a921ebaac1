"""Fixtures shared by the whole suite."""

import pytest

from ddm_model.data import ImageDataset, load_digits
from tests import postgres


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    """A fresh copy of the built-in digits per test module (tests must not mutate it)."""
    return load_digits()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty registry database on each backend: a SQLite file in tmp_path, then a fresh
    PostgreSQL database (skipped, or failed under DDM_REQUIRE_POSTGRES=1, when PostgreSQL is
    unreachable: see tests/postgres.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ddm.db"
    else:
        with postgres.fresh_database() as url:
            yield url


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database, for tests of PostgreSQL alone."""
    with postgres.fresh_database() as url:
        yield url
