"""A real coordinator on a PostgreSQL registry, driven by the real client code: enroll, lease,
heartbeat, upload of trained checkpoints, signing, and publication of the signed ensemble.
The registry tests run on both backends (test_registry.py); this is the whole path on the second."""

import json

import pytest

from client.transfer import upload_checkpoint
from coordinator.bootstrap import InitOptions, init_home
from coordinator.clock import ManualClock
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from protocol import ddm_pb2 as pb
from protocol.trust import verify_signature
from tests import postgres
from tests.coordinator.test_service import enroll, lease_for, published_to_a_reader, train

from .conftest import STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def postgres_server(postgres_url, tmp_path):
    home = tmp_path / "home"
    init_home(
        InitOptions(
            home=home,
            experts=3,
            preset="tiny",
            steps=STEPS,
            router_preset="tiny",
            router_steps=5,
            database_url=postgres_url,
        )
    )
    srv = CoordinatorServer(Home(home), "127.0.0.1:0", clock=ManualClock())
    srv.start()
    srv.address = f"127.0.0.1:{srv.port}"
    yield srv
    srv.stop(grace=0)


def test_a_coordinator_on_postgresql_publishes_a_signed_ensemble(postgres_server, postgres_url, tmp_path):
    server = postgres_server
    assert server.registry.engine.dialect.name == "postgresql"
    assert not (server.home.root / "ddm.db").exists()  # no SQLite file beside it
    conn, enrolled = enroll(server)
    for _ in range(3):
        lease = lease_for(conn)
        beat = conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=1, loss=0.5))
        assert beat.deadline_unix_ms > 0
        assert (server.registry.expert(lease.expert_id).state, server.registry.expert(lease.expert_id).step) == (
            "training",
            1,
        )
        reply = upload_checkpoint(conn, lease.lease_id, train(conn, lease, tmp_path)).reply
        verify_signature(enrolled.coordinator_public_key, reply.entry_json, reply.signature, "entry")
        assert json.loads(reply.entry_json)["expert_id"] == lease.expert_id
    _, signed = published_to_a_reader(server, conn)

    # The rows are in PostgreSQL, as a plain client outside the coordinator reads them.
    with postgres.connect(postgres_url) as db:
        experts = db.execute("SELECT id, state, island_id FROM experts ORDER BY id").fetchall()
        assert experts == [(k, "signed", enrolled.island_id) for k in range(3)]
        published = db.execute("SELECT manifest_json FROM ensembles WHERE state = 'published'").fetchall()
        assert [bytes(row[0]) for row in published] == [signed.manifest_json]
        kinds = [row[0] for row in db.execute("SELECT kind FROM events ORDER BY id")]
    joined, expert = ["invite", "enroll"], ["lease", "training", "upload_begin", "uploaded", "verified", "signed"]
    assert kinds[kinds.index("init") :] == ["init", *joined, *expert * 3, "assemble", "published", *joined]
