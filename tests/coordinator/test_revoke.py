"""Island identity: revocation ends access at once, --exclude republishes without the island,
every state change lands in the event log, and credentials exist only as hashes.

A real coordinator on loopback (in this process) driven by the real client code; `ddm-coordinator
revoke` runs as a real subprocess against it, writing the same SQLite registry.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from client.connection import ClientError, Connection
from client.transfer import upload_checkpoint
from coordinator.clock import ManualClock
from coordinator.registry import Registry, RegistryError, Revoked
from coordinator.status import build_status
from protocol import ddm_pb2 as pb
from protocol.limits import MAX_CHUNK_BYTES, MiB
from protocol.trust import verify_signature

from .test_service import enroll, lease_for, refused, train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def revoke_cli(server, *args) -> subprocess.CompletedProcess:
    """`ddm-coordinator revoke` as its own process, beside the running server."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "revoke", "--home", str(server.home.root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def revoked(err, reason: str) -> None:
    refused(err, grpc.StatusCode.PERMISSION_DENIED, f"revoked by the coordinator ({reason})")


def test_a_revoked_island_is_refused_at_its_next_call_and_its_expert_reopens(server):
    conn, enrolled = enroll(server)
    other, _ = enroll(server)
    lease = lease_for(conn)
    conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=1, loss=0.5))
    done = server.registry.revoke(enrolled.island_id, "lost\nlaptop")  # whitespace folds to one line
    assert done.leases == [(lease.lease_id, lease.expert_id)] and done.uploads == []
    calls = [
        lambda: conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=2)),
        lambda: conn.unary("AcquireLease", pb.AcquireLeaseRequest()),
        lambda: conn.unary("Status", pb.StatusRequest()),
        lambda: list(conn.stream_out("Download", pb.DownloadRequest(sha256=lease.shard.sha256), timeout=10)),
    ]
    for call in calls:
        with pytest.raises(ClientError) as err:
            call()
        revoked(err, "lost laptop")
    # The secret still has to be right: a wrong one learns nothing about the island.
    forged = Connection(server.address, enrolled.island_id + ".wrong", attempts=1)
    with pytest.raises(ClientError) as err:
        forged.unary("AcquireLease", pb.AcquireLeaseRequest())
    refused(err, grpc.StatusCode.UNAUTHENTICATED, "invalid credential")
    assert server.registry.lease(lease.lease_id).state == "revoked"
    assert server.registry.expert(lease.expert_id).state == "open"
    assert lease_for(other).expert_id == lease.expert_id
    with pytest.raises(RegistryError, match="already revoked") as again:
        server.registry.revoke(enrolled.island_id, "twice")
    assert again.value.code == "failed_precondition"
    with pytest.raises(RegistryError, match="no island 'nobody'") as unknown:
        server.registry.revoke("nobody", "")
    assert unknown.value.code == "not_found"
    mine = [(e.kind, e.expert_id) for e in server.registry.events(island_id=enrolled.island_id)]
    assert mine[-2:] == [("revoked", None), ("lease_revoked", lease.expert_id)]
    island = next(i for i in build_status(server.home, server.config, server.registry, "")["islands"] if i["revoked"])
    assert island["id"] == enrolled.island_id and island["revoked_reason"] == "lost laptop"


def test_revocation_cuts_an_open_upload_stream_and_deletes_its_bytes(server):
    conn, enrolled = enroll(server)
    lease = lease_for(conn)
    data = os.urandom(MiB + 100_000)  # two chunks, under the tiny expert's quota
    digest = hashlib.sha256(data).hexdigest()
    upload = conn.unary("BeginUpload", pb.BeginUploadRequest(lease_id=lease.lease_id, size=len(data), sha256=digest))
    staged = server.store.staging_path(upload.upload_id)

    def committed() -> int:
        return server.registry.upload_for(enrolled.island_id, upload.upload_id).committed_offset

    def chunk(offset, piece):
        return pb.UploadChunk(
            upload_id=upload.upload_id, offset=offset, data=piece, sha256=hashlib.sha256(piece).hexdigest()
        )

    def stream():
        yield chunk(0, data[:MiB])
        deadline = time.monotonic() + 30
        while committed() != MiB and time.monotonic() < deadline:
            time.sleep(0.02)
        done = server.registry.revoke(enrolled.island_id, "bad actor")  # what `revoke` does, mid-stream
        assert done.uploads == [upload.upload_id]
        for upload_id in done.uploads:
            server.store.discard_staged(upload_id)
        yield chunk(MiB, data[MiB:])

    with pytest.raises(ClientError) as err:
        conn.stream_in("UploadChunks", stream(), timeout=60)
    revoked(err, "bad actor")
    assert not staged.exists()
    row = server.registry.upload_for(enrolled.island_id, upload.upload_id)
    assert (row.state, row.committed_offset) == ("rejected", MiB)
    assert server.registry.expert(lease.expert_id).state == "open"


