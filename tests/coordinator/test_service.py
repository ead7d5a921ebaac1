"""The coordinator's gRPC service on a real loopback server, driven by the real client code.

Every refusal must end in a clear one-line error with the right status code and leave the
registry and the artifact store as they were.
"""

import copy
import hashlib
import json
import os
import shutil

import grpc
import pytest
import torch
from safetensors.torch import save_file

from client.connection import ClientError, Connection
from client.island import fetch_data
from client.state import IslandState
from client.transfer import upload_checkpoint
from coordinator.registry import TRAFFIC_COLUMNS
from ddm_model.checkpoint import read_checkpoint_header, save_checkpoint
from ddm_model.dit import DiT, DiTConfig
from ddm_model.train import TrainConfig, train_expert
from protocol import ddm_pb2 as pb
from protocol.limits import MiB
from protocol.trust import canonical_json, sha256_file, verify_signature

from .conftest import STEPS


def enroll(server, role="island"):
    token = server.registry.create_invite(role, 60)
    reply = Connection(server.address).unary("Enroll", pb.EnrollRequest(token=token, name="test"))
    return Connection(server.address, reply.credential, attempts=1), reply


def lease_for(conn) -> pb.Lease:
    reply = conn.unary("AcquireLease", pb.AcquireLeaseRequest())
    assert reply.WhichOneof("result") == "lease"
    return reply.lease


def train(conn, lease, tmp_path, steps=None):
    data = fetch_data(conn, lease, IslandState(tmp_path / f"island-{lease.expert_id}"), None)
    settings = TrainConfig.from_dict(json.loads(lease.train_config_json))
    if steps is not None:
        settings.steps = steps
    model_cfg = DiTConfig.from_dict(json.loads(lease.model_config_json))
    result = train_expert(data, model_cfg, settings, progress=False)
    path = tmp_path / f"expert-{lease.expert_id}.safetensors"
    result.export(path, data.fingerprint(), cluster_id=lease.cluster_id)
    return path


def state(server, skip_uploads=False):
    """The registry and the store, less what every call changes: when the island was last seen
    and its traffic counters, which count the refused request itself (written by a background
    flush, so they may land at any moment)."""
    snap = copy.deepcopy(server.registry.snapshot())
    for island in snap["islands"]:
        island.pop("last_seen_at")
        for columns in TRAFFIC_COLUMNS.values():
            for column in columns:
                island.pop(column)
    if skip_uploads:
        snap.pop("uploads")
    return snap, sorted(os.listdir(server.store.artifacts))


def refused(err, code: grpc.StatusCode, *words):
    message = str(err.value)
    assert err.value.code == code, message
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# -- the path that works ----------------------------------------------------------------------


def test_upload_is_validated_signed_and_registered(server, tmp_path):
    conn, enrolled = enroll(server)
    lease = lease_for(conn)
    path = train(conn, lease, tmp_path)
    report = upload_checkpoint(conn, lease.lease_id, path)
    reply = report.reply
    verify_signature(enrolled.coordinator_public_key, reply.entry_json, reply.signature, "entry")
    entry = json.loads(reply.entry_json)
    assert reply.entry_json == canonical_json(entry)
    assert entry["sha256"] == sha256_file(path) == reply.sha256
    assert (entry["expert_id"], entry["cluster_id"], entry["island_id"]) == (
        lease.expert_id,
        lease.cluster_id,
        enrolled.island_id,
    )
    assert entry["steps"] == STEPS and entry["flops"] > 0 and entry["config"]["preset"] == "tiny"
    probe = entry["probe"]  # scored on its cluster's held-out probe slice before it was signed
    assert probe["margin"] == 0.05 and probe["images"] == server.config.clustering["probe"]["sizes"][lease.cluster_id]
    assert probe["loss"] <= 0.95 * probe["untrained_loss"]
    assert server.store.has(entry["sha256"])
    expert = server.registry.expert(lease.expert_id)
    assert expert.state == "signed" and expert.checkpoint_sha256 == entry["sha256"] and expert.step == STEPS
    assert server.registry.lease(lease.lease_id).state == "completed"
    # Asked again (a lost reply), CompleteUpload answers with the same signed entry.
    again = conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=report.upload_id))
    assert (again.entry_json, again.signature) == (reply.entry_json, reply.signature)
    kinds = [e.kind for e in server.registry.events()]
    assert kinds[-3:] == ["uploaded", "verified", "signed"]


