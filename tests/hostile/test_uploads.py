"""Attacks on the upload path with real leases: replayed and out-of-order chunks, an island
uploading for another island's lease, and declared sizes and offsets far outside any file."""

from __future__ import annotations

import hashlib
import os

from grpc import StatusCode as S

from protocol import ddm_pb2 as pb
from protocol.bounds import BOUNDS
from protocol.limits import MiB

from .conftest import OPEN_UPLOAD_BYTES, chunk, enroll, open_upload
from .harness import assert_unchanged, check, diff, file_digest, registry_state, tree


def behind(committed: int) -> dict:
    return {S.FAILED_PRECONDITION: f"the committed offset is {committed}"}


def test_replayed_chunks_change_nothing(server):
    me = enroll(server, lease=True)
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(me, data)
    first = chunk(upload.upload_id, 0, data[:MiB])
    assert me.ok("UploadChunks", [first]).committed_offset == MiB
    staged = server.store.staging_path(upload.upload_id)
    digest = file_digest(staged)
    before = registry_state(server)

    check(me.call("UploadChunks", [first]), behind(MiB), "the first chunk again")
    check(me.call("UploadChunks", [first, first]), behind(MiB), "the first chunk twice in one stream")
    forged = chunk(upload.upload_id, 0, os.urandom(MiB))  # same offset, other bytes: an overwrite
    check(me.call("UploadChunks", [forged]), behind(MiB), "other bytes at a committed offset")
    assert_unchanged(server, before, "replays")
    assert file_digest(staged) == digest, "a replay touched the staged bytes"

    last = chunk(upload.upload_id, MiB, data[MiB:])
    assert me.ok("UploadChunks", [last]).committed_offset == len(data)
    before = registry_state(server)
    check(me.call("UploadChunks", [last]), behind(len(data)), "the last chunk again")
    check(me.call("UploadChunks", [first]), behind(len(data)), "the first chunk after the last")
    assert_unchanged(server, before, "replays after the last chunk")
    assert staged.read_bytes() == data


def test_a_replay_inside_one_stream_keeps_what_came_before(server):
    me = enroll(server, lease=True)
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(me, data)
    first = chunk(upload.upload_id, 0, data[:MiB])
    check(me.call("UploadChunks", [first, first]), behind(MiB), "a stream that repeats its first chunk")
    state = me.ok("QueryUpload", pb.QueryUploadRequest(upload_id=upload.upload_id))
    assert state.committed_offset == MiB
    assert server.store.staging_path(upload.upload_id).read_bytes()[:MiB] == data[:MiB]


def test_out_of_order_chunks_change_nothing(server):
    me = enroll(server, lease=True)
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(me, data)
    uid, staged = upload.upload_id, server.store.staging_path(upload.upload_id)
    before = registry_state(server)
    check(me.call("UploadChunks", [chunk(uid, MiB, data[MiB:])]), behind(0), "the last chunk first")
    check(me.call("UploadChunks", [chunk(uid, 1, data[1 : MiB + 1])]), behind(0), "one byte ahead")
    assert_unchanged(server, before, "chunks ahead")
    assert not staged.exists(), "a refused chunk was written"

    assert me.ok("UploadChunks", [chunk(uid, 0, data[:MiB])]).committed_offset == MiB
    digest = file_digest(staged)
    before = registry_state(server)
    check(me.call("UploadChunks", [chunk(uid, MiB - 4096, data[MiB - 4096 :])]), behind(MiB), "overlapping behind")
    check(me.call("UploadChunks", [chunk(uid, MiB + 1, data[MiB + 1 :])]), behind(MiB), "one byte ahead")
    check(me.call("UploadChunks", [chunk(uid, len(data), b"x")]), behind(MiB), "past the end")
    out = me.call("UploadChunks", [chunk(uid, -1, data[:MiB])])
    check(out, {**behind(MiB), S.INVALID_ARGUMENT: None}, "a negative offset")
    assert_unchanged(server, before, "chunks out of order")
    assert file_digest(staged) == digest, "a refused chunk touched the staged bytes"

    assert me.ok("UploadChunks", [chunk(uid, MiB, data[MiB:])]).committed_offset == len(data)
    assert staged.read_bytes() == data, "the file is not the one sent in order"