def test_revocation_cuts_an_open_download_stream(server, monkeypatch):
    reader, enrolled = enroll(server, role="reader")
    blob = server.home.root / "blob"
    blob.write_bytes(os.urandom(6 * MAX_CHUNK_BYTES))
    sha, size = server.store.add_file(blob, move=True)
    server.registry.add_artifact(sha, "router", size)
    with server.registry.transaction() as s:  # as if a published ensemble named it
        from coordinator.registry import Artifact

        s.get(Artifact, sha).published = True
    # The server streams ahead of what the reader has taken (gRPC's flow-control window holds
    # several chunks): it reads the second chunk only once the revocation is committed, or it
    # could send every chunk before the revocation lands and the stream would end whole.
    revocation_done = threading.Event()
    read = server.store.read

    def read_the_rest_after_the_revocation(*args):
        blocks = read(*args)
        yield next(blocks)
        assert revocation_done.wait(30), "the reader never revoked"
        yield from blocks

    monkeypatch.setattr(server.store, "read", read_the_rest_after_the_revocation)
    received = 0
    with pytest.raises(ClientError) as err:
        for piece in reader.stream_out("Download", pb.DownloadRequest(sha256=sha), timeout=60):
            if received == 0:
                server.registry.revoke(enrolled.island_id, "leaked key")
                revocation_done.set()
            received += len(piece.data)
    revoked(err, "leaked key")
    assert 0 < received < size


def sign_all(server, tmp_path) -> dict[int, str]:
    """Islands X (one expert) and Y (two) sign all three; returns expert id -> island id."""
    x, x_enrolled = enroll(server)
    y, y_enrolled = enroll(server)
    holders = {}
    for conn, enrolled in ((x, x_enrolled), (y, y_enrolled), (y, y_enrolled)):
        lease = lease_for(conn)
        upload_checkpoint(conn, lease.lease_id, train(conn, lease, tmp_path))
        holders[lease.expert_id] = enrolled.island_id
    return holders


def wait_published(server, timeout=60.0):
    server.assembler.join(timeout)  # the last signature (or revoke's republish) started it
    published = server.registry.latest_published()
    assert published is not None, "no ensemble was published"
    return published


@pytest.mark.slow  # trains three experts and assembles the ensemble twice
def test_exclude_republishes_the_ensemble_without_the_island(server, tmp_path):
    holders = sign_all(server, tmp_path)
    first = wait_published(server)
    manifest = json.loads(first.manifest_json)
    assert first.experts == 3
    x = holders[0]
    (x_sha,) = [i["entry"]["sha256"] for i in manifest["experts"] if i["entry"]["island_id"] == x]
    reader, enrolled = enroll(server, role="reader")
    assert list(reader.stream_out("Download", pb.DownloadRequest(sha256=x_sha), timeout=30))

    result = revoke_cli(server, x, "--reason", "poisoned data", "--exclude")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"revoked island {x} (poisoned data)" in out
    assert "experts reopened: 0" in out and f"ensembles withdrawn: {first.id}" in out
    second = server.registry.latest_published()
    assert f"published ensemble {second.id} over the 2 remaining signed experts" in out

    signed = reader.unary("GetManifest", pb.GetManifestRequest())
    verify_signature(enrolled.coordinator_public_key, signed.manifest_json, signed.signature, "manifest")
    republished = json.loads(signed.manifest_json)
    assert republished["ensemble_id"] == second.id != first.id
    assert republished["router"]["clusters"] == [1, 2]
    assert [i["entry"]["island_id"] for i in republished["experts"]] == [holders[1], holders[2]]
    assert x_sha not in signed.manifest_json.decode()
    with pytest.raises(ClientError) as err:
        list(reader.stream_out("Download", pb.DownloadRequest(sha256=x_sha), timeout=30))
    refused(err, grpc.StatusCode.PERMISSION_DENIED, "neither published")
    for item in republished["experts"]:  # the others stay downloadable
        sha = item["entry"]["sha256"]
        data = b"".join(c.data for c in reader.stream_out("Download", pb.DownloadRequest(sha256=sha), timeout=30))
        assert hashlib.sha256(data).hexdigest() == sha
    states = {e["id"]: e["state"] for e in server.registry.snapshot()["ensembles"]}
    assert states[first.id] == "withdrawn" and states[second.id] == "published"
    expert = server.registry.expert(0)
    assert (expert.state, expert.checkpoint_sha256, expert.entry_json, expert.island_id) == ("open", None, None, None)
    newcomer, _ = enroll(server)
    assert lease_for(newcomer).expert_id == 0  # open for another island to retrain

    # Excluding Y too leaves no two signed experts: the revocation stands, nothing is published.
    result = revoke_cli(server, holders[1], "--exclude")
    assert result.returncode == 0, result.stderr
    assert "not republished: 0 signed expert(s) remain" in result.stdout
    assert server.registry.latest_published() is None
    with pytest.raises(ClientError) as err:
        reader.unary("GetManifest", pb.GetManifestRequest())
    refused(err, grpc.StatusCode.NOT_FOUND)
    kinds = [e.kind for e in server.registry.events()]
    for kind in ("revoked", "expert_excluded", "withdrawn", "unpublished", "assemble", "published"):
        assert kind in kinds


