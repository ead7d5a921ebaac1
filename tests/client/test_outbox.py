"""The island's outbox against a real coordinator: an upload the coordinator completed while the
island was stopped, before it saw the signed entry, is settled at the island's next start."""

import base64
import json

import pytest

from client.connection import Connection
from client.island import enroll, tls_for
from client.outbox import settle_outbox, upload_record, write_record
from client.state import IslandState
from client.tls import TlsSettings
from client.transfer import upload_checkpoint
from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from ddm_model.checkpoint import save_checkpoint
from ddm_model.dit import DiTConfig
from ddm_model.probe import untrained_model
from protocol import ddm_pb2 as pb
from protocol.trust import sha256_file, verify_signature

STEPS = 5  # a siloed coordinator has no data to score an expert on: any well-formed one is signed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("outbox") / "home"
    init_home(InitOptions(home=root, mode="siloed", image_size=8, channels=1, experts=2, preset="tiny", steps=STEPS))
    srv = CoordinatorServer(Home(root), "127.0.0.1:0")
    srv.start()
    yield srv
    srv.stop(grace=0)


def island(server, root):
    """A freshly enrolled island's state, identity and connection."""
    address = f"127.0.0.1:{server.port}"
    state = IslandState(root)
    tls = tls_for(state, address, TlsSettings(insecure=True))
    identity = enroll(state, address, server.registry.create_invite("island", 60), "isle", "island", None, tls)
    return state, identity, Connection(address, identity.credential, tls=tls)


def finished_checkpoint(state, lease):
    """What training leaves in the outbox for ``lease``."""
    state.outbox.mkdir(parents=True, exist_ok=True)
    path = state.outbox / f"expert-{lease.expert_id}-0123456789abcdef.safetensors"
    model = untrained_model(DiTConfig.from_dict(json.loads(lease.model_config_json)), init_seed=lease.expert_id)
    save_checkpoint(path, model, cluster_id=lease.cluster_id, steps=STEPS, data_fingerprint="")
    return path


def test_an_upload_completed_while_the_island_was_stopped_is_settled_at_its_next_start(server, tmp_path):
    state, identity, conn = island(server, tmp_path / "island")
    lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
    checkpoint = finished_checkpoint(state, lease)
    digest = sha256_file(checkpoint)
    record = upload_record(checkpoint)
    # What upload_lease does up to the coordinator's reply; the island stops before keeping it.
    upload_checkpoint(
        conn, lease.lease_id, checkpoint, on_begin=lambda upload_id: write_record(record, upload_id, lease.expert_id)
    )
    assert server.registry.expert(lease.expert_id).state == "signed"
    assert record.exists() and not state.signed.exists()

    # Another upload, still open (begun, no byte sent), and a record that cannot be read.
    other = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
    open_checkpoint = finished_checkpoint(state, other)
    size = open_checkpoint.stat().st_size
    begun = conn.unary(
        "BeginUpload",
        pb.BeginUploadRequest(lease_id=other.lease_id, size=size, sha256=sha256_file(open_checkpoint)),
    )
    write_record(upload_record(open_checkpoint), begun.upload_id, other.expert_id)
    garbage = state.outbox / "expert-9-ffffffffffffffff.upload.json"
    garbage.write_text("{not json")

    assert settle_outbox(conn, identity, state) == [lease.expert_id]
    kept = state.signed / f"expert-{lease.expert_id}.safetensors"
    assert sha256_file(kept) == digest and not checkpoint.exists() and not record.exists()
    entry_json = (state.signed / f"expert-{lease.expert_id}.entry.json").read_bytes()
    signature = base64.b64decode((state.signed / f"expert-{lease.expert_id}.sig").read_text())
    verify_signature(identity.public_key, entry_json, signature, "the kept entry")
    assert json.loads(entry_json)["sha256"] == digest
    # The open upload is left for its lease to resume; the unreadable record is dropped.
    assert upload_record(open_checkpoint).exists() and open_checkpoint.exists()
    assert not garbage.exists()
    assert settle_outbox(conn, identity, state) == []  # nothing is settled twice
    conn.close()
