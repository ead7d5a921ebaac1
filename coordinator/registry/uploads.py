"""Uploads: an island's finished checkpoint, sent in chunks, resumable by offset.

A lease has at most one open upload. Each chunk is durably in the staging file before its
row moves the committed offset; once every byte is committed the service validates the file,
moves it into the store, marks the expert verified, signs it and registers it. A quota bounds
what an island may send per expert over all its uploads.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .core import RegistryError, shown
from .ensembles import Ensembles
from .leases import Leases
from .tables import UNSIGNED, Expert, Island, Upload


class Uploads(Leases, Ensembles):
    def begin_upload(
        self, island_id: str, lease_id: str, size: int, sha256: str, quota: int, expert_quota: int | None = None
    ) -> tuple[Upload, list[str]]:
        """The open upload of this lease for this file if there is one (resume), else a new one.

        A lease has at most one open upload: any other is marked superseded, and its id is
        returned so that its staged bytes can be deleted. ``expert_quota`` bounds the bytes this
        island may send for the expert over all its uploads, this one's remaining bytes included.
        """
        if size <= 0:
            raise RegistryError("invalid_argument", f"upload size must be positive, got {size}")
        if size > quota:
            raise RegistryError(
                "resource_exhausted", f"upload of {size} bytes exceeds this expert's quota of {quota} bytes"
            )
        now = self.clock.now()
        with self.transaction() as s:
            lease = self._active_lease(s, island_id, lease_id)
            lease.deadline_at = now + self.lease_seconds
            open_uploads = s.scalars(
                select(Upload).where(
                    Upload.island_id == island_id, Upload.expert_id == lease.expert_id, Upload.state == "open"
                )
            ).all()
            keep = next((u for u in open_uploads if u.sha256 == sha256 and u.size == size), None)
            if expert_quota is not None:
                remaining = size - (keep.committed_offset if keep is not None else 0)
                self._require_expert_quota(s, island_id, lease.expert_id, remaining, expert_quota)
            superseded = [u for u in open_uploads if u is not keep]
            for old in superseded:
                old.state, old.reason, old.updated_at = "superseded", "a new upload began for this lease", now
                self.log(s, "upload_superseded", island_id, lease.expert_id, upload_id=old.id)
            s.execute(
                update(Expert)
                .where(Expert.id == lease.expert_id, Expert.state.in_(UNSIGNED))
                .values(state="uploaded" if keep is not None and keep.committed_offset == size else "uploading")
            )
            if keep is not None:
                keep.lease_id, keep.updated_at = lease.id, now
                self.log(
                    s, "upload_resumed", island_id, lease.expert_id, upload_id=keep.id, offset=keep.committed_offset
                )
                return keep, [u.id for u in superseded]
            upload = Upload(
                id=uuid.uuid4().hex[:16],
                lease_id=lease.id,
                expert_id=lease.expert_id,
                island_id=island_id,
                size=size,
                sha256=sha256,
                committed_offset=0,
                chunks=0,
                bytes_received=0,
                state="open",
                reason="",
                created_at=now,
                updated_at=now,
            )
            s.add(upload)
            s.flush()
            self.log(s, "upload_begin", island_id, lease.expert_id, upload_id=upload.id, size=size, sha256=sha256)
            return upload, [u.id for u in superseded]

    def upload_for(self, island_id: str, upload_id: str) -> Upload:
        with self.Session() as s:
            upload = s.get(Upload, upload_id)
        if upload is None or upload.island_id != island_id:
            raise RegistryError("not_found", f"no upload {shown(upload_id)} for this island")
        return upload

    @staticmethod
    def _expert_bytes(s: Session, island_id: str, expert_id: int) -> int:
        """Checkpoint bytes this island has sent for this expert, over all its uploads."""
        total = s.scalar(
            select(func.sum(Upload.bytes_received)).where(Upload.island_id == island_id, Upload.expert_id == expert_id)
        )
        return int(total or 0)

    def _require_expert_quota(self, s: Session, island_id: str, expert_id: int, more: int, quota: int) -> None:
        received = self._expert_bytes(s, island_id, expert_id)
        if received + more > quota:
            raise RegistryError(
                "resource_exhausted",
                f"this island has sent {received} bytes for expert {expert_id}; {more} more would pass the quota of"
                f" {quota} bytes per expert over all its uploads; ask the coordinator's operator",
            )

    def require_expert_quota(self, island_id: str, expert_id: int, more: int, quota: int) -> None:
        """Refuse if ``more`` bytes for the expert would pass the island's quota (changes nothing)."""
        with self.Session() as s:
            self._require_expert_quota(s, island_id, expert_id, more, quota)

    def commit_chunk(
        self, island_id: str, upload: Upload, offset: int, length: int, expert_quota: int | None = None
    ) -> int:
        """Record that bytes [offset, offset + length) are durably in the staging file."""
        now = self.clock.now()
        with self.transaction() as s:
            lease = self._active_lease(s, island_id, upload.lease_id)
            if expert_quota is not None:
                self._require_expert_quota(s, island_id, upload.expert_id, length, expert_quota)
            moved = s.execute(
                update(Upload)
                .where(Upload.id == upload.id, Upload.committed_offset == offset, Upload.state == "open")
                .values(
                    committed_offset=offset + length,
                    chunks=Upload.chunks + 1,
                    bytes_received=Upload.bytes_received + length,
                    updated_at=now,
                )
            ).rowcount
            if moved != 1:
                current = s.get(Upload, upload.id)
                if current.state != "open":
                    raise RegistryError(
                        "failed_precondition", f"upload {upload.id} is {current.state}; begin a new upload"
                    )
                raise RegistryError(
                    "failed_precondition",
                    f"chunk at offset {offset} does not follow the committed offset {current.committed_offset}",
                )
            lease.deadline_at = now + self.lease_seconds
            s.execute(
                update(Island).where(Island.id == island_id).values(bytes_received=Island.bytes_received + length)
            )
            if offset + length == upload.size:
                s.execute(
                    update(Expert)
                    .where(Expert.id == upload.expert_id, Expert.state == "uploading")
                    .values(state="uploaded", updated_at=now)
                )
                self.log(s, "uploaded", island_id, upload.expert_id, upload_id=upload.id, sha256=upload.sha256)
            return offset + length

    def abandon_stale_uploads(self, stale_seconds: float) -> list[str]:
        """Mark open uploads with no chunk for ``stale_seconds`` abandoned; their ids.

        An expert its island still holds goes back to training under the same lease: the island
        may begin a new upload. (An upload whose lease ended was closed with it.)"""
        now = self.clock.now()
        with self.transaction() as s:
            stale = s.scalars(
                select(Upload).where(Upload.state == "open", Upload.updated_at < now - stale_seconds)
            ).all()
            for upload in stale:
                idle = now - upload.updated_at
                upload.state, upload.reason, upload.updated_at = "abandoned", f"no chunk for {idle:.0f} s", now
                s.execute(  # only while its own island holds the expert (another may have taken it since)
                    update(Expert)
                    .where(
                        Expert.id == upload.expert_id,
                        Expert.island_id == upload.island_id,
                        Expert.state.in_(("uploading", "uploaded")),
                    )
                    .values(state="training", updated_at=now)
                )
                self.log(s, "upload_abandoned", upload.island_id, upload.expert_id, upload_id=upload.id, idle_s=idle)
            return [u.id for u in stale]

    def open_upload_ids(self) -> set[str]:
        with self.Session() as s:
            return set(s.scalars(select(Upload.id).where(Upload.state == "open")).all())

    def reject_upload(self, upload_id: str, reason: str) -> None:
        """Record why an upload was refused; the expert, its lease and the store stay as they were."""
        with self.transaction() as s:
            upload = s.get(Upload, upload_id)
            upload.state, upload.reason, upload.updated_at = "rejected", reason[:2000], self.clock.now()
            self.log(s, "upload_rejected", upload.island_id, upload.expert_id, upload_id=upload_id, reason=reason[:500])

    def require_active_lease(self, island_id: str, upload: Upload) -> None:
        """Refuse unless the upload's lease is active (changes nothing)."""
        with self.Session() as s:
            self._active_lease(s, island_id, upload.lease_id)

    def mark_verified(self, island_id: str, upload: Upload) -> None:
        """The checkpoint passed every check and is in the store."""
        with self.transaction() as s:
            self._active_lease(s, island_id, upload.lease_id)
            moved = s.execute(
                update(Expert)
                .where(Expert.id == upload.expert_id, Expert.state.in_(("uploaded", "verified")))
                .values(state="verified", updated_at=self.clock.now())
            ).rowcount
            if moved != 1:
                raise RegistryError("failed_precondition", "the expert is no longer waiting for this upload")
            self.log(s, "verified", island_id, upload.expert_id, sha256=upload.sha256)

    def register_expert(
        self, island_id: str, upload: Upload, size: int, steps: int, entry_json: bytes, signature: bytes
    ) -> bool:
        """Register a verified, signed checkpoint; True when every expert is now signed."""
        now = self.clock.now()
        with self.transaction() as s:
            lease = self._active_lease(s, island_id, upload.lease_id)
            self.add_artifact(upload.sha256, "expert", size, session=s)
            signed = s.execute(
                update(Expert)
                .where(Expert.id == upload.expert_id, Expert.state == "verified")
                .values(
                    state="signed",
                    island_id=island_id,
                    step=steps,
                    checkpoint_sha256=upload.sha256,
                    entry_json=entry_json,
                    signature=signature,
                    updated_at=now,
                )
            ).rowcount
            if signed != 1:
                raise RegistryError("failed_precondition", "the expert is no longer waiting for this upload")
            s.execute(update(Upload).where(Upload.id == upload.id).values(state="complete", updated_at=now))
            lease.state = "completed"
            self.log(s, "signed", island_id, upload.expert_id, sha256=upload.sha256)
            unsigned = s.scalar(select(func.count()).select_from(Expert).where(Expert.state != "signed"))
            return unsigned == 0