# -- the registry alone --------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'ddm.db'}", lease_seconds=60, clock=ManualClock())
    reg.create()
    reg.add_experts([(0, "ab" * 32, "f0"), (1, "ab" * 32, "f1")])
    yield reg
    reg.close()


def sign(registry, island_id: str, sha: str):
    grant = registry.acquire_lease(island_id)
    upload, _ = registry.begin_upload(island_id, grant.lease_id, 10, sha, quota=100)
    registry.commit_chunk(island_id, upload, 0, 10)
    registry.mark_verified(island_id, upload)
    registry.register_expert(island_id, upload, 10, 5, b"{}", b"sig")
    return grant


def test_an_assembly_in_progress_is_stopped_by_an_exclusion(registry):
    a, _ = registry.redeem_invite(registry.create_invite("island", 60), "a")
    b, _ = registry.redeem_invite(registry.create_invite("island", 60), "b")
    sign(registry, a.id, "a1" * 32)
    sign(registry, b.id, "b1" * 32)
    ensemble = registry.start_ensemble(2, 10)
    done = registry.revoke(a.id, "", exclude=True)
    assert done.experts == [0] and done.stopped == [ensemble] and done.reason == "no reason given"
    with pytest.raises(RegistryError, match="was stopped"):
        registry.ensemble_progress(ensemble, 5)  # the router training ends at its next report
    with pytest.raises(RegistryError, match="was stopped"):
        registry.publish_ensemble(ensemble, "cc" * 32, 1, ["a1" * 32, "b1" * 32], b"{}", b"sig")
    registry.fail_ensemble(ensemble, "the assembler's own failure")  # no-op: the reason stays
    row = next(e for e in registry.snapshot()["ensembles"] if e["id"] == ensemble)
    assert row["state"] == "failed" and "excluded" in row["reason"]
    # An assembly that read the signed experts before the exclusion cannot publish it either.
    late = registry.start_ensemble(2, 10)
    with pytest.raises(RegistryError, match="excluded while the router trained"):
        registry.publish_ensemble(late, "cc" * 32, 1, ["a1" * 32, "b1" * 32], b"{}", b"sig")
    with pytest.raises(Revoked):
        registry.acquire_lease(a.id)


def _shape(registry) -> dict:
    """The registry's state, without progress (steps, deadlines, offsets, traffic, timestamps)."""
    snap = registry.snapshot()
    keep = {
        "islands": ("id", "role", "revoked_at"),
        "invites": ("token_hash", "used_at"),
        "experts": ("id", "state", "island_id", "checkpoint_sha256"),
        "leases": ("id", "state"),
        "uploads": ("id", "state"),
        "artifacts": ("sha256", "published"),
        "ensembles": ("id", "state"),
    }
    return {table: sorted(tuple(row[c] for c in cols) for row in snap[table]) for table, cols in keep.items()}


