"""The coordinator's registry: islands, invites, experts, leases, uploads, artifacts, ensembles
and an append-only event log, in SQL through SQLAlchemy 2.0.

SQLite in WAL mode (synchronous=FULL, so a committed row survives a crash) is the default; any
SQLAlchemy URL works. Every operation is one transaction. Write transactions of one
coordinator process run one at a time (a lock), so a read-then-write cannot interleave with
another thread's; state changes are also conditional UPDATEs checked by row count. One
coordinator process serves a registry; the command-line tools add invites, revoke islands
and publish ensembles beside it (SQLite's busy timeout queues their writes).

Every state change appends one row to the event log in the same transaction; progress
(heartbeat steps, chunks, router steps) and traffic counters are not events.

Errors carry a ``code`` that the gRPC service maps to a status code; this module knows
nothing of gRPC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ddm_model.errors import DDMError

# open -> leased -> training -> uploading -> uploaded (every byte committed) -> verified -> signed;
# an expired, released or revoked lease sends any unsigned state back to open, and excluding an
# island (revoke --exclude) sends its signed experts back to open too.
UNSIGNED = ("leased", "training", "uploading", "uploaded", "verified")
ROLES = ("island", "reader")
STALE_ASSEMBLY_S = 600.0  # an assembly silent this long is taken to have died
# Island columns that count what it sent, by kind: (messages, bytes).
TRAFFIC_COLUMNS = {
    "checkpoint": ("checkpoint_messages", "checkpoint_message_bytes"),
    "heartbeat": ("heartbeats", "heartbeat_bytes"),
    "control": ("control_messages", "control_bytes"),
}


class RegistryError(DDMError):
    """A request the registry refuses; ``code`` names the kind of refusal."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Revoked(RegistryError):
    """A call by, or on behalf of, an island whose access the coordinator revoked."""

    def __init__(self, reason: str):
        super().__init__("permission_denied", revoked_message(reason))


def revoked_message(reason: str) -> str:
    return (
        f"this island's access was revoked by the coordinator ({reason}); it may no longer lease, upload or"
        " download. Ask the coordinator's operator for a new invite if this is a mistake"
    )


class Base(DeclarativeBase):
    pass


class Island(Base):
    __tablename__ = "islands"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # access ended by `revoke`
    revoked_reason: Mapped[str] = mapped_column(Text, default="")
    last_seen_at: Mapped[float] = mapped_column(Float)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)  # checkpoint bytes committed
    # What the island sent, as serialized messages, by kind (see AuthInterceptor).
    checkpoint_messages: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_message_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    heartbeats: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    control_messages: Mapped[int] = mapped_column(Integer, default=0)
    control_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class Invite(Base):
    __tablename__ = "invites"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    island_id: Mapped[str | None] = mapped_column(ForeignKey("islands.id"), nullable=True)


class Expert(Base):
    __tablename__ = "experts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cluster_id: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="open")
    shard_sha256: Mapped[str] = mapped_column(String(64))
    shard_fingerprint: Mapped[str] = mapped_column(String(64))
    island_id: Mapped[str | None] = mapped_column(ForeignKey("islands.id"), nullable=True)
    step: Mapped[int] = mapped_column(BigInteger, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    entry_json: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    signature: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class Lease(Base):
    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"))
    island_id: Mapped[str] = mapped_column(ForeignKey("islands.id"))
    # active, expired, released, revoked, completed
    state: Mapped[str] = mapped_column(String(16), default="active")
    issued_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Upload(Base):
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    lease_id: Mapped[str] = mapped_column(ForeignKey("leases.id"))
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"))
    island_id: Mapped[str] = mapped_column(ForeignKey("islands.id"))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    committed_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="open")  # open, complete, superseded, rejected
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # shard, clustering, expert, router, student
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    published: Mapped[bool] = mapped_column(Boolean, default=False)  # part of a published ensemble


class Ensemble(Base):
    __tablename__ = "ensembles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # training, published, failed; withdrawn: was published, but names an excluded expert
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    experts: Mapped[int] = mapped_column(Integer)
    router_step: Mapped[int] = mapped_column(BigInteger, default=0)
    router_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    router_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manifest_json: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    signature: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    island_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    expert_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")