def test_every_expert_signed_publishes_a_signed_ensemble(server, tmp_path):
    conn, _ = enroll(server)
    with pytest.raises(ClientError) as err:
        conn.unary("GetManifest", pb.GetManifestRequest())
    refused(err, grpc.StatusCode.NOT_FOUND, "no ensemble")
    for _ in range(3):
        lease = lease_for(conn)
        upload_checkpoint(conn, lease.lease_id, train(conn, lease, tmp_path))
    reader, _ = published_to_a_reader(server, conn)
    assert json.loads(reader.unary("Status", pb.StatusRequest()).json)["ensemble"]["state"] == "published"


def published_to_a_reader(server, conn):
    """Once ``conn``'s island signed every expert: the ensemble is assembled and published, its
    manifest is signed over the three clusters, and a reader downloads its router intact.
    Returns (the reader's connection, the signed manifest)."""
    assert conn.unary("AcquireLease", pb.AcquireLeaseRequest()).no_work.finished
    server.assembler.join(60)  # the last signature started the assembly
    signed = conn.unary("GetManifest", pb.GetManifestRequest())
    verify_signature(signed.coordinator_public_key, signed.manifest_json, signed.signature, "manifest")
    manifest = json.loads(signed.manifest_json)
    assert manifest["router"]["clusters"] == [0, 1, 2] and len(manifest["experts"]) == 3
    reader, _ = enroll(server, role="reader")
    chunks = list(reader.stream_out("Download", pb.DownloadRequest(sha256=manifest["router"]["sha256"]), timeout=30))
    assert hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest() == manifest["router"]["sha256"]
    return reader, signed


def test_index_list_for_an_island_with_its_own_copy(server):
    conn, _ = enroll(server)
    lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest(local_dataset="digits")).lease
    assert lease.WhichOneof("data") == "index_list"
    assert lease.index_list.dataset == "digits" and len(lease.index_list.ids) > 0
    data = fetch_data(conn, lease, IslandState(server.home.root.parent / "isl"), "digits")
    assert data.fingerprint() == lease.shard_fingerprint


# -- refusals ---------------------------------------------------------------------------------


def test_bad_and_reused_tokens_are_refused(server):
    before = state(server)
    with pytest.raises(ClientError) as err:
        Connection(server.address, attempts=1).unary("Enroll", pb.EnrollRequest(token="ddm_forged", name="x"))
    refused(err, grpc.StatusCode.UNAUTHENTICATED, "invalid invite token")
    assert state(server) == before
    token = server.registry.create_invite("island", 60)
    Connection(server.address).unary("Enroll", pb.EnrollRequest(token=token, name="first"))
    before = state(server)
    with pytest.raises(ClientError) as err:
        Connection(server.address, attempts=1).unary("Enroll", pb.EnrollRequest(token=token, name="second"))
    refused(err, grpc.StatusCode.UNAUTHENTICATED, "already used")
    assert state(server) == before


@pytest.mark.parametrize("credential", [None, "nobody.secret", "wrongformat", "ISLAND.wrong"])
def test_missing_or_wrong_credentials_are_refused(server, credential):
    _, enrolled = enroll(server)
    if credential == "ISLAND.wrong":
        credential = enrolled.island_id + ".wrong"
    before = state(server)
    anonymous = Connection(server.address, credential, attempts=1)
    for method, request in (("AcquireLease", pb.AcquireLeaseRequest()), ("Status", pb.StatusRequest())):
        with pytest.raises(ClientError) as err:
            anonymous.unary(method, request)
        refused(err, grpc.StatusCode.UNAUTHENTICATED, "credential")
    with pytest.raises(ClientError) as err:
        list(anonymous.stream_out("Download", pb.DownloadRequest(sha256="ab" * 32), timeout=10))
    refused(err, grpc.StatusCode.UNAUTHENTICATED)
    assert state(server) == before


def test_a_reader_cannot_take_work(server):
    reader, _ = enroll(server, role="reader")
    before = state(server)
    with pytest.raises(ClientError) as err:
        reader.unary("AcquireLease", pb.AcquireLeaseRequest())
    refused(err, grpc.StatusCode.PERMISSION_DENIED, "reader")
    assert state(server) == before


