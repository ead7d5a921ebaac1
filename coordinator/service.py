"""The coordinator's gRPC service: enrollment, leases, heartbeats, uploads with validation and
signing, the manifest, downloads and status.

Each RPC is a thin translation between protocol messages and the registry, the store and
the signing key. Refusals use gRPC status codes with messages that say what to do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol import ddm_pb2 as pb
from protocol import ddm_pb2_grpc
from protocol.limits import (
    MAX_CHUNK_BYTES,
    MAX_DOWNLOADS_PER_ISLAND,
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    MAX_UPLOADS,
    MAX_UPLOADS_PER_ISLAND,
    MIN_CHUNK_BYTES,
    MiB,
)
from protocol.trust import ENTRY_FORMAT, is_sha256

from .bootstrap import lease_train_config
from .faults import fault_point
from .home import CoordinatorConfig, Home
from .keys import SigningKey
from .refusals import Refused, refuse, rpc, streaming_rpc
from .registry import Grant, Registry, Revoked, shown
from .status import build_status
from .store import Store
from .validate import Validator

log = logging.getLogger("ddm.coordinator")


class Slots:
    """Streams of one kind open at once: at most ``per_island`` per identity, ``total`` in all."""

    def __init__(self, what: str, per_island: int, total: int | None = None):
        self.what = what
        self.per_island = per_island
        self.total = total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def open(self, island_id: str | None = None) -> int:
        with self._lock:
            return self._open[island_id] if island_id else sum(self._open.values())

    @contextmanager
    def hold(self, island_id: str) -> Iterator[None]:
        with self._lock:
            if self.total is not None and sum(self._open.values()) >= self.total:
                raise Refused(
                    "resource_exhausted",
                    f"the coordinator is serving {self.total} {self.what}s at once; retry in a few seconds",
                    retry_after=2.0,
                )
            if self._open[island_id] >= self.per_island:
                raise Refused(
                    "resource_exhausted",
                    f"at most {self.per_island} {self.what}s at once per identity; finish one first",
                )
            self._open[island_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[island_id] -= 1
                if not self._open[island_id]:
                    del self._open[island_id]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class CoordinatorService(ddm_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        home: Home,
        config: CoordinatorConfig,
        registry: Registry,
        store: Store,
        key: SigningKey,
        on_all_signed: Callable[[], None] = lambda: None,
    ):
        self.home = home
        self.config = config
        self.registry = registry
        self.store = store
        self.key = key
        self.on_all_signed = on_all_signed
        self.validator = Validator(home, config)
        self.downloads = Slots("download", MAX_DOWNLOADS_PER_ISLAND)
        self.uploads = Slots("upload stream", MAX_UPLOADS_PER_ISLAND, MAX_UPLOADS)

    # -- identity and leases ------------------------------------------------------------------

    @rpc
    def Enroll(self, request, context):
        island, credential = self.registry.redeem_invite(request.token, request.name)
        log.info("enrolled island %s (%s) as %s", island.id, shown(request.name, MAX_NAME_CHARS), island.role)
        return pb.EnrollReply(
            island_id=island.id,
            credential=credential,
            role=island.role,
            coordinator_public_key=self.key.public_bytes,
            key_fingerprint=self.key.fingerprint,
        )

    @rpc
    def AcquireLease(self, request, context):
        grant = self.registry.acquire_lease(context.island.id)
        if not isinstance(grant, Grant):
            return pb.AcquireLeaseReply(
                no_work=pb.NoWork(
                    reason=grant.reason, finished=grant.finished, retry_after_s=int(self.config.heartbeat_seconds)
                )
            )
        log.info(
            "%s lease %s: expert %d to island %s",
            "renewed" if grant.renewed else "granted",
            grant.lease_id,
            grant.expert_id,
            context.island.id,
        )
        lease = self.lease_message(grant, own_copy=bool(request.local_dataset))
        return pb.AcquireLeaseReply(lease=lease)

    def lease_message(self, grant: Grant, own_copy: bool = False) -> pb.Lease:
        """The lease as an island receives it: model and train config, deadline, and its data
        (nothing in siloed mode; an index list for an island with its own copy of the dataset,
        else the cluster's shard)."""
        lease = pb.Lease(
            lease_id=grant.lease_id,
            expert_id=grant.expert_id,
            cluster_id=grant.cluster_id,
            model_config_json=json.dumps(self.config.model),
            train_config_json=json.dumps(lease_train_config(self.config, grant.expert_id).to_dict()),
            deadline_unix_ms=int(grant.deadline_at * 1000),
            heartbeat_interval_s=max(1, int(self.config.heartbeat_seconds)),
            shard_fingerprint=grant.shard_fingerprint,
            require_dp_epsilon=self.config.require_dp_epsilon or 0.0,
        )
        if self.config.autoencoder:  # a latent home: the island encodes its data with this one
            described = self.config.autoencoder
            lease.autoencoder.CopyFrom(pb.Shard(sha256=described["sha256"], size=described["size"]))
        if self.validator.clustering is None:
            pass  # siloed: the island's own data is its cluster; the lease names no data at all
        elif own_copy:
            lease.index_list.CopyFrom(
                pb.IndexList(
                    dataset=self.config.dataset,
                    dataset_fingerprint=self.config.dataset_fingerprint,
                    ids=self.validator.training_ids(grant.cluster_id).tolist(),
                )
            )
        else:
            artifact = self.registry.artifact(grant.shard_sha256)
            lease.shard.CopyFrom(pb.Shard(sha256=grant.shard_sha256, size=artifact.size))
        return lease

    @rpc
    def Heartbeat(self, request, context):
        deadline = self.registry.buffered_heartbeat(
            context.island.id, request.lease_id, request.step, request.loss, request.images_per_second
        )
        return pb.HeartbeatReply(deadline_unix_ms=int(deadline * 1000))

    @rpc
    def ReleaseLease(self, request, context):
        self.registry.release_lease(context.island.id, request.lease_id, request.reason)
        reason = shown(request.reason, MAX_REASON_CHARS)
        log.info("island %s released lease %s: %s", context.island.id, request.lease_id, reason)
        return pb.ReleaseLeaseReply()

    # -- uploads --------------------------------------------------------------------------------

    @staticmethod
    def _state(upload) -> pb.UploadState:
        return pb.UploadState(
            upload_id=upload.id,
            committed_offset=upload.committed_offset,
            size=upload.size,
            sha256=upload.sha256,
            state=upload.state,
        )

    @rpc
    def BeginUpload(self, request, context):
        return self._state(self.begin_upload(context.island.id, request.lease_id, request.size, request.sha256))

    @rpc
    def UploadChunks(self, request_iterator: Iterator[pb.UploadChunk], context):
        with self.uploads.hold(context.island.id):
            return self._state(self.receive(context.island.id, request_iterator))

    @rpc
    def QueryUpload(self, request, context):
        return self._state(self.registry.upload_for(context.island.id, request.upload_id))

    @rpc
    def CompleteUpload(self, request, context):
        return self.complete_upload(context.island.id, request.upload_id)

    # The upload path itself, for an island id: the RPCs above and the Flower ServerApp
    # (coordinator/flower_server.py) both go through it. A refusal raises Refused or RegistryError.

    def begin_upload(self, island_id: str, lease_id: str, size: int, sha256: str):
        if not is_sha256(sha256):
            raise Refused("invalid_argument", "sha256 must be 64 lowercase hex characters")
        free = shutil.disk_usage(self.store.staging).free
        if free < size + self.config.disk_reserve_bytes:
            raise Refused(
                "resource_exhausted",
                f"the coordinator's disk is full: {free / MiB:.0f} MiB free, an upload of {size / MiB:.1f} MiB"
                f" needs {self.config.disk_reserve_bytes / MiB:.0f} MiB to spare; try again once its operator has"
                " freed space",
            )
        upload, superseded = self.registry.begin_upload(
            island_id,
            lease_id,
            size,
            sha256,
            self.config.max_upload_bytes,
            expert_quota=self.config.expert_upload_quota(),
        )
        for old in superseded:
            self.store.discard_staged(old)
        return upload

    def receive(self, island_id: str, chunks: Iterable[pb.UploadChunk]):
        """Commit a stream of chunks in order; returns the upload as last committed."""
        quota = self.config.expert_upload_quota()
        upload = None
        for chunk in chunks:
            if upload is None or upload.id != chunk.upload_id:
                upload = self.registry.upload_for(island_id, chunk.upload_id)
            if upload.state != "open":
                raise Refused("failed_precondition", f"upload {upload.id} is {upload.state}; begin a new upload")
            n = len(chunk.data)
            end = chunk.offset + n
            if chunk.offset != upload.committed_offset:
                raise Refused(
                    "failed_precondition",
                    f"chunk at offset {chunk.offset} but the committed offset is {upload.committed_offset};"
                    " query the upload and resume from there",
                )
            if n == 0 or n > MAX_CHUNK_BYTES or (n < MIN_CHUNK_BYTES and end != upload.size):
                raise Refused("invalid_argument", f"chunks must be 1 to 4 MiB (the last may be shorter), got {n}")
            if end > upload.size:
                raise Refused("invalid_argument", f"chunk ends at {end}, past the declared size {upload.size}")
            if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
                raise Refused("data_loss", f"chunk at offset {chunk.offset} does not match its checksum; resend it")
            self.registry.require_expert_quota(island_id, upload.expert_id, n, quota)  # before a byte is written
            self.store.write_chunk(upload.id, chunk.offset, chunk.data)
            fault_point("upload.chunk_written")
            try:
                upload.committed_offset = self.registry.commit_chunk(
                    island_id, upload, chunk.offset, n, expert_quota=quota
                )
            except Revoked:  # revoked while the stream was open: its bytes go, as `revoke` said
                self.store.discard_staged(upload.id)
                raise
            fault_point("upload.chunk_committed")
        if upload is None:
            raise Refused("invalid_argument", "an upload stream needs at least one chunk")
        return upload

    def complete_upload(self, island_id: str, upload_id: str) -> pb.CompleteUploadReply:
        """Validate, score (shared mode), store, sign and register a fully received upload."""
        # One completion at a time, across every process serving the home: a completion retried
        # through another process waits for the first, then finds its signed entry.
        with self.registry.exclusive("complete"):
            upload = self.registry.upload_for(island_id, upload_id)
            expert = self.registry.expert(upload.expert_id)
            if upload.state == "complete" and expert.checkpoint_sha256 == upload.sha256:
                # Asked again (the reply was lost): the same signed entry, nothing redone.
                return pb.CompleteUploadReply(
                    sha256=upload.sha256, entry_json=expert.entry_json, signature=expert.signature
                )
            if upload.state != "open":
                raise Refused(
                    "failed_precondition",
                    f"upload {upload.id} is {upload.state} ({upload.reason}); begin a new upload",
                )
            self.registry.require_active_lease(island_id, upload)
            if upload.committed_offset != upload.size:
                raise Refused(
                    "failed_precondition",
                    f"only {upload.committed_offset} of {upload.size} bytes are committed; send the rest first",
                )
            path = self._received(upload)
            reason, provenance = self.validator.validate(path, upload, expert)
            if reason is not None:
                self.registry.reject_upload(upload.id, reason)
                self.store.discard_staged(upload.id)
                # The reason may quote names from the file: escaped to one line and bounded.
                raise Refused("invalid_argument", f"checkpoint rejected: {shown(reason, 400)}; fix it and upload again")
            if path != self.store.path(upload.sha256):
                self.store.add_file(path, move=True, digest=upload.sha256)
            fault_point("complete.stored")
            self.registry.mark_verified(island_id, upload)
            fault_point("complete.verified")
            entry = {
                "format": ENTRY_FORMAT,
                "expert_id": expert.id,
                "cluster_id": expert.cluster_id,
                "island_id": island_id,
                "sha256": upload.sha256,
                "size": upload.size,
                **provenance,
                "signed_at": utc_now(),
            }
            entry_json, signature = self.key.sign(entry)
            fault_point("complete.signed")
            all_signed = self.registry.register_expert(
                island_id, upload, upload.size, provenance["steps"], entry_json, signature
            )
        log.info("signed expert %d from island %s (%s)", expert.id, island_id, upload.sha256[:12])
        if all_signed:
            self.on_all_signed()
        return pb.CompleteUploadReply(sha256=upload.sha256, entry_json=entry_json, signature=signature)

    def _received(self, upload) -> Path:
        """The uploaded file: in staging, or already in the store if an earlier completion
        stopped (a crash, an error) after moving it there."""
        if self.store.staging_path(upload.id).exists():
            return self.store.seal_staged(upload.id, upload.size)
        if self.store.has(upload.sha256):
            return self.store.path(upload.sha256)
        self.registry.reject_upload(upload.id, "its staged bytes are gone")
        raise Refused("failed_precondition", f"upload {upload.id} lost its staged bytes; begin a new upload")

    def clean_staging(self) -> bool:
        """Abandon open uploads with no chunk for ``stale_upload_seconds`` and delete every staged
        file that no open upload owns. Returns False, having done nothing, while a completion is
        running (the next round does it)."""
        with self.registry.exclusive("complete", wait=False) as held:
            if not held:
                return False
            abandoned = self.registry.abandon_stale_uploads(self.config.stale_upload_seconds)
            names = self.store.staged()  # listed before the open uploads are read: a newer file is not in it
            owned = self.registry.open_upload_ids()
            unowned = [name for name in names if name not in owned]
            self.store.discard_unowned(unowned)
        if abandoned:
            stale = self.config.stale_upload_seconds
            log.info("abandoned %d upload(s) with no chunk for %.0f s", len(abandoned), stale)
        if unowned:
            log.info("deleted %d staged file(s) that no open upload owns", len(unowned))
        return True

    # -- the ensemble ---------------------------------------------------------------------------

    @rpc
    def GetManifest(self, request, context):
        ensemble = self.registry.latest_published()
        if ensemble is None:
            refuse(context, "not_found", "no ensemble is published yet; wait until every expert is signed")
        return pb.SignedManifest(
            manifest_json=ensemble.manifest_json,
            signature=ensemble.signature,
            coordinator_public_key=self.key.public_bytes,
        )

    @streaming_rpc
    def Download(self, request, context):
        sha = request.sha256
        if not is_sha256(sha) or not self.store.has(sha):
            refuse(context, "not_found", f"no artifact {sha[:64]!r}")
        grant = self.registry.readable_by(context.island, sha)
        if grant is None:
            refuse(context, "permission_denied", "this artifact is neither published nor this island's lease data")
        size = self.store.path(sha).stat().st_size
        if not 0 <= request.offset <= size:
            refuse(context, "out_of_range", f"offset {request.offset} is outside the artifact's {size} bytes")
        with self.downloads.hold(context.island.id):
            for offset, data, total in self.store.read(sha, request.offset, MAX_CHUNK_BYTES):
                # Checked again before every chunk: a revocation or a withdrawal ends the stream.
                self.registry.still_readable(context.island.id, sha, grant)
                yield pb.DownloadChunk(offset=offset, data=data, size=total)

    @rpc
    def Status(self, request, context):
        report = build_status(self.home, self.config, self.registry, self.key.fingerprint)
        report["coordinator"].pop("home")  # a local path is no business of the caller's
        return pb.StatusReply(json=json.dumps(report))