def shown(value: str, limit: int = 64) -> str:
    """A caller's string as a refusal may echo it: escaped to one printable line, bounded."""
    text = repr(value[:limit])[1:-1]
    return text + "..." if len(value) > limit else text


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """A lease as handed to an island."""

    lease_id: str
    expert_id: int
    cluster_id: int
    shard_sha256: str
    shard_fingerprint: str
    deadline_at: float
    renewed: bool  # the island already held it


@dataclass(frozen=True)
class NoWork:
    reason: str
    finished: bool


@dataclass(frozen=True)
class Revocation:
    """What `revoke` changed."""

    island_id: str
    reason: str
    leases: list[tuple[str, int]]  # (lease id, expert id) ended
    uploads: list[str]  # open uploads rejected: their staged files are to be deleted
    experts: list[int]  # signed experts reopened (with exclude)
    withdrawn: list[int]  # published ensembles withdrawn (with exclude)
    stopped: list[int]  # ensembles in assembly marked failed (with exclude)


def manifest_checkpoints(manifest_json: bytes | None) -> list[str]:
    """The sha256 of every expert checkpoint a signed ensemble manifest names."""
    if not manifest_json:
        return []
    return [item["entry"]["sha256"] for item in json.loads(manifest_json)["experts"]]


def manifest_artifacts(ensemble: Ensemble) -> set[str]:
    """Every artifact a published ensemble names: its router, its experts and any student."""
    manifest = json.loads(ensemble.manifest_json) if ensemble.manifest_json else {}
    student = manifest.get("student", {}).get("sha256")
    return {ensemble.router_sha256, student, *manifest_checkpoints(ensemble.manifest_json)} - {None}


