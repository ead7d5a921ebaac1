"""Resumable transfers: checkpoint uploads by committed offset, artifact downloads by offset.

An upload asks the coordinator for its committed offset and sends only what follows it;
a download appends to a ``.part`` file and restarts from its length. Both verify sha256
over the whole file before anyone uses it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protocol import ddm_pb2 as pb
from protocol.limits import (
    COMPLETE_UPLOAD_DEADLINE_S,
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    RETRY_ATTEMPTS,
    RETRY_BACKOFF_S,
    stream_deadline,
)
from protocol.trust import sha256_file

from .connection import ClientError, Connection

OnBytes = Callable[[int], None]  # called with the offset reached


@dataclass
class UploadReport:
    upload_id: str
    size: int
    sha256: str
    resumed_from: int  # committed offset found when the upload (re)started
    sent_offsets: list[int] = field(default_factory=list)  # offset of every chunk this call sent
    reply: pb.CompleteUploadReply | None = None


def _chunks(path: Path, upload_id: str, start: int, size: int, chunk: int, report: UploadReport, on_bytes):
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while offset < size:
            data = f.read(chunk)
            report.sent_offsets.append(offset)
            yield pb.UploadChunk(upload_id=upload_id, offset=offset, data=data, sha256=hashlib.sha256(data).hexdigest())
            offset += len(data)
            if on_bytes is not None:
                on_bytes(offset)


def upload_checkpoint(
    conn: Connection,
    lease_id: str,
    path: Path,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_bytes: OnBytes | None = None,
    on_begin: Callable[[str], None] | None = None,
) -> UploadReport:
    """Upload a file for a lease, resuming from whatever the coordinator already committed;
    ``on_begin`` is told the upload's id before any byte is sent."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ClientError(f"chunk size must be 1 to 4 MiB, got {chunk_bytes}")
    size = path.stat().st_size
    digest = sha256_file(path)
    state = conn.unary("BeginUpload", pb.BeginUploadRequest(lease_id=lease_id, size=size, sha256=digest))
    report = UploadReport(state.upload_id, size, digest, resumed_from=state.committed_offset)
    if on_begin is not None:
        on_begin(state.upload_id)
    for attempt in range(RETRY_ATTEMPTS):
        if state.committed_offset >= size:
            break
        start = state.committed_offset
        try:
            state = conn.stream_in(
                "UploadChunks",
                _chunks(path, state.upload_id, start, size, chunk_bytes, report, on_bytes),
                timeout=stream_deadline(size - start),
            )
        except ClientError as err:
            # Unreachable, too slow or asked to wait: what was committed stays committed; ask where to resume.
            resumable = err.retryable or err.code == grpc.StatusCode.DEADLINE_EXCEEDED
            if not resumable or attempt == RETRY_ATTEMPTS - 1:
                raise
            time.sleep(max(RETRY_BACKOFF_S * 2**attempt, err.retry_after or 0.0))
            state = conn.unary("QueryUpload", pb.QueryUploadRequest(upload_id=state.upload_id))
    report.reply = conn.unary(
        "CompleteUpload", pb.CompleteUploadRequest(upload_id=state.upload_id), timeout=COMPLETE_UPLOAD_DEADLINE_S
    )
    return report


def download_artifact(conn: Connection, sha256: str, dest: Path, size: int, on_bytes: OnBytes | None = None) -> Path:
    """Fetch an artifact into ``dest``, resuming a partial ``.part`` file; verify its sha256."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(RETRY_ATTEMPTS):
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        try:
            with open(part, "ab") as f:
                for chunk in conn.stream_out(
                    "Download", pb.DownloadRequest(sha256=sha256, offset=offset), timeout=stream_deadline(size - offset)
                ):
                    if chunk.offset != offset or chunk.size != size or offset + len(chunk.data) > size:
                        raise ClientError(f"artifact {sha256[:12]}: the coordinator sent an unexpected chunk")
                    f.write(chunk.data)
                    offset += len(chunk.data)
                    if on_bytes is not None:
                        on_bytes(offset)
                f.flush()
                os.fsync(f.fileno())
            break
        except ClientError as err:
            if not err.retryable or attempt == RETRY_ATTEMPTS - 1:
                raise
            time.sleep(max(RETRY_BACKOFF_S * 2**attempt, err.retry_after or 0.0))
    if sha256_file(part) != sha256:
        part.unlink()
        raise ClientError(f"artifact {sha256[:12]} arrived corrupted (sha256 mismatch); run the command again")
    os.replace(part, dest)
    return dest


def bar_callback(progress, description: str, total: int) -> OnBytes | None:
    """A callback that moves a new rich bar to the offset reached; None without a bar."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)
    return lambda offset: progress.update(task, completed=offset)