def test_an_island_cannot_touch_another_islands_lease_or_upload(server, victim):
    attacker = enroll(server, lease=True, name="attacker")
    no_lease = enroll(server, name="attacker-without-lease")
    reader = enroll(server, role="reader", name="reader")
    lease_id, upload_id = victim.lease.lease_id, victim.extra["upload"].upload_id
    data = victim.extra["data"]
    staged = server.store.staging_path(upload_id)
    digest = file_digest(staged)
    # A chunk the victim itself would send next: valid in every way but its sender.
    honest_next = chunk(upload_id, MiB, data[MiB:])
    attacks = [
        ("BeginUpload", pb.BeginUploadRequest(lease_id=lease_id, size=len(data), sha256="ab" * 32), "not held"),
        ("UploadChunks", [honest_next], "no upload"),
        ("UploadChunks", [chunk(upload_id, MiB, os.urandom(len(data) - MiB))], "no upload"),
        ("QueryUpload", pb.QueryUploadRequest(upload_id=upload_id), "no upload"),
        ("CompleteUpload", pb.CompleteUploadRequest(upload_id=upload_id), "no upload"),
        ("Heartbeat", pb.HeartbeatRequest(lease_id=lease_id, step=1), "not held"),
        ("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id, reason="mine now"), "not held"),
    ]
    before = registry_state(server)
    for island in (attacker, no_lease, reader):
        for method, request, word in attacks:
            code = S.PERMISSION_DENIED if word == "not held" else S.NOT_FOUND
            allowed = {S.PERMISSION_DENIED: "reader"} if island is reader else {code: word}
            out = island.call(method, request)
            check(out, allowed, f"island {island.id}: {method} on the victim's")
            assert str(MiB) not in out.details, f"{method} told a stranger the victim's committed offset"
    assert_unchanged(server, before, "attacks on another island's upload")
    assert file_digest(staged) == digest, "an attacker changed the victim's staged bytes"

    # A stream that starts on the attacker's own upload and switches to the victim's.
    mine = os.urandom(OPEN_UPLOAD_BYTES)
    own = open_upload(attacker, mine)
    before = registry_state(server)
    out = attacker.call("UploadChunks", [chunk(own.upload_id, 0, mine[:MiB]), honest_next])
    check(out, {S.NOT_FOUND: "no upload"}, "a stream that switches to the victim's upload")
    changes = diff(before, registry_state(server))
    mine_only = {
        ("uploads", own.upload_id),
        ("experts", attacker.lease.expert_id),
        ("islands", attacker.id),
        ("leases", attacker.lease.lease_id),
    }
    assert {(c[0], c[1]) for c in changes} <= mine_only, changes
    assert file_digest(staged) == digest

    # Once the victim has sent every byte, completing its upload is still the victim's alone.
    assert victim.ok("UploadChunks", [honest_next]).committed_offset == len(data)
    before = registry_state(server)
    for island in (attacker, no_lease):
        out = island.call("CompleteUpload", pb.CompleteUploadRequest(upload_id=upload_id))
        check(out, {S.NOT_FOUND: "no upload"}, "completing the victim's finished upload")
    assert_unchanged(server, before, "completing another island's upload")
    assert server.registry.expert(victim.lease.expert_id).state == "uploaded"


def test_huge_declared_sizes_and_offsets_are_refused_before_any_byte(server):
    me = enroll(server, lease=True)
    quota = server.config.max_upload_bytes
    lease_id, sha = me.lease.lease_id, "ab" * 32
    staging = tree(server.store.staging)
    before = registry_state(server)
    over = {S.RESOURCE_EXHAUSTED: "quota", S.INVALID_ARGUMENT: None}
    for size, allowed in [
        (2**62, over),
        (2**63 - 1, over),
        (quota + 1, {S.RESOURCE_EXHAUSTED: "quota"}),
        (0, {S.INVALID_ARGUMENT: "positive"}),
        (-1, {S.INVALID_ARGUMENT: "must be"}),
        (-(2**63), {S.INVALID_ARGUMENT: "must be"}),
    ]:
        out = me.call("BeginUpload", pb.BeginUploadRequest(lease_id=lease_id, size=size, sha256=sha))
        check(out, allowed, f"BeginUpload(size={size})")
    assert_unchanged(server, before, "huge declared sizes")

    # An honest declaration, then chunks that claim offsets far past it or more bytes than declared.
    small = os.urandom(1000)
    upload = open_upload(me, small)
    before = registry_state(server)
    for offset in (2**62, 2**63 - 1, -(2**63)):
        out = me.call("UploadChunks", [chunk(upload.upload_id, offset, small)])
        check(out, {S.FAILED_PRECONDITION: "committed offset", S.INVALID_ARGUMENT: None}, f"chunk at {offset}")
    out = me.call("UploadChunks", [chunk(upload.upload_id, 0, os.urandom(4 * MiB))])
    check(out, {S.INVALID_ARGUMENT: "past the declared size"}, "a chunk longer than the declared file")
    assert_unchanged(server, before, "chunks at huge offsets")
    assert tree(server.store.staging) == staging, "a refused chunk reached the staging area"

    shard, size = me.lease.shard.sha256, me.lease.shard.size
    for offset in (size + 1, 2**62, 2**63 - 1, -1, -(2**63)):
        beyond_bound = not 0 <= offset <= BOUNDS["DownloadRequest"]["offset"].max
        allowed = {S.OUT_OF_RANGE: "outside", **({S.INVALID_ARGUMENT: "must be"} if beyond_bound else {})}
        check(me.call("Download", pb.DownloadRequest(sha256=shard, offset=offset)), allowed, f"Download at {offset}")
    tail = me.ok("Download", pb.DownloadRequest(sha256=shard, offset=size))
    assert b"".join(c.data for c in tail) == b""
    whole = b"".join(c.data for c in me.ok("Download", pb.DownloadRequest(sha256=shard)))
    assert hashlib.sha256(whole).hexdigest() == shard
    assert_unchanged(server, before, "downloads at huge offsets")
