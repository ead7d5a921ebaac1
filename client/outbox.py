"""The island's outbox: a finished checkpoint is uploaded, and once the coordinator has signed
exactly that file it is kept under signed/ with its entry and signature.

While an upload is under way its id is noted beside the checkpoint (``*.upload.json``), so that
an island stopped between the coordinator's signature and its own bookkeeping finishes it at its
next start (``settle_outbox``) instead of leaving the file in the outbox and no signed copy.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from rich.console import Console

from ddm_model.fsutil import atomic_path
from ddm_model.progress import transfer_bar
from protocol import ddm_pb2 as pb
from protocol.trust import TrustError, sha256_file, verify_signature

from .connection import ClientError, Connection
from .state import Identity, IslandState
from .transfer import bar_callback, upload_checkpoint

console = Console(stderr=True)


def upload_lease(conn: Connection, lease: pb.Lease, identity: Identity, checkpoint: Path, state: IslandState) -> str:
    """Upload, then check that the coordinator signed exactly this file; returns its sha256."""
    record = upload_record(checkpoint)
    with transfer_bar() as bar:
        size = checkpoint.stat().st_size
        report = upload_checkpoint(
            conn,
            lease.lease_id,
            checkpoint,
            on_bytes=bar_callback(bar, f"upload expert {lease.expert_id}", size),
            on_begin=lambda upload_id: write_record(record, upload_id, lease.expert_id),
        )
    if report.resumed_from:
        console.print(f"upload resumed from committed offset {report.resumed_from}", highlight=False)
    keep_signed(state, identity, lease.expert_id, checkpoint, report.sha256, report.reply)
    record.unlink(missing_ok=True)
    return report.sha256


def upload_record(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".upload.json")


def write_record(record: Path, upload_id: str, expert_id: int) -> None:
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"upload_id": upload_id, "expert_id": expert_id}))


def keep_signed(
    state: IslandState, identity: Identity, expert_id: int, checkpoint: Path, digest: str, reply: pb.CompleteUploadReply
) -> None:
    """Check that the coordinator signed exactly this file for this expert, then keep the file,
    its entry and signature under signed/ and drop the training state."""
    verify_signature(identity.public_key, reply.entry_json, reply.signature, f"expert {expert_id}'s entry")
    entry = json.loads(reply.entry_json)
    if entry.get("sha256") != digest or entry.get("expert_id") != expert_id:
        raise TrustError("the coordinator signed an entry for another file or expert")
    state.signed.mkdir(parents=True, exist_ok=True)
    kept = state.signed / f"expert-{expert_id}.safetensors"
    if checkpoint != kept:
        os.replace(checkpoint, kept)
    (state.signed / f"expert-{expert_id}.entry.json").write_bytes(reply.entry_json)
    (state.signed / f"expert-{expert_id}.sig").write_text(base64.b64encode(reply.signature).decode())
    shutil.rmtree(state.work(expert_id), ignore_errors=True)


def settle_outbox(conn: Connection, identity: Identity, state: IslandState) -> list[int]:
    """Finish the bookkeeping of uploads the coordinator completed while this island was
    stopped before it saw the reply: ask for the signed entry again (CompleteUpload answers a
    completed upload with the same entry) and keep it. An upload still open is left to the
    next lease of its expert, which resumes it. Returns the experts settled."""
    settled = []
    for record in sorted(state.outbox.glob("*.upload.json")) if state.outbox.is_dir() else []:
        try:
            noted = json.loads(record.read_text())
            upload_id, expert_id = str(noted["upload_id"]), int(noted["expert_id"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)  # unreadable: the next lease uploads the file afresh
            continue
        checkpoint = record.with_name(record.name.removesuffix(".upload.json") + ".safetensors")
        if not checkpoint.exists():
            checkpoint = state.signed / f"expert-{expert_id}.safetensors"  # moved, then stopped
        try:
            upload = conn.unary("QueryUpload", pb.QueryUploadRequest(upload_id=upload_id))
            if upload.state != "complete":
                if upload.state != "open":
                    record.unlink(missing_ok=True)
                continue
            reply = conn.unary("CompleteUpload", pb.CompleteUploadRequest(upload_id=upload_id))
        except ClientError as err:
            if err.retryable:
                raise
            record.unlink(missing_ok=True)  # the coordinator no longer knows it as this island's
            continue
        if not checkpoint.exists() or sha256_file(checkpoint) != upload.sha256:
            record.unlink(missing_ok=True)
            continue
        keep_signed(state, identity, expert_id, checkpoint, upload.sha256, reply)
        record.unlink(missing_ok=True)
        console.print(
            f"expert {expert_id}: kept its signed entry from an upload completed while stopped", highlight=False
        )
        settled.append(expert_id)
    return settled
