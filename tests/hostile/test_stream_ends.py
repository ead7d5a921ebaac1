"""Upload streams that end in an error: a message over gRPC's size limit (which gRPC itself
refuses before the coordinator sees it) and chunks the coordinator refuses mid-stream.

The client gets the right status and message; the coordinator's log says what happened in one
line and holds no traceback: nothing about serializing a reply that a refused call cannot have.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
from grpc import StatusCode as S

from protocol import ddm_pb2 as pb
from protocol.limits import MAX_MESSAGE_BYTES, MiB

from .conftest import OPEN_UPLOAD_BYTES, chunk, enroll, open_upload
from .harness import check

LOGGERS = ("grpc", "ddm.coordinator")
SETTLE_S = 1.0  # after the handler lets go of its stream slot, what remains of it is microseconds


@pytest.fixture
def server_log(caplog):
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def settled(server, island_id: str) -> None:
    """Wait until the coordinator has finished with the island's upload streams."""
    deadline = time.monotonic() + 20
    while server.service.uploads.open(island_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.service.uploads.open(island_id), "an upload stream is still being served"
    time.sleep(SETTLE_S)


def assert_quiet(records) -> None:
    """No traceback and nothing at ERROR from gRPC or the coordinator."""
    noisy = [
        f"{r.name} {r.levelname}: {r.getMessage()[:200]}"
        for r in records
        if r.name.startswith(LOGGERS) and (r.levelno >= logging.ERROR or r.exc_info)
    ]
    assert not noisy, noisy
    assert not any("serializing" in r.getMessage() for r in records)


def test_a_chunk_over_the_message_limit_ends_the_stream_quietly(server, server_log):
    me = enroll(server, lease=True)
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(me, data)
    too_big = chunk(upload.upload_id, 0, os.urandom(MAX_MESSAGE_BYTES + 1))
    out = me.call("UploadChunks", [too_big])
    check(out, {S.RESOURCE_EXHAUSTED: "larger than max"}, "a chunk over the message limit")

    # After a committed chunk: the stream ends the same way and keeps what it committed.
    first = chunk(upload.upload_id, 0, data[:MiB])
    out = me.call("UploadChunks", [first, chunk(upload.upload_id, MiB, os.urandom(MAX_MESSAGE_BYTES + 1))])
    check(out, {S.RESOURCE_EXHAUSTED: "larger than max"}, "a good chunk, then one over the message limit")
    settled(server, me.id)
    assert me.ok("QueryUpload", pb.QueryUploadRequest(upload_id=upload.upload_id)).committed_offset == MiB
    assert_quiet(server_log.records)
    assert any("UploadChunks ended early" in r.getMessage() for r in server_log.records)


def test_a_refused_chunk_ends_the_stream_quietly(server, server_log):
    me = enroll(server, lease=True)
    data = os.urandom(OPEN_UPLOAD_BYTES)
    upload = open_upload(me, data)
    first = chunk(upload.upload_id, 0, data[:MiB])
    corrupt = pb.UploadChunk(upload_id=upload.upload_id, offset=MiB, data=data[MiB:], sha256="ab" * 32)
    check(me.call("UploadChunks", [first, corrupt, corrupt]), {S.DATA_LOSS: "checksum"}, "a corrupt second chunk")
    check(
        me.call("UploadChunks", [chunk(upload.upload_id, MiB, b"x")]),
        {S.INVALID_ARGUMENT: "chunks must"},
        "a tiny chunk",
    )
    settled(server, me.id)
    assert_quiet(server_log.records)
