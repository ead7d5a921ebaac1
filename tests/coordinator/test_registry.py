"""The SQL registry on a real database, SQLite and PostgreSQL alike (the ``database_url``
fixture): invites, leases, uploads, events. What only SQLite has (its pragmas, its file on
disk) is tested on SQLite alone, through ``sqlite_registry``."""

import sqlite3

import pytest
import sqlalchemy

from coordinator.clock import ManualClock
from coordinator.registry import Grant, NoWork, Registry, RegistryError
from tests import postgres

SHARD = "ab" * 32


def open_registry(url):
    reg = Registry(url, lease_seconds=60, clock=ManualClock())
    reg.create()
    reg.add_experts([(0, SHARD, "f0"), (1, SHARD, "f1"), (2, SHARD, "f2")])
    return reg


@pytest.fixture
def registry(database_url):
    reg = open_registry(database_url)
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path):
    """The registry in tmp_path/ddm.db, for what only SQLite has."""
    reg = open_registry(f"sqlite:///{tmp_path / 'ddm.db'}")
    yield reg
    reg.close()


def enroll(registry, name="isle"):
    token = registry.create_invite("island", 60)
    island, credential = registry.redeem_invite(token, name)
    return island, credential


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_registry):
    with sqlite_registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_invites_are_single_use_and_expire(registry):
    token = registry.create_invite("island", 60)
    island, credential = registry.redeem_invite(token, "a")
    assert credential.startswith(island.id + ".")
    assert registry.authenticate(island.id, credential.split(".", 1)[1]).id == island.id
    assert registry.authenticate(island.id, "wrong") is None
    assert registry.authenticate("nobody", "x") is None
    with pytest.raises(RegistryError, match="already used") as err:
        registry.redeem_invite(token, "b")
    assert err.value.code == "unauthenticated"
    with pytest.raises(RegistryError, match="invalid invite"):
        registry.redeem_invite("ddm_not-a-token", "c")
    expired = registry.create_invite("island", -1)
    with pytest.raises(RegistryError, match="expired"):
        registry.redeem_invite(expired, "d")
    assert len(registry.snapshot()["islands"]) == 1
    with pytest.raises(RegistryError, match="unknown role"):
        registry.create_invite("admin", 60)


def test_tokens_are_stored_only_as_hashes(sqlite_registry, tmp_path):
    token = sqlite_registry.create_invite("island", 60)
    raw = (tmp_path / "ddm.db").read_bytes() + (tmp_path / "ddm.db-wal").read_bytes()
    assert token.encode() not in raw


def test_leases_go_to_distinct_islands_and_come_back_to_their_holder(registry):
    a, _ = enroll(registry, "a")
    b, _ = enroll(registry, "b")
    first = registry.acquire_lease(a.id)
    second = registry.acquire_lease(b.id)
    assert isinstance(first, Grant) and isinstance(second, Grant)
    assert (first.expert_id, second.expert_id) == (0, 1)
    again = registry.acquire_lease(a.id)
    assert again.lease_id == first.lease_id and again.renewed and again.deadline_at >= first.deadline_at
    states = {e.id: e.state for e in registry.experts()}
    assert states == {0: "leased", 1: "leased", 2: "open"}


def test_traffic_and_last_seen_are_written_for_many_islands_at_once(registry):
    a, _ = enroll(registry, "a")
    b, _ = enroll(registry, "b")
    registry.add_traffic({(a.id, "heartbeat"): (3, 90), (a.id, "control"): (1, 10), (b.id, "checkpoint"): (2, 5000)})
    registry.add_traffic({(a.id, "heartbeat"): (1, 30)})
    registry.touch({a.id: 1000.0, b.id: 2000.0})
    rows = {i["name"]: i for i in registry.snapshot()["islands"]}
    assert (rows["a"]["heartbeats"], rows["a"]["heartbeat_bytes"]) == (4, 120)
    assert (rows["a"]["control_messages"], rows["a"]["control_bytes"]) == (1, 10)
    assert (rows["a"]["checkpoint_messages"], rows["b"]["checkpoint_messages"]) == (0, 2)
    assert (rows["b"]["checkpoint_message_bytes"], rows["b"]["heartbeats"]) == (5000, 0)
    assert (rows["a"]["last_seen_at"], rows["b"]["last_seen_at"]) == (1000.0, 2000.0)


def test_heartbeats_extend_and_silence_expires(registry):
    registry.lease_seconds = 0.2
    a, _ = enroll(registry)
    grant = registry.acquire_lease(a.id)
    deadline = registry.heartbeat(a.id, grant.lease_id, 5, 0.5, 100.0)
    assert deadline > registry.clock.now()
    assert registry.expert(0).state == "training" and registry.expert(0).step == 5
    registry.clock.advance(0.3)
    assert registry.expire_leases() == 1
    assert registry.expert(0).state == "open"
    with pytest.raises(RegistryError, match="expired") as err:
        registry.heartbeat(a.id, grant.lease_id, 6, 0.4, 100.0)
    assert err.value.code == "failed_precondition"
    # Its old holder gets the same expert back first (its local progress survives).
    b, _ = enroll(registry, "b")
    registry.lease_seconds = 60
    assert registry.acquire_lease(a.id).expert_id == 0
    assert registry.acquire_lease(b.id).expert_id == 1


