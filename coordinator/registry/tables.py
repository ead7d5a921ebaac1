"""The registry's tables, and the states their rows move through.

An expert goes open -> leased -> training -> uploading -> uploaded (every byte committed) ->
verified -> signed. An expired, released or revoked lease sends any unsigned state back to
open and closes the lease's open uploads; excluding an island (revoke --exclude) sends its
signed experts back to open too. An upload is open until it is complete, superseded (a new
upload began for its lease), abandoned (silent too long, or its lease ended) or rejected. An
ensemble is training (its router), then published or failed; a published one is withdrawn
when it names an excluded expert or a lost artifact.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UNSIGNED = ("leased", "training", "uploading", "uploaded", "verified")
ROLES = ("island", "reader")
# What an invite can be for: an identity of a role above, or an operator's login to the
# dashboard (`invite --role operator`), which enrolls nothing.
INVITE_ROLES = (*ROLES, "operator")
# Island columns that count what it sent, by kind: (messages, bytes).
TRAFFIC_COLUMNS = {
    "checkpoint": ("checkpoint_messages", "checkpoint_message_bytes"),
    "heartbeat": ("heartbeats", "heartbeat_bytes"),
    "control": ("control_messages", "control_bytes"),
}


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


class Point(Base):
    """One point of an expert's training curve under one lease, from its heartbeats: the step
    and the loss the island reported (a private island's loss is never recorded)."""

    __tablename__ = "points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lease_id: Mapped[str] = mapped_column(String(32), index=True)
    step: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)


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
    state: Mapped[str] = mapped_column(String(16), default="open")  # open, complete, superseded, abandoned, rejected
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # shard, clustering, autoencoder, expert, router, student
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