class Registry:
    def __init__(self, url: str, lease_seconds: float = 120.0):
        self.url = url
        self.lease_seconds = lease_seconds
        try:
            self.engine = create_engine(url, future=True)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise RegistryError("invalid_argument", f"cannot use the database URL {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()

    def create(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise RegistryError("unavailable", f"cannot open the registry database: {exc.orig}") from None
        if self.engine.dialect.name == "sqlite":
            with self.engine.begin() as conn:
                for op in ("UPDATE", "DELETE"):
                    conn.execute(
                        text(
                            f"CREATE TRIGGER IF NOT EXISTS events_no_{op.lower()} BEFORE {op} ON events "
                            "BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END"
                        )
                    )

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._write_lock, self.Session.begin() as session:
            yield session

    @staticmethod
    def log(session: Session, kind: str, island_id: str | None = None, expert_id: int | None = None, **detail) -> None:
        session.add(
            Event(at=time.time(), kind=kind, island_id=island_id, expert_id=expert_id, detail=json.dumps(detail))
        )

    # -- setup ------------------------------------------------------------------------------

    def add_experts(self, rows: list[tuple[int, str, str]]) -> None:
        """(cluster id, shard sha256, shard fingerprint) per expert; expert id = cluster id."""
        now = time.time()
        with self.transaction() as s:
            for cluster_id, shard, fingerprint in rows:
                s.add(
                    Expert(
                        id=cluster_id,
                        cluster_id=cluster_id,
                        state="open",
                        shard_sha256=shard,
                        shard_fingerprint=fingerprint,
                        updated_at=now,
                    )
                )
            self.log(s, "init", experts=len(rows))

    def add_artifact(self, sha256: str, kind: str, size: int, session: Session | None = None) -> None:
        def add(s: Session) -> None:
            if s.get(Artifact, sha256) is None:
                s.add(Artifact(sha256=sha256, kind=kind, size=size, created_at=time.time(), published=False))

        if session is not None:
            add(session)  # the caller's transaction logs the change
        else:
            with self.transaction() as s:
                add(s)
                self.log(s, "artifact", sha256=sha256, artifact=kind, size=size)

    def artifact(self, sha256: str) -> Artifact | None:
        with self.Session() as s:
            return s.get(Artifact, sha256)

    # -- invites and identity ---------------------------------------------------------------

    def create_invite(self, role: str, ttl_seconds: float) -> str:
        if role not in ROLES:
            raise RegistryError("invalid_argument", f"unknown role {role!r}; use {' or '.join(ROLES)}")
        token = "ddm_" + secrets.token_urlsafe(24)
        now = time.time()
        with self.transaction() as s:
            token_hash = _hash(token)
            s.add(Invite(token_hash=token_hash, role=role, created_at=now, expires_at=now + ttl_seconds))
            self.log(s, "invite", role=role, invite=token_hash[:12], expires_at=round(now + ttl_seconds, 3))
        return token

    def redeem_invite(self, token: str, name: str) -> tuple[Island, str]:
        """Trade a token for a new island and its credential ("<id>.<secret>")."""
        now = time.time()
        with self.transaction() as s:
            invite = s.get(Invite, _hash(token))
            if invite is None:
                raise RegistryError("unauthenticated", "invalid invite token; ask the coordinator for a new one")
            if invite.used_at is not None:
                raise RegistryError("unauthenticated", "this invite token was already used; each token enrolls once")
            if invite.expires_at < now:
                raise RegistryError("unauthenticated", "this invite token has expired; ask for a new one")
            island_id = uuid.uuid4().hex[:16]
            secret = secrets.token_urlsafe(32)
            island = Island(
                id=island_id,
                name=name[:200],
                role=invite.role,
                secret_hash=_hash(secret),
                created_at=now,
                last_seen_at=now,
                bytes_received=0,
                checkpoint_messages=0,
                checkpoint_message_bytes=0,
                heartbeats=0,
                heartbeat_bytes=0,
                control_messages=0,
                control_bytes=0,
            )
            s.add(island)
            s.flush()
            claimed = s.execute(
                update(Invite)
                .where(Invite.token_hash == invite.token_hash, Invite.used_at.is_(None))
                .values(used_at=now, island_id=island_id)
            ).rowcount
            if claimed != 1:  # another enrollment won the race: roll the new island back
                raise RegistryError("unauthenticated", "this invite token was already used; each token enrolls once")
            self.log(s, "enroll", island_id=island_id, name=name[:200], role=invite.role, invite=invite.token_hash[:12])
        return island, f"{island_id}.{secret}"

    def authenticate(self, island_id: str, secret: str) -> Island | None:
        """The island this credential names, read afresh on every call (nothing is cached, so a
        revocation holds from the next call on); None if the credential is wrong. A revoked
        island is returned too, with ``revoked_at`` set: the caller refuses it."""
        with self.Session() as s:
            island = s.get(Island, island_id)
        if island is None or not hmac.compare_digest(island.secret_hash, _hash(secret)):
            return None
        return island

    @staticmethod
    def _require_access(s: Session, island_id: str) -> None:
        island = s.get(Island, island_id)
        if island is not None and island.revoked_at is not None:
            raise Revoked(island.revoked_reason)

    def revoke(self, island_id: str, reason: str, exclude: bool = False) -> Revocation:
        """End an island's access, in one transaction: its active leases end (their experts open
        again), its open uploads are rejected (the caller deletes their staged files). With
        ``exclude`` its signed experts open again too, their checkpoints are unpublished, every
        published ensemble that names one is withdrawn and any assembly in progress is stopped."""
        reason = " ".join(reason.split())[:500] or "no reason given"
        now = time.time()
        with self.transaction() as s:
            island = s.get(Island, island_id)
            if island is None:
                raise RegistryError("not_found", f"no island {island_id!r}; `ddm-coordinator status` lists them")
            ended = s.execute(
                update(Island)
                .where(Island.id == island_id, Island.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
            ).rowcount
            if ended != 1:
                s.refresh(island)
                raise RegistryError(
                    "failed_precondition",
                    f"island {island_id} was already revoked at {_iso(island.revoked_at)} ({island.revoked_reason})",
                )
            self.log(s, "revoked", island_id, reason=reason, exclude=exclude)
            leases = s.scalars(select(Lease).where(Lease.island_id == island_id, Lease.state == "active")).all()
            for lease in leases:
                lease.state = "revoked"
                self._reopen(s, lease.expert_id)
                self.log(s, "lease_revoked", island_id, lease.expert_id, lease_id=lease.id)
            uploads = s.scalars(select(Upload).where(Upload.island_id == island_id, Upload.state == "open")).all()
            for upload in uploads:
                upload.state, upload.reason, upload.updated_at = "rejected", "the island's access was revoked", now
                self.log(s, "upload_rejected", island_id, upload.expert_id, upload_id=upload.id, reason="revoked")
            experts, withdrawn, stopped = [], [], []
            if exclude:
                experts, withdrawn, stopped = self._exclude(s, island_id, reason, now)
            return Revocation(
                island_id,
                reason,
                [(lease.id, lease.expert_id) for lease in leases],
                [u.id for u in uploads],
                experts,
                withdrawn,
                stopped,
            )

    def _exclude(self, s: Session, island_id: str, reason: str, now: float) -> tuple[list[int], list[int], list[int]]:
        """Reopen the island's signed experts and withdraw what named their checkpoints."""
        signed = s.scalars(
            select(Expert).where(Expert.island_id == island_id, Expert.state == "signed").order_by(Expert.id)
        ).all()
        excluded = {e.checkpoint_sha256 for e in signed}
        for e in signed:
            self.log(s, "expert_excluded", island_id, e.id, sha256=e.checkpoint_sha256)
            e.state, e.island_id, e.step, e.loss, e.images_per_second = "open", None, 0, None, None
            e.checkpoint_sha256, e.entry_json, e.signature, e.updated_at = None, None, None, now
        if not signed:
            return [], [], []
        ids = ", ".join(str(e.id) for e in signed)
        published = s.scalars(select(Ensemble).where(Ensemble.state == "published")).all()
        withdrawn = [e for e in published if excluded & set(manifest_checkpoints(e.manifest_json))]
        for ensemble in withdrawn:
            ensemble.state, ensemble.updated_at = "withdrawn", now
            ensemble.reason = f"withdrawn: it names expert(s) {ids} of island {island_id}, excluded ({reason})"
            self.log(s, "withdrawn", island_id, ensemble_id=ensemble.id, reason=reason)
        # An artifact stays published only while a published ensemble names it.
        still = set()
        for ensemble in published:
            if ensemble not in withdrawn:
                still |= manifest_artifacts(ensemble)
        named = set(excluded)
        for ensemble in withdrawn:
            named |= manifest_artifacts(ensemble)
        unpublish = sorted(named - still)
        s.execute(update(Artifact).where(Artifact.sha256.in_(unpublish)).values(published=False))
        for sha in unpublish:
            self.log(s, "unpublished", island_id, sha256=sha)
        stopped = s.scalars(select(Ensemble).where(Ensemble.state == "training")).all()
        for ensemble in stopped:
            ensemble.state, ensemble.updated_at = "failed", now
            ensemble.reason = f"stopped: expert(s) {ids} of island {island_id} were excluded while it assembled"
            self.log(s, "assemble_failed", ensemble_id=ensemble.id, reason=ensemble.reason)
        return [e.id for e in signed], [e.id for e in withdrawn], [e.id for e in stopped]

    def add_traffic(self, counts: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Add (messages, bytes) per (island id, kind) to the islands' traffic counters."""
        islands = Island.__table__
        with self.transaction() as s:
            for kind, (count_col, bytes_col) in TRAFFIC_COLUMNS.items():
                rows = [{"island": i, "n": n, "b": b} for (i, k), (n, b) in counts.items() if k == kind]
                if rows:  # one executemany for all islands: a flush costs milliseconds, not a second
                    s.execute(
                        update(islands)
                        .where(islands.c.id == bindparam("island"))
                        .values(
                            {
                                count_col: islands.c[count_col] + bindparam("n"),
                                bytes_col: islands.c[bytes_col] + bindparam("b"),
                            }
                        ),
                        rows,
                    )

    def touch(self, seen: dict[str, float]) -> None:
        """Record when islands were last seen (island id -> unix time)."""
        islands = Island.__table__
        rows = [{"island": i, "at": at} for i, at in seen.items()]
        with self.transaction() as s:
            s.execute(
                update(islands).where(islands.c.id == bindparam("island")).values(last_seen_at=bindparam("at")), rows
            )

    # -- leases -----------------------------------------------------------------------------

    def acquire_lease(self, island_id: str) -> Grant | NoWork:
        """The island's active lease (deadline renewed), else an open expert: preferably one
        this island held before (its local progress survives), else the lowest id."""
        now = time.time()
        deadline = now + self.lease_seconds
        with self.transaction() as s:
            self._require_access(s, island_id)
            self._expire(s, now)
            held = s.scalars(select(Lease).where(Lease.island_id == island_id, Lease.state == "active")).first()
            if held is not None:
                held.deadline_at = deadline
                expert = s.get(Expert, held.expert_id)
                self.log(s, "lease_renewed", island_id, expert.id, lease_id=held.id)
                return self._grant(held, expert, renewed=True)
            previous = select(Lease.expert_id).where(Lease.island_id == island_id)
            # Ids only: loading every open expert as an object costs milliseconds per call at 1000 experts.
            candidates = s.scalars(
                select(Expert.id).where(Expert.state == "open").order_by(Expert.id.in_(previous).desc(), Expert.id)
            ).all()
            for expert_id in candidates:
                taken = s.execute(
                    update(Expert)
                    .where(Expert.id == expert_id, Expert.state == "open")
                    .values(state="leased", island_id=island_id, step=0, loss=None, updated_at=now)
                ).rowcount
                if taken != 1:
                    continue
                expert = s.get(Expert, expert_id)
                lease = Lease(
                    id=uuid.uuid4().hex[:16],
                    expert_id=expert.id,
                    island_id=island_id,
                    state="active",
                    issued_at=now,
                    deadline_at=deadline,
                )
                s.add(lease)
                s.flush()
                self.log(s, "lease", island_id, expert.id, lease_id=lease.id)
                return self._grant(lease, expert, renewed=False)
            states = [e.state for e in s.scalars(select(Expert)).all()]
            if all(state == "signed" for state in states):
                return NoWork("every expert is trained and signed", finished=True)
            return NoWork("every unfinished expert is leased to another island", finished=False)

    @staticmethod
    def _grant(lease: Lease, expert: Expert, renewed: bool) -> Grant:
        return Grant(
            lease.id,
            expert.id,
            expert.cluster_id,
            expert.shard_sha256,
            expert.shard_fingerprint,
            lease.deadline_at,
            renewed,
        )

    def _active_lease(self, s: Session, island_id: str, lease_id: str) -> Lease:
        self._require_access(s, island_id)
        lease = s.get(Lease, lease_id)
        if lease is None or lease.island_id != island_id:
            raise RegistryError("permission_denied", f"lease {shown(lease_id)} is not held by this island")
        if lease.state != "active":
            raise RegistryError(
                "failed_precondition",
                f"lease {lease_id} is {lease.state}; acquire a new lease (the expert may have gone to another island)",
            )
        return lease

    def heartbeat(self, island_id: str, lease_id: str, step: int, loss: float, rate: float) -> float:
        now = time.time()
        with self.transaction() as s:
            self._expire(s, now)
            lease = self._active_lease(s, island_id, lease_id)
            lease.deadline_at = now + self.lease_seconds
            lease.last_heartbeat_at = now
            expert = s.get(Expert, lease.expert_id)
            expert.step, expert.updated_at = step, now
            expert.loss = loss if loss == loss else None  # NaN before the first log window
            expert.images_per_second = rate
            if expert.state == "leased" and step > 0:
                expert.state = "training"
                self.log(s, "training", island_id, expert.id, lease_id=lease_id, step=step)
            return lease.deadline_at

    def release_lease(self, island_id: str, lease_id: str, reason: str) -> None:
        with self.transaction() as s:
            lease = self._active_lease(s, island_id, lease_id)
            lease.state = "released"
            self._reopen(s, lease.expert_id)
            self.log(s, "lease_released", island_id, lease.expert_id, lease_id=lease_id, reason=reason[:500])

    def expire_leases(self) -> int:
        with self.transaction() as s:
            return self._expire(s, time.time())

    def _expire(self, s: Session, now: float) -> int:
        stale = s.scalars(select(Lease).where(Lease.state == "active", Lease.deadline_at < now)).all()
        for lease in stale:
            lease.state = "expired"
            self._reopen(s, lease.expert_id)
            self.log(s, "lease_expired", lease.island_id, lease.expert_id, lease_id=lease.id)
        return len(stale)

    @staticmethod
    def _reopen(s: Session, expert_id: int) -> None:
        s.execute(
            update(Expert)
            .where(Expert.id == expert_id, Expert.state.in_(UNSIGNED))
            .values(state="open", updated_at=time.time())
        )

    # -- uploads ----------------------------------------------------------------------------

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
        now = time.time()
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
        now = time.time()
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

        An expert waiting for such an upload goes back to training under the same lease: its
        island may begin a new upload."""
        now = time.time()
        with self.transaction() as s:
            stale = s.scalars(
                select(Upload).where(Upload.state == "open", Upload.updated_at < now - stale_seconds)
            ).all()
            for upload in stale:
                idle = now - upload.updated_at
                upload.state, upload.reason, upload.updated_at = "abandoned", f"no chunk for {idle:.0f} s", now
                s.execute(
                    update(Expert)
                    .where(Expert.id == upload.expert_id, Expert.state.in_(("uploading", "uploaded")))
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
            upload.state, upload.reason, upload.updated_at = "rejected", reason[:2000], time.time()
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
                .values(state="verified", updated_at=time.time())
            ).rowcount
            if moved != 1:
                raise RegistryError("failed_precondition", "the expert is no longer waiting for this upload")
            self.log(s, "verified", island_id, upload.expert_id, sha256=upload.sha256)

    def register_expert(
        self, island_id: str, upload: Upload, size: int, steps: int, entry_json: bytes, signature: bytes
    ) -> bool:
        """Register a verified, signed checkpoint; True when every expert is now signed."""
        now = time.time()
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

    # -- reading ----------------------------------------------------------------------------

    def experts(self) -> list[Expert]:
        with self.Session() as s:
            return list(s.scalars(select(Expert).order_by(Expert.id)).all())

    def expert(self, expert_id: int) -> Expert:
        with self.Session() as s:
            return s.get(Expert, expert_id)

    def lease(self, lease_id: str) -> Lease | None:
        with self.Session() as s:
            return s.get(Lease, lease_id)

    def readable_by(self, island: Island, sha256: str) -> str | None:
        """Why ``island`` may read an artifact: "published" (any enrolled identity may), "lease"
        (the shard of the island's active lease), or None."""
        with self.Session() as s:
            artifact = s.get(Artifact, sha256)
            if artifact is not None and artifact.published:
                return "published"
            lease = s.scalars(select(Lease).where(Lease.island_id == island.id, Lease.state == "active")).first()
            if lease is not None and s.get(Expert, lease.expert_id).shard_sha256 == sha256:
                return "lease"
            return None

    def still_readable(self, island_id: str, sha256: str, grant: str) -> None:
        """Refuse a download stream's next chunk if the island was revoked meanwhile, or if the
        artifact it reads as published was withdrawn."""
        with self.Session() as s:
            self._require_access(s, island_id)
            if grant == "published" and not s.get(Artifact, sha256).published:
                raise RegistryError(
                    "permission_denied",
                    f"artifact {sha256[:12]} was withdrawn while it downloaded; fetch the current manifest",
                )

    # -- ensembles --------------------------------------------------------------------------

    def start_ensemble(self, experts: int, router_steps: int) -> int:
        now = time.time()
        with self.transaction() as s:
            running = s.scalars(select(Ensemble).where(Ensemble.state == "training")).first()
            if running is not None:
                silent = now - running.updated_at
                if silent < STALE_ASSEMBLY_S:
                    raise RegistryError(
                        "failed_precondition",
                        f"ensemble {running.id} is being assembled (last progress {silent:.0f} s ago); wait for it,"
                        f" or retry once it has been silent for {STALE_ASSEMBLY_S:.0f} s",
                    )
                running.state, running.reason = "failed", f"no progress for {silent:.0f} s; taken over"
                self.log(s, "assemble_failed", ensemble_id=running.id, reason=running.reason)
            ensemble = Ensemble(
                state="training", created_at=now, updated_at=now, experts=experts, router_steps=router_steps, reason=""
            )
            s.add(ensemble)
            s.flush()
            self.log(s, "assemble", ensemble_id=ensemble.id, experts=experts)
            return ensemble.id

    def ensemble_progress(self, ensemble_id: int, step: int) -> None:
        """Record router progress; refuses once the assembly was ended elsewhere (taken over as
        stale, or stopped because one of its experts was excluded), which stops the training."""
        with self.transaction() as s:
            moved = s.execute(
                update(Ensemble)
                .where(Ensemble.id == ensemble_id, Ensemble.state == "training")
                .values(router_step=step, updated_at=time.time())
            ).rowcount
            if moved != 1:
                reason = s.get(Ensemble, ensemble_id).reason
                raise RegistryError("failed_precondition", f"ensemble {ensemble_id} was stopped: {reason}")

    def publish_ensemble(
        self,
        ensemble_id: int,
        router_sha256: str,
        router_size: int,
        expert_sha256s: list[str],
        manifest: bytes,
        signature: bytes,
    ) -> None:
        with self.transaction() as s:
            ensemble = s.get(Ensemble, ensemble_id)
            if ensemble.state != "training":
                raise RegistryError("failed_precondition", f"ensemble {ensemble_id} was stopped: {ensemble.reason}")
            signed = set(s.scalars(select(Expert.checkpoint_sha256).where(Expert.state == "signed")).all())
            gone = [sha[:12] for sha in expert_sha256s if sha not in signed]
            if gone:
                raise RegistryError(
                    "failed_precondition",
                    f"checkpoint(s) {', '.join(gone)} were excluded while the router trained; assemble again",
                )
            self.add_artifact(router_sha256, "router", router_size, session=s)
            s.flush()
            s.execute(
                update(Artifact).where(Artifact.sha256.in_([router_sha256, *expert_sha256s])).values(published=True)
            )
            ensemble.state, ensemble.updated_at = "published", time.time()
            ensemble.router_sha256, ensemble.manifest_json, ensemble.signature = router_sha256, manifest, signature
            ensemble.router_step = ensemble.router_steps
            self.log(s, "published", ensemble_id=ensemble_id, router=router_sha256, experts=len(expert_sha256s))

    def fail_ensemble(self, ensemble_id: int, reason: str) -> None:
        """Mark an assembly failed (one already ended, e.g. stopped by `revoke --exclude`, stays as it is)."""
        with self.transaction() as s:
            failed = s.execute(
                update(Ensemble)
                .where(Ensemble.id == ensemble_id, Ensemble.state == "training")
                .values(state="failed", reason=reason[:2000], updated_at=time.time())
            ).rowcount
            if failed:
                self.log(s, "assemble_failed", ensemble_id=ensemble_id, reason=reason[:500])

    def publish_student(self, base_id: int, sha256: str, size: int, sign: Callable[[int], tuple[bytes, bytes]]) -> int:
        """Publish a new version of ensemble ``base_id`` (router and experts unchanged) that
        adds its distilled student; ``sign(new id)`` returns (manifest, signature). Refused if
        another ensemble was published or is being assembled since, so the newest published
        ensemble always has the newest experts."""
        now = time.time()
        with self.transaction() as s:
            published = select(Ensemble).where(Ensemble.state == "published")
            latest = s.scalars(published.order_by(Ensemble.id.desc())).first()
            if latest is None or latest.id != base_id:
                raise RegistryError(
                    "failed_precondition",
                    f"ensemble {latest.id if latest else None} was published while distilling ensemble {base_id};"
                    " run distill again to distill the newer one",
                )
            running = s.scalars(select(Ensemble).where(Ensemble.state == "training")).first()
            if running is not None and now - running.updated_at < STALE_ASSEMBLY_S:
                raise RegistryError(
                    "failed_precondition",
                    f"ensemble {running.id} is being assembled; run distill again once it is published",
                )
            self.add_artifact(sha256, "student", size, session=s)
            s.flush()
            s.execute(update(Artifact).where(Artifact.sha256 == sha256).values(published=True))
            version = Ensemble(
                state="published",
                created_at=now,
                updated_at=now,
                experts=latest.experts,
                router_step=latest.router_step,
                router_steps=latest.router_steps,
                router_sha256=latest.router_sha256,
                reason="",
            )
            s.add(version)
            s.flush()
            version.manifest_json, version.signature = sign(version.id)
            self.log(s, "distilled", ensemble_id=version.id, base_ensemble_id=base_id, student=sha256)
            return version.id

    def latest_published(self) -> Ensemble | None:
        with self.Session() as s:
            return s.scalars(select(Ensemble).where(Ensemble.state == "published").order_by(Ensemble.id.desc())).first()

    def snapshot(self) -> dict:
        """Every table but the event log, as plain rows: what status shows and tests compare."""
        with self.Session() as s:

            def rows(model):
                return [
                    {c.name: getattr(r, c.name) for c in model.__table__.columns}
                    for r in s.scalars(select(model)).all()
                ]

            return {
                "islands": rows(Island),
                "invites": rows(Invite),
                "experts": rows(Expert),
                "leases": rows(Lease),
                "uploads": rows(Upload),
                "artifacts": rows(Artifact),
                "ensembles": rows(Ensemble),
            }

    def events(self, limit: int | None = None, island_id: str | None = None, kind: str | None = None) -> list[Event]:
        """The event log, oldest first; the last ``limit`` events matching the filters."""
        query = select(Event)
        if island_id is not None:
            query = query.where(Event.island_id == island_id)
        if kind is not None:
            query = query.where(Event.kind == kind)
        with self.Session() as s:
            if limit is None:
                return list(s.scalars(query.order_by(Event.id)).all())
            return list(reversed(s.scalars(query.order_by(Event.id.desc()).limit(limit)).all()))


def _iso(ts: float | None) -> str:
    return "" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
