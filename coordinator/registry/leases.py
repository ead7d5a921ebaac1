"""Leases: an expert assigned to one island until a deadline that heartbeats extend.

A lease ends as expired (silent past its deadline), released (by its island), revoked (by
the operator) or completed (its expert signed). Ending it any other way than completed sends
its expert back to open and closes the lease's open uploads, so that a stale upload of an
old holder can never touch the expert once another island holds it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from .core import Core, RegistryError, shown
from .tables import UNSIGNED, Expert, Island, Lease, Point, Upload


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


class Leases(Core):
    def acquire_lease(self, island_id: str) -> Grant | NoWork:
        """The island's active lease (deadline renewed), else an open expert: preferably one
        this island held before (its local progress survives), else the lowest id."""
        now = self.clock.now()
        deadline = now + self.lease_seconds
        with self.transaction() as s:
            self._require_access(s, island_id)
            self._expire(s, now)
            held = s.scalars(select(Lease).where(Lease.island_id == island_id, Lease.state == "active")).first()
            if held is not None:
                held.deadline_at = deadline
                expert = s.get(Expert, held.expert_id)
                self.log(s, "lease_renewed", island_id, expert.id, lease_id=held.id)
                return _grant(held, expert, renewed=True)
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
                return _grant(lease, expert, renewed=False)
            # A count, not every expert as an object: islands with no work ask again at every beat.
            unsigned = s.scalar(select(func.count()).select_from(Expert).where(Expert.state != "signed"))
            if not unsigned:
                return NoWork("every expert is trained and signed", finished=True)
            return NoWork("every unfinished expert is leased to another island", finished=False)

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
        now = self.clock.now()
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
            points = self._curve_points([(lease_id, step, loss, now)])
            if points:
                s.execute(insert(Point), points)
            return lease.deadline_at

    def buffered_heartbeat(self, island_id: str, lease_id: str, step: int, loss: float, rate: float) -> float:
        """``heartbeat``, with its write deferred to the next ``flush_heartbeats``: the lease and
        the island are read afresh (a revoked island, or an ended lease, is refused now), and
        the new deadline is answered at once. A beat that changes state (an expert's first
        training step) or that finds its lease past its deadline goes through ``heartbeat``.
        A crash loses at most the beats since the last flush: progress figures, and deadline
        extensions that the island's next beat renews."""
        now = self.clock.now()
        with self.Session() as s:  # one query: the lease, its expert's state, its island's revocation
            row = s.execute(
                select(Lease.island_id, Lease.state, Lease.deadline_at, Lease.expert_id)
                .add_columns(Expert.state, Island.revoked_at)
                .join(Expert, Expert.id == Lease.expert_id)
                .join(Island, Island.id == Lease.island_id)
                .where(Lease.id == lease_id)
            ).first()
        with self._beats_lock:
            now_or_refused = True
            if row is not None:
                holder, state, deadline, expert_id, expert_state, revoked_at = row
                buffered = self._beats.get(lease_id)
                if buffered is not None:
                    deadline = max(deadline, buffered[-1] + self.lease_seconds)
                now_or_refused = (
                    holder != island_id
                    or revoked_at is not None
                    or state != "active"
                    or deadline < now
                    or (expert_state == "leased" and step > 0)
                )
            if now_or_refused:
                self._beats.pop(lease_id, None)  # written now, or refused: nothing older may follow
            else:
                self._beats[lease_id] = (island_id, expert_id, step, loss, rate, now)
        if now_or_refused:
            return self.heartbeat(island_id, lease_id, step, loss, rate)
        return now + self.lease_seconds

    def flush_heartbeats(self) -> int:
        """Write the buffered heartbeats in one transaction; returns how many. A beat whose lease
        ended meanwhile changes nothing."""
        with self._beats_lock:
            beats, self._beats = self._beats, {}
        if not beats:
            return 0
        leases, experts = Lease.__table__, Expert.__table__
        lease_rows, expert_rows = [], []
        for lease_id, (island_id, expert_id, step, loss, rate, at) in beats.items():
            lease_rows.append({"b_id": lease_id, "b_deadline": at + self.lease_seconds, "b_at": at})
            expert_rows.append(
                {
                    "b_id": expert_id,
                    "b_island": island_id,
                    "b_step": step,
                    "b_loss": loss if loss == loss else None,
                    "b_rate": rate,
                    "b_at": at,
                }
            )
        try:
            with self.transaction() as s:
                conn = s.connection()
                conn.execute(
                    update(leases)
                    .where(leases.c.id == bindparam("b_id"), leases.c.state == "active")
                    .values(deadline_at=bindparam("b_deadline"), last_heartbeat_at=bindparam("b_at")),
                    lease_rows,
                )
                conn.execute(
                    update(experts)
                    .where(
                        experts.c.id == bindparam("b_id"),
                        experts.c.island_id == bindparam("b_island"),
                        # Two comparisons, not IN: an IN list is an expanding parameter, which executemany refuses.
                        or_(experts.c.state == "leased", experts.c.state == "training"),
                    )
                    .values(
                        step=bindparam("b_step"),
                        loss=bindparam("b_loss"),
                        images_per_second=bindparam("b_rate"),
                        updated_at=bindparam("b_at"),
                    ),
                    expert_rows,
                )
                points = self._curve_points([(lease_id, b[2], b[3], b[5]) for lease_id, b in beats.items()])
                if points:
                    conn.execute(insert(Point.__table__), points)
        except Exception:  # kept for the next flush, unless a newer beat of the same lease came meanwhile
            with self._beats_lock:
                for lease_id, beat in beats.items():
                    self._beats.setdefault(lease_id, beat)
            raise
        return len(beats)

    def _curve_points(self, beats: list[tuple[str, int, float, float]]) -> list[dict]:
        """The rows of the training curves that these beats (lease id, step, loss, time) add: a
        beat with a loss whose step is ``curve_every_steps`` past its lease's last point."""
        rows = []
        with self._beats_lock:
            for lease_id, step, loss, at in beats:
                last = self._curve_last.get(lease_id)
                if loss is None or loss != loss or (last is not None and step < last + self.curve_every_steps):
                    continue
                self._curve_last[lease_id] = step
                rows.append({"lease_id": lease_id, "step": step, "loss": loss, "at": at})
        return rows

    def curves(self, lease_ids: list[str]) -> dict[str, list[tuple[int, float]]]:
        """The training curve of each of these leases: (step, loss) points, by step."""
        if not lease_ids:
            return {}
        found: dict[str, list[tuple[int, float]]] = {lease_id: [] for lease_id in lease_ids}
        with self.Session() as s:
            rows = s.execute(
                select(Point.lease_id, Point.step, Point.loss).where(Point.lease_id.in_(lease_ids)).order_by(Point.id)
            ).all()
        for lease_id, step, loss in rows:
            found[lease_id].append((step, loss))
        for points in found.values():
            points.sort(key=lambda p: p[0])
        return found

    def release_lease(self, island_id: str, lease_id: str, reason: str) -> None:
        with self.transaction() as s:
            lease = self._active_lease(s, island_id, lease_id)
            self._end_lease(s, lease, "released", "lease_released", reason=reason[:500])

    def expire_leases(self) -> int:
        with self.transaction() as s:
            return self._expire(s, self.clock.now())

    def _expire(self, s: Session, now: float) -> int:
        stale = s.scalars(select(Lease).where(Lease.state == "active", Lease.deadline_at < now)).all()
        for lease in stale:
            self._end_lease(s, lease, "expired", "lease_expired")
        return len(stale)

    def _end_lease(self, s: Session, lease: Lease, state: str, kind: str, **detail) -> None:
        """End an active lease as ``state``: its expert opens again unless signed, and its open
        uploads are abandoned (their staged bytes go with the next staging clean-up)."""
        now = self.clock.now()
        lease.state = state
        s.execute(
            update(Expert)
            .where(Expert.id == lease.expert_id, Expert.state.in_(UNSIGNED))
            .values(state="open", updated_at=now)
        )
        self.log(s, kind, lease.island_id, lease.expert_id, lease_id=lease.id, **detail)
        uploads = s.scalars(select(Upload).where(Upload.lease_id == lease.id, Upload.state == "open")).all()
        for upload in uploads:
            upload.state, upload.reason, upload.updated_at = "abandoned", f"its lease was {state}", now
            self.log(
                s, "upload_abandoned", upload.island_id, upload.expert_id, upload_id=upload.id, reason=upload.reason
            )


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
