"""A real coordinator for the hostile-input suite: an in-process CoordinatorServer on a
loopback port, one per test module, and islands enrolled in it through the real protocol."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from coordinator.auth import RateLimiter
from coordinator.bootstrap import InitOptions, init_home
from coordinator.clock import ManualClock
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from protocol import ddm_pb2 as pb
from protocol.limits import MiB

from .harness import Island, Wire

# Enough experts that every test of a module can hold a lease of its own.
EXPERTS = 10
# An upload the tests keep open: two chunks long, under a tiny expert's quota.
OPEN_UPLOAD_BYTES = MiB + 51_000


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-template") / "home"
    init_home(
        InitOptions(
            home=root,
            experts=EXPERTS,
            preset="tiny",
            steps=3,
            router_preset="tiny",
            router_steps=5,
            lease_seconds=3600,  # no lease expires while a module runs, however slow the machine
        )
    )
    # One island sends dozens of bad checkpoints for one expert here; the per-expert byte quota
    # (tested in tests/coordinator/test_limits.py) would refuse them before they are looked at.
    config = Home(root).load_config()
    config.max_expert_upload_bytes = 1 << 30
    Home(root).save_config(config)
    return root


@pytest.fixture(scope="module")
def server(template, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    shutil.copytree(template, home)
    srv = CoordinatorServer(Home(home), "127.0.0.1:0", clock=ManualClock())
    # Every anonymous Enroll here comes from 127.0.0.1, and many are refused on purpose; the
    # per-address limit on failed enrollments (tested in tests/coordinator/test_limits.py) would
    # soon answer all of them alike. This suite is about what each field does, so it gets room.
    srv.auth.enroll_failures = RateLimiter(per_second=1000.0, burst=10_000)
    srv.auth.calls = RateLimiter(per_second=10_000.0, burst=100_000)  # the same for calls per island
    srv.start()
    srv.address = f"127.0.0.1:{srv.port}"
    srv.wires = []
    yield srv
    srv.stop(grace=0)
    for wire in srv.wires:
        wire.close()


def enroll(server, role: str = "island", lease: bool = False, name: str = "hostile") -> Island:
    """A new identity enrolled with a fresh invite; with ``lease``, holding a lease."""
    token = server.registry.create_invite(role, 600)
    anonymous = Wire(server.address)
    reply = anonymous.call("Enroll", pb.EnrollRequest(token=token, name=name))
    anonymous.close()
    assert reply.code.name == "OK", reply.details
    wire = Wire(server.address, reply.reply.credential)
    server.wires.append(wire)
    island = Island(reply.reply.island_id, reply.reply.credential, wire)
    island.extra["token"] = token
    if lease:
        got = island.ok("AcquireLease", pb.AcquireLeaseRequest())
        assert got.WhichOneof("result") == "lease", got
        island.lease = got.lease
    return island


def chunk(upload_id: str, offset: int, data: bytes) -> pb.UploadChunk:
    return pb.UploadChunk(upload_id=upload_id, offset=offset, data=data, sha256=hashlib.sha256(data).hexdigest())


def open_upload(island: Island, data: bytes, commit: int = 0) -> pb.UploadState:
    """Begin an upload of ``data`` on the island's lease and commit its first ``commit`` bytes."""
    state = island.ok(
        "BeginUpload",
        pb.BeginUploadRequest(lease_id=island.lease.lease_id, size=len(data), sha256=hashlib.sha256(data).hexdigest()),
    )
    if commit:
        state = island.ok("UploadChunks", [chunk(state.upload_id, 0, data[:commit])])
    return state


@pytest.fixture(scope="module")
def victim(server) -> Island:
    """Another island, with a lease and an open upload one chunk in: what attackers aim at."""
    island = enroll(server, lease=True, name="victim")
    data = os.urandom(OPEN_UPLOAD_BYTES)
    island.extra["data"] = data
    island.extra["upload"] = open_upload(island, data, commit=MiB)
    return island
