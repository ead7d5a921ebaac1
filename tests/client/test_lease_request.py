"""What an island tells a real coordinator when it asks for a lease with its own copy of the
dataset: that it has one, and nothing of where that copy lies on its disk."""

import numpy as np
import pytest

import client.island
from client.island import JoinOptions, run_island
from client.tls import TlsSettings
from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from coordinator.service import CoordinatorService
from protocol import ddm_pb2 as pb


class Trained(Exception):
    """Raised where the island would start training: the test has seen what it needs by then."""


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinator") / "home"
    init_home(InitOptions(home=root, experts=2, preset="tiny", steps=5, router_preset="tiny", router_steps=5))
    return root


def test_a_dataset_path_stays_on_the_island(home, digits, tmp_path, monkeypatch):
    received = []  # every AcquireLeaseRequest, as the coordinator's service received it
    acquire = CoordinatorService.AcquireLease

    def recording(self, request, context):
        received.append(pb.AcquireLeaseRequest.FromString(request.SerializeToString()))
        return acquire(self, request, context)

    monkeypatch.setattr(CoordinatorService, "AcquireLease", recording)  # before the server binds its handlers

    def trained(heartbeat, lease, state, data, opts, autoencoder=None):
        raise Trained(lease, data)

    monkeypatch.setattr(client.island, "train_lease", trained)

    # The island's copy of the coordinator's dataset, at a path that says something about its owner.
    copy = tmp_path / "hospital-alice" / "ward-7" / "alice-scans.npz"
    copy.parent.mkdir(parents=True)
    np.savez(copy, images=digits.images.numpy(), labels=digits.labels.numpy(), ids=digits.ids.numpy())

    server = CoordinatorServer(Home(home), "127.0.0.1:0")
    server.start()
    try:
        options = JoinOptions(
            coordinator=f"127.0.0.1:{server.port}",
            state_dir=tmp_path / "island",
            token=server.registry.create_invite("island", 60),
            once=True,
            dataset=str(copy),
            tls=TlsSettings(insecure=True),
        )
        with pytest.raises(Trained) as reached:
            run_island(options)
    finally:
        server.stop(grace=0)

    [request] = received
    sent = request.local_dataset
    assert sent, "the island must still say that it holds its own copy"
    for secret in (str(copy), str(copy.parent), "hospital-alice", "ward-7", "alice-scans", "/"):
        assert secret not in sent, f"the coordinator received {sent!r}"
    # The coordinator's yes/no still works: it sent an index list, and the island cut its cluster
    # from its own copy and checked it against the coordinator's fingerprint.
    lease, data = reached.value.args
    assert lease.WhichOneof("data") == "index_list"
    assert data.fingerprint() == lease.shard_fingerprint and len(data) == len(lease.index_list.ids)