def test_every_state_change_writes_an_event(registry):
    """Drive every registry operation; whenever the state changed, an event was appended."""
    r = registry
    steps = []

    def step(name, call):
        before, count = _shape(r), len(r.events())
        result = call()
        after, events = _shape(r), r.events()
        if after != before:
            assert len(events) > count, f"{name} changed the registry without an event"
        steps.append((name, [e.kind for e in events[count:]]))
        return result

    token = step("invite", lambda: r.create_invite("island", 60))
    a, _ = step("enroll", lambda: r.redeem_invite(token, "a"))
    b, _ = step("enroll b", lambda: r.redeem_invite(r.create_invite("island", 60), "b"))
    step("artifact", lambda: r.add_artifact("dd" * 32, "shard", 3))
    grant = step("lease", lambda: r.acquire_lease(a.id))
    step("renew", lambda: r.acquire_lease(a.id))
    step("heartbeat at step 0", lambda: r.heartbeat(a.id, grant.lease_id, 0, 1.0, 1.0))
    step("heartbeat training", lambda: r.heartbeat(a.id, grant.lease_id, 3, 1.0, 1.0))
    first, _ = step("begin", lambda: r.begin_upload(a.id, grant.lease_id, 10, "a1" * 32, quota=100))
    step("chunk", lambda: r.commit_chunk(a.id, first, 0, 4))
    step("resume", lambda: r.begin_upload(a.id, grant.lease_id, 10, "a1" * 32, quota=100))
    upload, _ = step("supersede", lambda: r.begin_upload(a.id, grant.lease_id, 10, "a2" * 32, quota=100))
    step("last chunk", lambda: r.commit_chunk(a.id, upload, 0, 10))
    step("verified", lambda: r.mark_verified(a.id, upload))
    step("signed", lambda: r.register_expert(a.id, upload, 10, 5, b"{}", b"sig"))
    other = step("lease b", lambda: r.acquire_lease(b.id))
    step("release", lambda: r.release_lease(b.id, other.lease_id, "done"))
    other = step("lease b again", lambda: r.acquire_lease(b.id))
    rejected, _ = step("begin b", lambda: r.begin_upload(b.id, other.lease_id, 10, "b1" * 32, quota=100))
    step("reject", lambda: r.reject_upload(rejected.id, "bad"))
    r.lease_seconds = 0.0
    step("renew to expire", lambda: r.acquire_lease(b.id))
    r.clock.advance(0.01)
    step("expire", lambda: r.expire_leases())
    r.lease_seconds = 60
    sign(r, b.id, "b2" * 32)
    failed = step("assemble", lambda: r.start_ensemble(2, 10))
    step("progress", lambda: r.ensemble_progress(failed, 3))
    step("fail", lambda: r.fail_ensemble(failed, "oops"))
    ok = step("assemble again", lambda: r.start_ensemble(2, 10))
    manifest = json.dumps({"experts": [{"entry": {"sha256": s}} for s in ("a2" * 32, "b2" * 32)]}).encode()
    step("publish", lambda: r.publish_ensemble(ok, "cc" * 32, 1, ["a2" * 32, "b2" * 32], manifest, b"sig"))
    with_student = json.dumps({**json.loads(manifest), "student": {"sha256": "ee" * 32}}).encode()
    step("distilled", lambda: r.publish_student(ok, "ee" * 32, 1, lambda version: (with_student, b"sig")))
    third = step("lease after", lambda: r.acquire_lease(r.redeem_invite(r.create_invite("island", 60), "c")[0].id))
    assert not hasattr(third, "lease_id")  # no work left: nothing changed
    step("revoke with exclude", lambda: r.revoke(a.id, "why", exclude=True))
    kinds = dict(steps)
    assert kinds["heartbeat training"] == ["training"] and kinds["heartbeat at step 0"] == []
    assert kinds["supersede"] == ["upload_superseded", "upload_begin"]
    assert kinds["resume"] == ["upload_resumed"] and kinds["chunk"] == [] and kinds["progress"] == []
    assert kinds["expire"] == ["lease_expired"]
    assert kinds["distilled"] == ["distilled"]
    # The withdrawn ensemble's files, its student among them, are published no more.
    assert not any(a["published"] for a in r.snapshot()["artifacts"])
    withdrawn = ["withdrawn"] * 2  # the ensemble and its version with the student
    assert kinds["revoke with exclude"] == ["revoked", "expert_excluded", *withdrawn, *["unpublished"] * 4]


# -- credentials exist only as hashes ------------------------------------------------------------


def test_credentials_and_tokens_never_reach_the_disk_or_status(server):
    token = server.registry.create_invite("island", 60)
    unused = server.registry.create_invite("reader", 60)
    reply = Connection(server.address).unary("Enroll", pb.EnrollRequest(token=token, name="isle"))
    secret = reply.credential.split(".", 1)[1]
    conn = Connection(server.address, reply.credential, attempts=1)
    conn.unary("AcquireLease", pb.AcquireLeaseRequest())
    over_rpc = conn.unary("Status", pb.StatusRequest()).json
    server.auth.flush()
    files = [p for p in server.home.root.iterdir() if p.name.startswith("ddm.db")]
    assert {p.name for p in files} >= {"ddm.db", "ddm.db-wal"}
    raw = b"".join(p.read_bytes() for p in files)
    report = json.dumps(build_status(server.home, server.config, server.registry, "", events=1000))
    for text in (raw.decode("latin-1"), report, over_rpc):
        for needle in (secret, token, unused, reply.credential):
            assert needle not in text
        for needle in (token[4:], unused[4:]):  # nor the token body without its prefix
            assert needle not in text
    assert server.registry.authenticate(reply.island_id, secret).id == reply.island_id  # it is stored, hashed