def test_upload_for_an_expert_not_leased_is_refused(server, tmp_path):
    a, _ = enroll(server)
    b, _ = enroll(server)
    lease = lease_for(a)
    path = train(a, lease, tmp_path)
    before = state(server)
    for lease_id in (lease.lease_id, "0123456789abcdef"):
        with pytest.raises(ClientError) as err:
            upload_checkpoint(b, lease_id, path)
        refused(err, grpc.StatusCode.PERMISSION_DENIED, "not held by this island")
    assert state(server) == before


def test_an_expired_lease_cannot_upload(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    path = train(conn, lease, tmp_path)
    server.registry.lease_seconds = 0.1
    conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=1))
    server.clock.advance(1)
    server.reap()  # one round of the reaper
    assert server.registry.lease(lease.lease_id).state == "expired"
    before = state(server)
    with pytest.raises(ClientError) as err:
        upload_checkpoint(conn, lease.lease_id, path)
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, "expired")
    assert state(server) == before


def test_over_quota_size_is_refused_before_any_byte(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    quota = server.config.max_upload_bytes
    before = state(server)
    with pytest.raises(ClientError) as err:
        conn.unary("BeginUpload", pb.BeginUploadRequest(lease_id=lease.lease_id, size=quota + 1, sha256="ab" * 32))
    refused(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    assert state(server) == before


def begin(conn, lease, data: bytes) -> pb.UploadState:
    digest = hashlib.sha256(data).hexdigest()
    return conn.unary("BeginUpload", pb.BeginUploadRequest(lease_id=lease.lease_id, size=len(data), sha256=digest))


def test_corrupted_chunk_is_refused_and_nothing_is_committed(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    data = train(conn, lease, tmp_path).read_bytes()
    upload = begin(conn, lease, data)
    before = state(server)
    damaged = bytearray(data)
    damaged[100] ^= 0xFF
    chunk = pb.UploadChunk(
        upload_id=upload.upload_id, offset=0, data=bytes(damaged), sha256=hashlib.sha256(data).hexdigest()
    )
    with pytest.raises(ClientError) as err:
        conn.stream_in("UploadChunks", iter([chunk]), timeout=30)
    refused(err, grpc.StatusCode.DATA_LOSS, "checksum")
    assert state(server) == before
    query = conn.unary("QueryUpload", pb.QueryUploadRequest(upload_id=upload.upload_id))
    assert query.committed_offset == 0


def test_chunks_out_of_order_or_size_are_refused(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    data = os.urandom(MiB + 100_000)  # under the tiny expert's quota, two chunks
    upload = begin(conn, lease, data)

    def send(offset, piece):
        chunk = pb.UploadChunk(
            upload_id=upload.upload_id, offset=offset, data=piece, sha256=hashlib.sha256(piece).hexdigest()
        )
        return conn.stream_in("UploadChunks", iter([chunk]), timeout=30)

    before = state(server)
    with pytest.raises(ClientError) as err:
        send(MiB, data[MiB:])
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, "committed offset is 0")
    with pytest.raises(ClientError) as err:
        send(0, data[: MiB // 2])  # too small and not the last chunk
    refused(err, grpc.StatusCode.INVALID_ARGUMENT, "1 to 4 MiB")
    assert state(server) == before
    assert send(0, data[:MiB]).committed_offset == MiB
    with pytest.raises(ClientError) as err:
        send(0, data[:MiB])  # a committed chunk sent again
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, f"committed offset is {MiB}")


def complete_rejected(server, conn, lease, data: bytes, *words, declared: bytes | None = None):
    """Upload bytes (declaring ``declared``'s sha256 if given) and expect CompleteUpload to refuse."""
    digest = hashlib.sha256(declared if declared is not None else data).hexdigest()
    upload = conn.unary("BeginUpload", pb.BeginUploadRequest(lease_id=lease.lease_id, size=len(data), sha256=digest))
    chunk = pb.UploadChunk(upload_id=upload.upload_id, offset=0, data=data, sha256=hashlib.sha256(data).hexdigest())
    conn.stream_in("UploadChunks", iter([chunk]), timeout=30)
    before = state(server, skip_uploads=True)
    with pytest.raises(ClientError) as err:
        conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=upload.upload_id))
    message = refused(err, grpc.StatusCode.INVALID_ARGUMENT, "rejected", *words)
    assert state(server, skip_uploads=True) == before
    assert server.registry.expert(lease.expert_id).state != "signed"
    assert not server.store.staging_path(upload.upload_id).exists()
    row = server.registry.upload_for(
        upload_id=upload.upload_id, island_id=server.registry.lease(lease.lease_id).island_id
    )
    assert row.state == "rejected" and row.reason
    return message


def checkpoint_bytes(tmp_path, edit) -> bytes:
    """A checkpoint with its ddm header intact but its tensors edited."""
    from safetensors import safe_open

    path = tmp_path / "good.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out.read_bytes()


def test_wrong_sha256_is_refused(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    data = train(conn, lease, tmp_path).read_bytes()
    complete_rejected(server, conn, lease, data, "sha256", declared=data[:-1] + b"\0")


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.pop("out.weight"), ["missing tensors", "out.weight"]),
        (lambda t: t.update(extra=torch.zeros(3)), ["unexpected tensors", "extra"]),
        (lambda t: t.update({"out.weight": torch.zeros(3, 3)}), ["shape"]),
        (lambda t: t.update({"out.weight": t["out.weight"].half()}), ["dtype"]),
        (lambda t: t["out.bias"].__setitem__(0, float("nan")), ["NaN or infinite"]),
        (lambda t: t["out.bias"].__setitem__(0, float("inf")), ["NaN or infinite"]),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan", "inf"],
)
def test_bad_weights_are_refused(server, tmp_path, edit, words):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    shutil.copy(train(conn, lease, tmp_path), tmp_path / "good.safetensors")
    complete_rejected(server, conn, lease, checkpoint_bytes(tmp_path, edit), *words)


def test_a_pickle_renamed_safetensors_is_refused_without_running_it(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    model = DiT(DiTConfig.from_dict(json.loads(lease.model_config_json)))
    path = tmp_path / "expert.safetensors"
    torch.save(model.state_dict(), path)
    complete_rejected(server, conn, lease, path.read_bytes(), "pickle")


def test_a_model_of_another_config_is_refused(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    path = tmp_path / "conditional.safetensors"
    good = train(conn, lease, tmp_path)
    info, _ = read_checkpoint_header(good)
    other = DiT(DiTConfig("tiny", 8, 1, num_classes=10))  # class-conditional: one more tensor
    save_checkpoint(path, other, cluster_id=lease.cluster_id, steps=STEPS, data_fingerprint=info.data_fingerprint)
    complete_rejected(server, conn, lease, path.read_bytes(), "differs from the expected")


def test_a_checkpoint_trained_on_the_wrong_terms_is_refused(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    short = train(conn, lease, tmp_path, steps=STEPS - 1)
    complete_rejected(server, conn, lease, short.read_bytes(), f"trained for {STEPS - 1} steps")
    good = train(conn, lease, tmp_path)
    info, _ = read_checkpoint_header(good)
    other = tmp_path / "other-cluster.safetensors"
    model, _ = __import__("ddm_model.checkpoint", fromlist=["x"]).load_checkpoint(good)
    save_checkpoint(other, model, cluster_id=lease.cluster_id + 1, steps=STEPS, data_fingerprint=info.data_fingerprint)
    complete_rejected(server, conn, lease, other.read_bytes(), "cluster")


def test_downloads_are_limited_to_what_the_caller_may_read(server):
    a, _ = enroll(server)
    b, _ = enroll(server)
    lease = lease_for(a)
    lease_for(b)
    shard = lease.shard.sha256
    data = b"".join(c.data for c in a.stream_out("Download", pb.DownloadRequest(sha256=shard), timeout=30))
    assert hashlib.sha256(data).hexdigest() == shard and len(data) == lease.shard.size
    tail = list(a.stream_out("Download", pb.DownloadRequest(sha256=shard, offset=len(data) - 10), timeout=30))
    assert b"".join(c.data for c in tail) == data[-10:] and tail[0].offset == len(data) - 10
    with pytest.raises(ClientError) as err:
        list(b.stream_out("Download", pb.DownloadRequest(sha256=shard), timeout=30))
    refused(err, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(ClientError) as err:
        list(a.stream_out("Download", pb.DownloadRequest(sha256="cd" * 32), timeout=30))
    refused(err, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(ClientError) as err:
        list(a.stream_out("Download", pb.DownloadRequest(sha256=shard, offset=len(data) + 1), timeout=30))
    refused(err, grpc.StatusCode.OUT_OF_RANGE)


def test_status_rpc_reports_progress(server):
    conn, enrolled = enroll(server)
    lease = lease_for(conn)
    conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=2, loss=0.5, images_per_second=10))
    report = json.loads(conn.unary("Status", pb.StatusRequest()).json)
    expert = report["experts"][lease.expert_id]
    assert (expert["state"], expert["step"], expert["loss"], expert["island_id"]) == (
        "training",
        2,
        0.5,
        enrolled.island_id,
    )
    assert report["coordinator"]["key_fingerprint"] == enrolled.key_fingerprint
    assert [lease_row["state"] for lease_row in report["leases"]] == ["active"]


def test_assemble_publishes_the_experts_signed_so_far(server, tmp_path):
    from coordinator.assemble import AssembleError

    with pytest.raises(AssembleError, match="at least 2 signed experts; 0 are signed"):
        server.assembler.run(progress=False)
    conn, enrolled = enroll(server)
    signed = []
    for _ in range(2):
        lease = lease_for(conn)
        upload_checkpoint(conn, lease.lease_id, train(conn, lease, tmp_path))
        signed.append(lease.cluster_id)
    ensemble_id = server.assembler.run(progress=False)
    published = server.registry.latest_published()
    assert published.id == ensemble_id and published.experts == 2
    manifest = json.loads(published.manifest_json)
    verify_signature(enrolled.coordinator_public_key, published.manifest_json, published.signature, "manifest")
    assert manifest["router"]["clusters"] == signed
    assert manifest["router"]["config"]["num_clusters"] == 2
    assert [item["entry"]["cluster_id"] for item in manifest["experts"]] == signed


def test_a_lease_holds_one_upload_and_a_superseded_one_cannot_complete(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    good = train(conn, lease, tmp_path).read_bytes()
    other = good[:-1] + bytes([good[-1] ^ 1])
    first = begin(conn, lease, other)
    second = begin(conn, lease, good)
    chunk = pb.UploadChunk(upload_id=second.upload_id, offset=0, data=good, sha256=hashlib.sha256(good).hexdigest())
    conn.stream_in("UploadChunks", iter([chunk]), timeout=30)
    with pytest.raises(ClientError) as err:
        conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=first.upload_id))
    refused(err, grpc.StatusCode.FAILED_PRECONDITION, "superseded", "begin a new upload")
    conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=second.upload_id))
    assert server.registry.expert(lease.expert_id).state == "signed"
    assert not server.store.staging_path(first.upload_id).exists()


def test_a_completion_cut_short_after_the_move_into_the_store_can_be_retried(server, tmp_path):
    """As if the coordinator died right after moving the checkpoint into the store."""
    conn, enrolled = enroll(server)
    lease = lease_for(conn)
    data = train(conn, lease, tmp_path).read_bytes()
    upload = begin(conn, lease, data)
    chunk = pb.UploadChunk(upload_id=upload.upload_id, offset=0, data=data, sha256=hashlib.sha256(data).hexdigest())
    conn.stream_in("UploadChunks", iter([chunk]), timeout=30)
    assert server.registry.expert(lease.expert_id).state == "uploaded"
    server.store.add_file(server.store.staging_path(upload.upload_id), move=True)
    reply = conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=upload.upload_id))
    verify_signature(enrolled.coordinator_public_key, reply.entry_json, reply.signature, "entry")
    assert json.loads(reply.entry_json)["sha256"] == hashlib.sha256(data).hexdigest()
    assert server.registry.expert(lease.expert_id).state == "signed"


@pytest.mark.parametrize(
    "metrics,words",
    [({"loss": float("nan")}, ["NaN"]), ({"blob": "x" * 20_000}, ["metrics take"])],
    ids=["nan", "too-large"],
)
def test_metrics_that_would_spoil_the_manifest_are_refused(server, tmp_path, metrics, words):
    from ddm_model.checkpoint import load_checkpoint

    conn, _ = enroll(server)
    lease = lease_for(conn)
    good = train(conn, lease, tmp_path)
    model, info = load_checkpoint(good)
    path = tmp_path / "metrics.safetensors"
    save_checkpoint(
        path,
        model,
        cluster_id=info.cluster_id,
        steps=info.steps,
        data_fingerprint=info.data_fingerprint,
        metrics=metrics,
    )
    complete_rejected(server, conn, lease, path.read_bytes(), *words)
