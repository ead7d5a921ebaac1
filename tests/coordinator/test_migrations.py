"""The registry's schema migrations on real databases: a registry made by ddm 0.1 (a real file,
tests/data/registry-0.1.0.db, written by that release) is refused by `serve` with one line that
names `migrate`, and `migrate` upgrades it in place with nothing lost."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy

from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from coordinator.registry import Registry, RegistryError, schema

REPO = Path(__file__).resolve().parents[2]
OLD = REPO / "tests" / "data" / "registry-0.1.0.db"
# What tests/data/registry-0.1.0.db holds: ddm 0.1's init of 2 experts, one enrolled island that
# leased expert 0 and reported step 2 (training), and an unused reader invite.
OLD_ISLAND, OLD_SECRET = "c046018c4b2d44aa", "36TYrjSnmqRVAnaRaJME_ksXESyiG-ZOTH2Coj3DKF4"


def tables(path: Path) -> dict[str, list[tuple]]:
    """Every row of every ddm table, read with sqlite3 itself."""
    db = sqlite3.connect(path)
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    rows = {n: sorted(db.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in names if n != "alembic_version"}
    db.close()
    return rows


def coordinator(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture
def old_home(tmp_path):
    """A home whose registry is the file ddm 0.1 wrote."""
    root = tmp_path / "home"
    init_home(InitOptions(home=root, experts=2, preset="tiny", steps=3, clustering="random", router_steps=3))
    shutil.copy(OLD, root / "ddm.db")
    return Home(root)


def test_a_new_registry_is_at_the_newest_revision_and_migrate_changes_nothing(database_url):
    registry = Registry(database_url)
    assert schema.revision(registry.engine) is None  # an empty database
    registry.create()
    assert registry.require_current_schema() == schema.head() == "0003"
    assert registry.migrate() == ("0003", "0003")
    registry.add_experts([(0, "ab" * 32, "f0")])  # one event: the "init"
    with registry.engine.begin() as conn, pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("DELETE FROM events")  # the event log's triggers came with the migrations
    registry.close()


def test_the_event_log_cannot_be_truncated_on_postgresql(postgres_url):
    registry = Registry(postgres_url)
    registry.create()
    registry.add_experts([(0, "ab" * 32, "f0")])
    with registry.engine.begin() as conn, pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("TRUNCATE events")
    assert [e.kind for e in registry.events()] == ["init"]
    registry.close()


def test_serve_refuses_a_registry_of_the_previous_release_in_one_line_naming_migrate(old_home):
    before = tables(old_home.root / "ddm.db")
    result = coordinator("serve", "--home", old_home.root, "--listen", "127.0.0.1:0", "--no-tls")
    assert result.returncode == 2
    [message] = [line for line in result.stderr.splitlines() if line.strip()]  # one line, no traceback
    assert message.startswith("error:")
    assert "ddm 0.1, before migrations" in message and "ddm-coordinator migrate" in message
    assert tables(old_home.root / "ddm.db") == before  # refused before anything was touched


def test_migrate_upgrades_the_previous_release_in_place_with_nothing_lost(old_home):
    before = tables(old_home.root / "ddm.db")
    assert len(before["events"]) == 9 and len(before["islands"]) == 1
    result = coordinator("migrate", "--home", old_home.root)
    assert result.returncode == 0, result.stderr
    assert "from revision 0001 to 0003" in result.stdout
    after = tables(old_home.root / "ddm.db")
    assert after.pop("points") == []  # the training curves' table (0003), empty
    assert after == before  # every row of every table kept

    registry = Registry(old_home.database_url(old_home.load_config()))
    assert registry.require_current_schema() == "0003"
    island = registry.authenticate(OLD_ISLAND, OLD_SECRET)  # its credential still works
    assert island is not None and island.name == "old-island"
    assert [(e.state, e.step) for e in registry.experts()] == [("training", 2), ("open", 0)]
    registry.create_invite("island", 60)  # and the registry takes new writes
    with registry.engine.begin() as conn, pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("DELETE FROM events")
    registry.close()
    again = coordinator("migrate", "--home", old_home.root)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_registry_from_a_newer_ddm_is_refused(database_url):
    registry = Registry(database_url)
    registry.create()
    with registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(RegistryError, match="revision 9999; this ddm needs revision 0003"):
        registry.require_current_schema()
    registry.close()
