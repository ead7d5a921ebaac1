"""Limits on a real loopback coordinator: field bounds, rate limits, upload streams at once, the
per-expert byte quota, free disk before an upload, and stale staging cleaned up.

Each refusal ends in its status code and one line, and leaves the registry as it was.
"""

import hashlib
import os
import shutil
import threading
import time

import grpc
import pytest

from client.connection import ClientError, Connection
from coordinator.auth import RateLimiter
from coordinator.service import Slots
from protocol import ddm_pb2 as pb
from protocol.limits import MiB
from tests.coordinator.test_service import begin, enroll, lease_for, refused, state, train

pytestmark = pytest.mark.usefixtures("one_thread")


def chunk(upload_id: str, offset: int, data: bytes) -> pb.UploadChunk:
    return pb.UploadChunk(upload_id=upload_id, offset=offset, data=data, sha256=hashlib.sha256(data).hexdigest())


def send(conn, *chunks):
    return conn.stream_in("UploadChunks", iter(chunks), timeout=30)


# -- bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,request_,words",
    [
        ("Heartbeat", pb.HeartbeatRequest(lease_id="LEASE", step=1), ["HeartbeatRequest.lease_id", "hex"]),
        ("Heartbeat", pb.HeartbeatRequest(step=-5), ["HeartbeatRequest.step", "0 to 1000000000", "-5"]),
        ("Heartbeat", pb.HeartbeatRequest(loss=float("inf")), ["HeartbeatRequest.loss", "finite"]),
        ("Heartbeat", pb.HeartbeatRequest(images_per_second=float("nan")), ["images_per_second", "NaN"]),
        ("ReleaseLease", pb.ReleaseLeaseRequest(reason="r" * 501), ["ReleaseLeaseRequest.reason", "at most 500"]),
        ("BeginUpload", pb.BeginUploadRequest(size=2**62, sha256="ab" * 32), ["BeginUploadRequest.size"]),
        ("AcquireLease", pb.AcquireLeaseRequest(local_dataset="d" * 5000), ["local_dataset", "at most 4096"]),
        ("QueryUpload", pb.QueryUploadRequest(upload_id="x" * 10_000), ["QueryUploadRequest.upload_id", "at most"]),
    ],
    ids=["id", "step", "loss", "rate", "reason", "size", "dataset", "upload-id"],
)
def test_out_of_bounds_requests_are_refused(server, method, request_, words):
    conn, _ = enroll(server)
    lease_for(conn)
    before = state(server)
    with pytest.raises(ClientError) as err:
        conn.unary(method, request_)
    message = refused(err, grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert "x" * 100 not in message  # names the field and the bound, never echoes the value
    assert state(server) == before


def test_enroll_is_bounded_before_the_token_is_spent(server):
    token = server.registry.create_invite("island", 60)
    before = state(server)
    for request, words in (
        (pb.EnrollRequest(token=token, name="n" * 201), ["EnrollRequest.name", "at most 200"]),
        (pb.EnrollRequest(token="t" * 101, name="x"), ["EnrollRequest.token", "at most 100"]),
    ):
        with pytest.raises(ClientError) as err:
            Connection(server.address, attempts=1).unary("Enroll", request)
        refused(err, grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert state(server) == before
    Connection(server.address).unary("Enroll", pb.EnrollRequest(token=token, name="n" * 200))


def test_a_heartbeat_before_the_first_loss_sends_nan(server):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=0, loss=float("nan")))
    assert server.registry.expert(lease.expert_id).loss is None


def test_every_message_of_a_stream_is_bounded(server):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    data = os.urandom(MiB + 1000)
    upload = begin(conn, lease, data)
    first = chunk(upload.upload_id, 0, data[:MiB])
    bad = chunk(upload.upload_id, MiB, data[MiB:])
    bad.upload_id = "../../etc/passwd"
    with pytest.raises(ClientError) as err:
        send(conn, first, bad)
    refused(err, grpc.StatusCode.INVALID_ARGUMENT, "UploadChunk.upload_id", "hex")
    # The chunk before it was whole and is committed; nothing of the bad one is.
    assert conn.unary("QueryUpload", pb.QueryUploadRequest(upload_id=upload.upload_id)).committed_offset == MiB
    assert os.listdir(server.store.staging) == [upload.upload_id]


