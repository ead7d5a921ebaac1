"""Identities: invites, enrollment, credentials, revocation and what each island sent.

An invite token enrolls once, before it expires, as an island (trains experts) or a reader
(only downloads); only hashes of tokens and credentials are stored. `revoke` ends an island's
access at once; with ``exclude`` it also takes back what the island contributed.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update

from .core import RegistryError, iso, secret_hash
from .ensembles import Ensembles
from .leases import Leases
from .tables import INVITE_ROLES, ROLES, TRAFFIC_COLUMNS, Invite, Island, Lease, Upload


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


class Identities(Leases, Ensembles):
    def create_invite(self, role: str, ttl_seconds: float) -> str:
        if role not in INVITE_ROLES:
            raise RegistryError("invalid_argument", f"unknown role {role!r}; use {', '.join(INVITE_ROLES)}")
        token = "ddm_" + secrets.token_urlsafe(24)
        now = self.clock.now()
        with self.transaction() as s:
            token_hash = secret_hash(token)
            s.add(Invite(token_hash=token_hash, role=role, created_at=now, expires_at=now + ttl_seconds))
            self.log(s, "invite", role=role, invite=token_hash[:12], expires_at=round(now + ttl_seconds, 3))
        return token

    def redeem_invite(self, token: str, name: str) -> tuple[Island, str]:
        """Trade a token for a new island and its credential ("<id>.<secret>")."""
        now = self.clock.now()
        with self.transaction() as s:
            invite = s.get(Invite, secret_hash(token))
            if invite is None:
                raise RegistryError("unauthenticated", "invalid invite token; ask the coordinator for a new one")
            if invite.role not in ROLES:
                raise RegistryError(
                    "permission_denied", f"an {invite.role} token logs into the dashboard; it enrolls no island"
                )
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
                secret_hash=secret_hash(secret),
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

    def operator_login(self, token: str) -> tuple[str, float]:
        """Check an operator token (`invite --role operator`) for a dashboard login: it may log
        in any number of times until it expires. Returns its id (the hash's first 12 hex digits,
        as the event log names invites) and its expiry; the login is logged."""
        now = self.clock.now()
        with self.transaction() as s:
            invite = s.get(Invite, secret_hash(token))
            if invite is None or invite.role != "operator":
                raise RegistryError("unauthenticated", "not an operator token; make one with `invite --role operator`")
            if invite.expires_at < now:
                raise RegistryError("unauthenticated", "this operator token has expired; make a new one")
            if invite.used_at is None:
                invite.used_at = now
            self.log(s, "operator_login", invite=invite.token_hash[:12])
            return invite.token_hash[:12], invite.expires_at

    def authenticate(self, island_id: str, secret: str) -> Island | None:
        """The island this credential names, read afresh on every call (nothing is cached, so a
        revocation holds from the next call on); None if the credential is wrong. A revoked
        island is returned too, with ``revoked_at`` set: the caller refuses it."""
        with self.Session() as s:
            island = s.get(Island, island_id)
        if island is None or not hmac.compare_digest(island.secret_hash, secret_hash(secret)):
            return None
        return island

    def revoke(self, island_id: str, reason: str, exclude: bool = False) -> Revocation:
        """End an island's access, in one transaction: its active leases end (their experts open
        again), its open uploads are rejected (the caller deletes their staged files). With
        ``exclude`` its signed experts open again too, their checkpoints are unpublished, every
        published ensemble that names one is withdrawn and any assembly in progress is stopped."""
        reason = " ".join(reason.split())[:500] or "no reason given"
        now = self.clock.now()
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
                    f"island {island_id} was already revoked at {iso(island.revoked_at)} ({island.revoked_reason})",
                )
            self.log(s, "revoked", island_id, reason=reason, exclude=exclude)
            uploads = s.scalars(select(Upload).where(Upload.island_id == island_id, Upload.state == "open")).all()
            for upload in uploads:
                upload.state, upload.reason, upload.updated_at = "rejected", "the island's access was revoked", now
                self.log(s, "upload_rejected", island_id, upload.expert_id, upload_id=upload.id, reason="revoked")
            leases = s.scalars(select(Lease).where(Lease.island_id == island_id, Lease.state == "active")).all()
            for lease in leases:
                self._end_lease(s, lease, "revoked", "lease_revoked")
            experts, withdrawn, stopped = [], [], []
            if exclude:
                experts, withdrawn, stopped = self._exclude(s, island_id, reason)
            return Revocation(
                island_id,
                reason,
                [(lease.id, lease.expert_id) for lease in leases],
                [u.id for u in uploads],
                experts,
                withdrawn,
                stopped,
            )

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