def test_a_lease_is_only_usable_by_its_island(registry):
    a, _ = enroll(registry, "a")
    b, _ = enroll(registry, "b")
    grant = registry.acquire_lease(a.id)
    with pytest.raises(RegistryError) as err:
        registry.heartbeat(b.id, grant.lease_id, 1, 0.1, 1.0)
    assert err.value.code == "permission_denied"
    with pytest.raises(RegistryError):
        registry.begin_upload(b.id, grant.lease_id, 10, "cd" * 32, quota=100)


def test_no_work_says_why(registry):
    islands = [enroll(registry, str(i))[0] for i in range(4)]
    for island in islands[:3]:
        assert isinstance(registry.acquire_lease(island.id), Grant)
    none = registry.acquire_lease(islands[3].id)
    assert isinstance(none, NoWork) and not none.finished and "leased to another" in none.reason


def test_uploads_commit_in_order_and_resume(registry):
    a, _ = enroll(registry)
    grant = registry.acquire_lease(a.id)
    with pytest.raises(RegistryError) as err:
        registry.begin_upload(a.id, grant.lease_id, 1000, "cd" * 32, quota=999)
    assert err.value.code == "resource_exhausted"
    upload, superseded = registry.begin_upload(a.id, grant.lease_id, 1000, "cd" * 32, quota=1000)
    assert superseded == []
    assert registry.commit_chunk(a.id, upload, 0, 600) == 600
    with pytest.raises(RegistryError, match="committed offset 600"):
        registry.commit_chunk(a.id, upload, 0, 600)  # the same chunk again
    again, superseded = registry.begin_upload(a.id, grant.lease_id, 1000, "cd" * 32, quota=1000)
    assert again.id == upload.id and again.committed_offset == 600 and superseded == []
    assert registry.expert(grant.expert_id).state == "uploading"
    assert registry.commit_chunk(a.id, again, 600, 400) == 1000
    row = registry.upload_for(a.id, upload.id)
    assert (row.chunks, row.bytes_received, row.committed_offset) == (2, 1000, 1000)
    assert registry.snapshot()["islands"][0]["bytes_received"] == 1000
    assert registry.expert(grant.expert_id).state == "uploaded"  # every byte is committed


def test_a_lease_holds_one_open_upload(registry):
    a, _ = enroll(registry)
    grant = registry.acquire_lease(a.id)
    first, _ = registry.begin_upload(a.id, grant.lease_id, 1000, "cd" * 32, quota=1000)
    second, superseded = registry.begin_upload(a.id, grant.lease_id, 900, "ef" * 32, quota=1000)
    assert superseded == [first.id] and second.id != first.id
    assert registry.upload_for(a.id, first.id).state == "superseded"
    with pytest.raises(RegistryError, match="is superseded; begin a new upload"):
        registry.commit_chunk(a.id, first, 0, 100)  # a superseded upload takes no more bytes


def test_a_stalled_assembly_can_be_taken_over(registry):
    first = registry.start_ensemble(2, 10)
    with pytest.raises(RegistryError, match="being assembled"):
        registry.start_ensemble(2, 10)
    with registry.transaction() as s:  # make it look silent for longer than the limit
        from coordinator.registry import STALE_ASSEMBLY_S, Ensemble

        s.get(Ensemble, first).updated_at -= STALE_ASSEMBLY_S + 1
    second = registry.start_ensemble(2, 10)
    assert second != first
    states = {e["id"]: e["state"] for e in registry.snapshot()["ensembles"]}
    assert states == {first: "failed", second: "training"}


def test_a_bad_database_url_is_one_clear_error():
    with pytest.raises(RegistryError, match="cannot use the database URL"):
        Registry("nosuchdb://x")


def test_event_log_is_append_only(registry, tmp_path):
    enroll(registry)
    kinds = [e.kind for e in registry.events()]
    assert kinds[:3] == ["init", "invite", "enroll"]
    with registry.engine.begin() as conn, pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("UPDATE events SET kind = 'forged'")
    # The database itself refuses, whoever connects: a plain client, outside SQLAlchemy.
    if registry.engine.dialect.name == "sqlite":
        db = sqlite3.connect(tmp_path / "ddm.db")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM events")
        db.close()
    else:
        import psycopg

        with postgres.connect(registry.url) as db, pytest.raises(psycopg.DatabaseError, match="append-only"):
            db.execute("DELETE FROM events")
    assert [e.kind for e in registry.events()][:3] == ["init", "invite", "enroll"]


def test_any_sqlalchemy_url_works(tmp_path):
    memory = Registry("sqlite+pysqlite:///" + str(tmp_path / "other.db"))
    memory.create()
    memory.add_experts([(0, SHARD, "f")])
    assert [e.id for e in memory.experts()] == [0]
    memory.close()