# -- rates ----------------------------------------------------------------------------------------


def test_calls_per_island_are_rate_limited_and_retried_after_the_wait(server):
    server.auth.calls = RateLimiter(per_second=2, burst=3)
    a, _ = enroll(server)
    b, _ = enroll(server)
    for _ in range(3):
        a.unary("Status", pb.StatusRequest())
    before = state(server)
    with pytest.raises(ClientError) as err:
        a.unary("AcquireLease", pb.AcquireLeaseRequest())
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: at most 2 calls per second per island", "retry after")
    assert 0 < err.value.retry_after <= 0.5
    assert state(server) == before
    b.unary("Status", pb.StatusRequest())  # another island has its own bucket
    # The client waits as asked, then gets through.
    patient = Connection(server.address, a.metadata[0][1].removeprefix("Bearer "), attempts=3)
    started = time.monotonic()
    assert patient.unary("AcquireLease", pb.AcquireLeaseRequest()).WhichOneof("result") == "lease"
    assert time.monotonic() - started >= 0.2


def test_failed_enrollments_per_address_are_limited_and_successes_are_not(server):
    server.auth.enroll_failures = RateLimiter(per_second=1 / 60, burst=3)
    for _ in range(5):  # more than the burst: successful enrollments cost nothing
        enroll(server)
    anonymous = Connection(server.address, attempts=1)
    for _ in range(3):
        with pytest.raises(ClientError) as err:
            anonymous.unary("Enroll", pb.EnrollRequest(token="ddm_guess", name="x"))
        refused(err, grpc.StatusCode.UNAUTHENTICATED, "invalid invite token")
    token = server.registry.create_invite("island", 60)
    before = state(server)
    with pytest.raises(ClientError) as err:
        anonymous.unary("Enroll", pb.EnrollRequest(token=token, name="x"))
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "failed enrollments per minute from one address", "retry after")
    assert 50 <= err.value.retry_after <= 60
    assert state(server) == before  # the valid token is still unused


# -- upload streams and quotas --------------------------------------------------------------------


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _hanging_upload(conn, release: threading.Event):
    """An upload stream that stays open, sending nothing, until ``release`` is set."""

    def nothing():
        release.wait(30)
        yield from ()

    return conn.stub.UploadChunks.future(nothing(), metadata=conn.metadata, timeout=60)


def test_upload_streams_are_limited_per_island_and_in_all(server):
    server.service.uploads = Slots("upload stream", per_island=2, total=3)
    a, ea = enroll(server)
    b, _ = enroll(server)
    c, _ = enroll(server)
    lease = lease_for(a)
    release = threading.Event()
    hanging = []
    try:
        hanging += [_hanging_upload(a, release), _hanging_upload(a, release)]
        wait_until(lambda: server.service.uploads.open(ea.island_id) == 2)
        before = state(server)
        with pytest.raises(ClientError) as err:
            send(a)
        refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 2 upload streams at once per identity")
        assert err.value.retry_after is None  # a client holding two streams is told, not asked to wait
        hanging.append(_hanging_upload(b, release))
        wait_until(lambda: server.service.uploads.open() == 3)
        with pytest.raises(ClientError) as err:
            send(c)
        refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "serving 3 upload streams at once", "retry")
        assert err.value.retry_after == 2.0
        assert state(server) == before
        # Heartbeats still get through while every upload slot is taken.
        a.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=1, loss=0.5))
    finally:
        release.set()
    for call in hanging:
        with pytest.raises(grpc.RpcError) as ended:
            call.result()
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # a stream with no chunk
    assert server.service.uploads.open() == 0


