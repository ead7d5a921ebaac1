"""A coordinator whose disk fills up mid-upload, with a real kernel error on a real process.

The serving process gets a file size limit (RLIMIT_FSIZE) just past the first chunk of the
checkpoint; Python ignores SIGXFSZ, so the write that crosses the limit fails with EFBIG, as a
write on a full disk fails with ENOSPC. The chunk must be refused as RESOURCE_EXHAUSTED in one
line with nothing half-registered, and the same upload must resume and complete once the
coordinator runs again without the limit.
"""

from __future__ import annotations

import json
import resource
import signal

import grpc
import pytest
import torch

from client.connection import ClientError
from client.island import enroll, fetch_data
from client.state import IslandState
from client.transfer import upload_checkpoint
from ddm_model.dit import DiTConfig
from ddm_model.train import TrainConfig, train_expert
from protocol import ddm_pb2 as pb
from protocol.limits import MiB

from .conftest import sha256_of

LIMIT = MiB + 64 * 1024  # the first 1 MiB chunk fits, the second is cut short by the limit


def _ignores(pid: int, sig: signal.Signals) -> bool:
    with open(f"/proc/{pid}/status") as f:
        [mask] = [line.split()[1] for line in f if line.startswith("SigIgn:")]
    return bool(int(mask, 16) >> (sig - 1) & 1)


@pytest.mark.slow
def test_a_full_disk_refuses_the_chunk_and_the_upload_resumes_once_there_is_room(coordinator, tmp_path):
    # "small" experts: a checkpoint of several chunks, still cheap to train on one thread.
    coord = coordinator(
        "--experts", "2", "--preset", "small", "--steps", "30", "--router-preset", "tiny", "--clustering", "random"
    )
    state = IslandState(tmp_path / "island")
    identity = enroll(state, coord.address, coord.invite(), "island", "island", coord.fingerprint, coord.tls)
    conn = coord.connection(identity.credential, attempts=1)
    lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
    data = fetch_data(conn, lease, state, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_expert(
            data,
            DiTConfig.from_dict(json.loads(lease.model_config_json)),
            TrainConfig.from_dict(json.loads(lease.train_config_json)),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / "expert.safetensors"
    result.export(path, data.fingerprint(), cluster_id=lease.cluster_id)
    size, digest = path.stat().st_size, sha256_of(path)
    assert size > LIMIT, size

    resource.prlimit(coord.proc.pid, resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    assert _ignores(coord.proc.pid, signal.SIGXFSZ)  # so a write past the limit fails with EFBIG
    with pytest.raises(ClientError) as err:
        upload_checkpoint(conn, lease.lease_id, path, chunk_bytes=MiB)
    message = str(err.value)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "\n" not in message
    assert "the coordinator's disk is full (File too large)" in message, message
    assert "try again once its operator has freed space" in message, message

    # Nothing half-registered: one chunk committed, the expert still uploading, no artifact.
    [row] = coord.db("SELECT * FROM uploads")
    assert (row["state"], row["committed_offset"], row["chunks"], row["bytes_received"]) == ("open", MiB, 1, MiB)
    [expert] = coord.db("SELECT * FROM experts WHERE id = ?", lease.expert_id)
    assert expert["state"] == "uploading" and expert["checkpoint_sha256"] is None
    assert coord.db("SELECT * FROM artifacts WHERE sha256 = ?", digest) == []
    assert not (coord.home / "artifacts" / digest).exists()
    staged = coord.home / "staging" / row["id"]
    assert MiB <= staged.stat().st_size <= LIMIT
    with pytest.raises(ClientError) as err:
        conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=row["id"]))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, str(err.value)
    conn.close()

    # Room again (a coordinator without the limit): the same upload resumes after its committed chunk.
    coord.kill()
    coord.start()
    conn = coord.connection(identity.credential)
    try:
        report = upload_checkpoint(conn, lease.lease_id, path, chunk_bytes=MiB)
    finally:
        conn.close()
    assert report.upload_id == row["id"]
    assert report.resumed_from == MiB and report.sent_offsets[0] == MiB
    assert report.reply.sha256 == digest
    [row] = coord.db("SELECT * FROM uploads")
    assert row["state"] == "complete" and row["bytes_received"] == size
    [expert] = coord.db("SELECT * FROM experts WHERE id = ?", lease.expert_id)
    assert expert["state"] == "signed" and expert["checkpoint_sha256"] == digest
    assert sha256_of(coord.home / "artifacts" / digest) == digest