def test_a_student_is_published_as_a_new_version_of_the_newest_ensemble_only(registry):
    first = registry.start_ensemble(3, 10)
    registry.publish_ensemble(first, "cd" * 32, 100, [], b"{}", b"sig")
    signed_ids = []

    def sign(version):
        signed_ids.append(version)
        return b'{"v": %d}' % version, b"sig"

    student = registry.publish_student(first, "ef" * 32, 50, sign)
    latest = registry.latest_published()
    assert latest.id == student == signed_ids[0] > first
    assert (latest.manifest_json, latest.router_sha256, latest.experts) == (b'{"v": %d}' % student, "cd" * 32, 3)
    artifact = registry.artifact("ef" * 32)
    assert (artifact.kind, artifact.size, artifact.published) == ("student", 50, True)
    # Distilled from a version that is no longer the newest: refused, nothing written.
    with pytest.raises(RegistryError, match=f"ensemble {student} was published while distilling ensemble {first}"):
        registry.publish_student(first, "aa" * 32, 50, sign)
    # An assembly under way will publish newer experts: refused too.
    running = registry.start_ensemble(3, 10)
    with pytest.raises(RegistryError, match=f"ensemble {running} is being assembled") as err:
        registry.publish_student(student, "aa" * 32, 50, sign)
    assert err.value.code == "failed_precondition"
    assert registry.artifact("aa" * 32) is None and signed_ids == [student]
    assert registry.latest_published().id == student


def test_a_stale_upload_of_an_expired_lease_leaves_the_experts_new_holder_alone(registry):
    """Island A's lease expires with an upload open; island B takes the expert and uploads it.
    When A's upload reaches the staleness limit it must not push B's expert back to training,
    and B's upload must still complete: expiring a lease closes its uploads at once, and a
    stale upload resets only what its own island holds."""
    clock = registry.clock
    a, _ = enroll(registry, "a")
    b, _ = enroll(registry, "b")
    held_by_a = registry.acquire_lease(a.id)
    stale, _ = registry.begin_upload(a.id, held_by_a.lease_id, 1000, "cd" * 32, quota=1000)
    registry.commit_chunk(a.id, stale, 0, 500)

    clock.advance(61)
    assert registry.expire_leases() == 1
    assert registry.upload_for(a.id, stale.id).state != "open"  # closed with its lease
    assert stale.id not in registry.open_upload_ids()

    clock.advance(3000)
    held_by_b = registry.acquire_lease(b.id)
    assert held_by_b.expert_id == 0
    upload, _ = registry.begin_upload(b.id, held_by_b.lease_id, 800, "ef" * 32, quota=1000)
    registry.commit_chunk(b.id, upload, 0, 800)
    assert registry.expert(0).state == "uploaded"

    clock.advance(601)  # A's upload has now been silent for over an hour, B's for ten minutes
    assert registry.abandon_stale_uploads(3600) == []
    assert registry.expert(0).state == "uploaded"
    registry.mark_verified(b.id, upload)
    registry.register_expert(b.id, upload, 800, 3, b"{}", b"sig")
    assert (registry.expert(0).state, registry.expert(0).island_id) == ("signed", b.id)


def test_a_stale_upload_resets_only_its_own_islands_expert(registry):
    """Even an upload left open by some other path resets the expert only while its own island holds it."""
    clock = registry.clock
    a, _ = enroll(registry, "a")
    grant = registry.acquire_lease(a.id)
    upload, _ = registry.begin_upload(a.id, grant.lease_id, 1000, "cd" * 32, quota=1000)
    registry.commit_chunk(a.id, upload, 0, 1000)
    clock.advance(3601)
    assert registry.abandon_stale_uploads(3600) == [upload.id]
    assert registry.expert(0).state == "training"  # its own island may begin a new upload
    kinds = [e.kind for e in registry.events()]
    assert kinds[-1] == "upload_abandoned"


def test_a_stale_upload_left_open_by_an_older_registry_resets_only_its_own_islands_expert(registry):
    """A registry written before leases closed their uploads may hold an open upload of an island
    whose lease ended; once another island holds the expert, that upload going stale must not
    send the expert back to training under its new holder."""
    clock = registry.clock
    a, _ = enroll(registry, "a")
    b, _ = enroll(registry, "b")
    stale, _ = registry.begin_upload(a.id, registry.acquire_lease(a.id).lease_id, 1000, "cd" * 32, quota=1000)
    clock.advance(61)
    registry.expire_leases()
    with registry.transaction() as s:  # as an older version left it: still open after its lease ended
        from coordinator.registry import Upload

        s.get(Upload, stale.id).state = "open"
    clock.advance(3000)
    grant = registry.acquire_lease(b.id)
    upload, _ = registry.begin_upload(b.id, grant.lease_id, 800, "ef" * 32, quota=1000)
    registry.commit_chunk(b.id, upload, 0, 800)
    clock.advance(601)
    assert registry.abandon_stale_uploads(3600) == [stale.id]
    assert registry.expert(0).state == "uploaded"  # B's upload goes on
    registry.mark_verified(b.id, upload)
    registry.register_expert(b.id, upload, 800, 3, b"{}", b"sig")
    assert (registry.expert(0).state, registry.expert(0).island_id) == ("signed", b.id)