def test_an_expert_takes_at_most_its_byte_quota_from_an_island(server):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    quota = server.config.max_expert_upload_bytes = 700_000
    first, second = os.urandom(300_000), os.urandom(300_000)
    for data in (first, second):  # the second supersedes the first; both count
        upload = begin(conn, lease, data)
        send(conn, chunk(upload.upload_id, 0, data))
    before = state(server)
    with pytest.raises(ClientError) as err:
        begin(conn, lease, os.urandom(300_000))
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "sent 600000 bytes", f"quota of {quota} bytes per expert")
    assert state(server) == before
    assert begin(conn, lease, second).committed_offset == 300_000  # resuming costs nothing more

    # Checked again before each chunk is written (here: the quota lowered since BeginUpload).
    third = os.urandom(100_000)
    upload = begin(conn, lease, third)
    server.config.max_expert_upload_bytes = 650_000
    before = state(server)
    with pytest.raises(ClientError) as err:
        send(conn, chunk(upload.upload_id, 0, third))
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota of 650000 bytes per expert")
    assert state(server) == before
    assert not server.store.staging_path(upload.upload_id).exists()  # not a byte written


def test_begin_upload_needs_free_disk_beyond_the_upload(server):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    # Other processes may free some space meanwhile: ask for a GiB more than there is.
    server.config.disk_reserve_bytes = shutil.disk_usage(server.store.staging).free + 1024 * MiB
    before = state(server)
    with pytest.raises(ClientError) as err:
        begin(conn, lease, b"x" * 1000)
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "the coordinator's disk is full", "MiB free")
    assert err.value.retry_after is None
    assert state(server) == before


# -- stale staging --------------------------------------------------------------------------------


def test_stale_uploads_are_abandoned_and_unowned_staging_deleted(server, tmp_path):
    stale = server.config.stale_upload_seconds = 4.0
    a, _ = enroll(server)
    b, _ = enroll(server)
    c, _ = enroll(server)
    lease_a, lease_b, lease_c = lease_for(a), lease_for(b), lease_for(c)
    checkpoint = train(b, lease_b, tmp_path).read_bytes()
    partial = os.urandom(MiB + 1000)

    old = begin(a, lease_a, partial)
    send(a, chunk(old.upload_id, 0, partial[:MiB]))
    started = server.clock.now()
    for junk in ("0123abcd0123abcd", "leftover.tmp"):  # no open upload owns them
        (server.store.staging / junk).write_bytes(b"junk")
    server.clock.advance(stale / 2)

    # Fresh: an upload mid-way, and one whose file a cut-short completion already moved to the store.
    fresh = begin(c, lease_c, partial)
    send(c, chunk(fresh.upload_id, 0, partial[:MiB]))
    moved = begin(b, lease_b, checkpoint)
    send(b, chunk(moved.upload_id, 0, checkpoint))
    server.store.add_file(server.store.staging_path(moved.upload_id), move=True)

    server.clock.advance(stale / 2 + 1)
    server.reap()  # a round of the reaper, its staging clean-up included
    assert not server.store.staging_path(old.upload_id).exists(), "the stale upload was not cleaned up"
    assert server.clock.now() - started >= stale
    assert sorted(os.listdir(server.store.staging)) == [fresh.upload_id]
    assert a.unary("QueryUpload", pb.QueryUploadRequest(upload_id=old.upload_id)).state == "abandoned"
    assert server.registry.expert(lease_a.expert_id).state == "training"
    [event] = [e for e in server.registry.events() if e.kind == "upload_abandoned"]
    assert event.island_id == server.registry.lease(lease_a.lease_id).island_id and old.upload_id in event.detail

    # The abandoned upload is closed; its island begins a new one and carries on.
    with pytest.raises(ClientError) as err:
        send(a, chunk(old.upload_id, MiB, partial[MiB:]))
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, "abandoned", "begin a new upload")
    with pytest.raises(ClientError) as err:
        a.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=old.upload_id))
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, "abandoned", "begin a new upload")
    again = begin(a, lease_a, partial)
    assert again.upload_id != old.upload_id and again.committed_offset == 0

    # The fresh ones were left alone: the moved one completes, the other resumes where it was.
    reply = b.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=moved.upload_id))
    assert reply.sha256 == hashlib.sha256(checkpoint).hexdigest()
    assert server.registry.expert(lease_b.expert_id).state == "signed"
    assert begin(c, lease_c, partial).committed_offset == MiB
