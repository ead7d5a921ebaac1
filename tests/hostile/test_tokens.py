"""Invite tokens and credentials used again: after their one use, after they expire, by many
callers at once, and after the island they enrolled is revoked."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from grpc import StatusCode as S

from protocol import ddm_pb2 as pb
from protocol.limits import MiB

from .conftest import OPEN_UPLOAD_BYTES, chunk, enroll, open_upload
from .harness import OK, REQUEST, Wire, assert_unchanged, check, registry_state


def redeem(server, token: str, name: str = "again"):
    wire = Wire(server.address)
    try:
        return wire.call("Enroll", pb.EnrollRequest(token=token, name=name))
    finally:
        wire.close()


def test_an_invite_enrolls_once(server):
    island = enroll(server)
    token = island.extra["token"]
    before = registry_state(server)
    for name in ("again", "", "../../etc/passwd", "é" * 30):
        check(redeem(server, token, name), {S.UNAUTHENTICATED: "already used"}, f"token reused as {name[:20]!r}")
    assert_unchanged(server, before, "a used token")


def test_an_expired_invite_is_refused_and_stays_unused(server):
    token = server.registry.create_invite("island", 0.05)
    server.clock.advance(0.2)
    before = registry_state(server)
    check(redeem(server, token), {S.UNAUTHENTICATED: "expired"}, "an expired token")
    check(redeem(server, token), {S.UNAUTHENTICATED: "expired"}, "an expired token, again")
    assert_unchanged(server, before, "an expired token")  # in particular, it was not spent


def test_one_invite_redeemed_by_many_at_once_enrolls_one_island(server):
    token = server.registry.create_invite("island", 600)
    before = registry_state(server)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: redeem(server, token, f"racer-{i}"), range(8)))
    winners = [o for o in outcomes if o.code == OK]
    assert len(winners) == 1, [o.code.name for o in outcomes]
    for outcome in outcomes:
        if outcome.code != OK:
            check(outcome, {S.UNAUTHENTICATED: "already used"}, "a racing redemption")
    after = registry_state(server)
    assert set(after["islands"]) - set(before["islands"]) == {winners[0].reply.island_id}


def test_a_revoked_islands_credential_and_invite_are_refused_everywhere(server):
    island = enroll(server, lease=True, name="to-revoke")
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(island, data, commit=MiB)
    server.registry.revoke(island.id, "hostile-input test", exclude=False)
    requests = {
        "AcquireLease": pb.AcquireLeaseRequest(),
        "Heartbeat": pb.HeartbeatRequest(lease_id=island.lease.lease_id, step=1),
        "ReleaseLease": pb.ReleaseLeaseRequest(lease_id=island.lease.lease_id),
        "BeginUpload": pb.BeginUploadRequest(lease_id=island.lease.lease_id, size=len(data), sha256="ab" * 32),
        "UploadChunks": [chunk(upload.upload_id, MiB, data[MiB:])],
        "QueryUpload": pb.QueryUploadRequest(upload_id=upload.upload_id),
        "CompleteUpload": pb.CompleteUploadRequest(upload_id=upload.upload_id),
        "GetManifest": pb.GetManifestRequest(),
        "Download": pb.DownloadRequest(sha256=island.lease.shard.sha256),
        "Status": pb.StatusRequest(),
    }
    assert set(requests) == set(REQUEST) - {"Enroll"}
    before = registry_state(server)
    for method, request in requests.items():
        out = island.call(method, request)
        check(out, {S.UNAUTHENTICATED: None, S.PERMISSION_DENIED: None}, f"{method} by a revoked island")
    check(redeem(server, island.extra["token"]), {S.UNAUTHENTICATED: "already used"}, "a revoked island's invite")
    assert_unchanged(server, before, "calls by a revoked island")
