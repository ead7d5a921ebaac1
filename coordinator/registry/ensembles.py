"""Artifacts, ensembles and their publication, and their withdrawal.

An ensemble is assembled (its router trains, ``start_ensemble`` .. ``publish_ensemble``),
published with a signed manifest, and may gain a distilled student as a new published
version. An artifact is served to any enrolled identity while a published ensemble names it.
An ensemble is withdrawn when it names an expert whose island was excluded (`revoke
--exclude`) or an artifact the store lost (reconciliation); either way ``_withdraw`` ends it,
so that nothing a withdrawn ensemble named stays readable unless another published ensemble
names it too.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from protocol.manifest import Manifest

from .core import Core, RegistryError
from .tables import Artifact, Ensemble, Expert, Island, Lease

STALE_ASSEMBLY_S = 600.0  # an assembly silent this long is taken to have died


def named_by(manifest_json: bytes | None, router_sha256: str | None) -> set[str]:
    """Every artifact a stored ensemble names: its router, its experts and any student (its
    router row alone when its manifest was damaged on disk)."""
    return Manifest.stored(manifest_json).artifacts | ({router_sha256} - {None})


class Ensembles(Core):
    def add_artifact(self, sha256: str, kind: str, size: int, session: Session | None = None) -> None:
        def add(s: Session) -> None:
            if s.get(Artifact, sha256) is None:
                s.add(Artifact(sha256=sha256, kind=kind, size=size, created_at=self.clock.now(), published=False))

        if session is not None:
            add(session)  # the caller's transaction logs the change
        else:
            with self.transaction() as s:
                add(s)
                self.log(s, "artifact", sha256=sha256, artifact=kind, size=size)

    def start_ensemble(self, experts: int, router_steps: int) -> int:
        now = self.clock.now()
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
                .values(router_step=step, updated_at=self.clock.now())
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
            ensemble.state, ensemble.updated_at = "published", self.clock.now()
            ensemble.router_sha256, ensemble.manifest_json, ensemble.signature = router_sha256, manifest, signature
            ensemble.router_step = ensemble.router_steps
            self.log(s, "published", ensemble_id=ensemble_id, router=router_sha256, experts=len(expert_sha256s))

    def fail_ensemble(self, ensemble_id: int, reason: str) -> None:
        """Mark an assembly failed (one already ended, e.g. stopped by `revoke --exclude`, stays as it is)."""
        with self.transaction() as s:
            failed = s.execute(
                update(Ensemble)
                .where(Ensemble.id == ensemble_id, Ensemble.state == "training")
                .values(state="failed", reason=reason[:2000], updated_at=self.clock.now())
            ).rowcount
            if failed:
                self.log(s, "assemble_failed", ensemble_id=ensemble_id, reason=reason[:500])

    def publish_student(self, base_id: int, sha256: str, size: int, sign: Callable[[int], tuple[bytes, bytes]]) -> int:
        """Publish a new version of ensemble ``base_id`` (router and experts unchanged) that
        adds its distilled student; ``sign(new id)`` returns (manifest, signature). Refused if
        another ensemble was published or is being assembled since, so the newest published
        ensemble always has the newest experts."""
        now = self.clock.now()
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

    def assemblies_in_training(self) -> list[int]:
        with self.Session() as s:
            return list(s.scalars(select(Ensemble.id).where(Ensemble.state == "training")).all())

    def assembly_due(self) -> bool:
        """Every expert is signed, and no published ensemble is of exactly these checkpoints
        (after `revoke --exclude`, a retrained expert is not in the ensemble published without it)."""
        with self.Session() as s:
            experts = s.execute(select(Expert.state, Expert.checkpoint_sha256)).all()
            if not experts or any(state != "signed" for state, _ in experts):
                return False
            signed = {sha for _, sha in experts}
            published = s.scalars(select(Ensemble.manifest_json).where(Ensemble.state == "published")).all()
        return not any(set(Manifest.stored(m).checkpoints) == signed for m in published)

    def latest_published(self) -> Ensemble | None:
        with self.Session() as s:
            return s.scalars(select(Ensemble).where(Ensemble.state == "published").order_by(Ensemble.id.desc())).first()

    def readable_by(self, island: Island, sha256: str) -> str | None:
        """Why ``island`` may read an artifact: "published" (any enrolled identity may), "public"
        (a latent home's autoencoder, which every island encodes with and every reader decodes
        with), "lease" (the shard of the island's active lease), or None."""
        with self.Session() as s:
            artifact = s.get(Artifact, sha256)
            if artifact is not None and artifact.published:
                return "published"
            if artifact is not None and artifact.kind == "autoencoder":
                return "public"
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

    # -- taking back ----------------------------------------------------------------------------

    def _withdraw(
        self,
        s: Session,
        ensembles: list[Ensemble],
        why: str,
        kind: str,
        island_id: str | None = None,
        also: set[str] = frozenset(),
        **detail,
    ) -> None:
        """Withdraw published ``ensembles`` (``why`` is their reason; a ``kind`` event each) and
        unpublish every artifact they named, and those in ``also``, that no ensemble still
        published names."""
        now = self.clock.now()
        for ensemble in ensembles:
            ensemble.state, ensemble.reason, ensemble.updated_at = "withdrawn", why[:2000], now
            self.log(s, kind, island_id, ensemble_id=ensemble.id, **detail)
        s.flush()
        still = set()
        for ensemble in s.scalars(select(Ensemble).where(Ensemble.state == "published")).all():
            still |= named_by(ensemble.manifest_json, ensemble.router_sha256)
        named = set(also).union(*(named_by(e.manifest_json, e.router_sha256) for e in ensembles))
        unpublish = sorted(
            s.scalars(
                select(Artifact.sha256).where(Artifact.sha256.in_(named - still), Artifact.published.is_(True))
            ).all()
        )
        s.execute(update(Artifact).where(Artifact.sha256.in_(unpublish)).values(published=False))
        for sha in unpublish:
            self.log(s, "unpublished", island_id, sha256=sha)

    def _reopen_signed(self, s: Session, expert: Expert) -> None:
        """Send a signed expert back to open, its checkpoint, entry and signature forgotten."""
        expert.state, expert.island_id, expert.step, expert.loss, expert.images_per_second = "open", None, 0, None, None
        expert.checkpoint_sha256, expert.entry_json, expert.signature = None, None, None
        expert.updated_at = self.clock.now()

    def _exclude(self, s: Session, island_id: str, reason: str) -> tuple[list[int], list[int], list[int]]:
        """Reopen the island's signed experts and withdraw what named their checkpoints."""
        signed = s.scalars(
            select(Expert).where(Expert.island_id == island_id, Expert.state == "signed").order_by(Expert.id)
        ).all()
        excluded = {e.checkpoint_sha256 for e in signed}
        for e in signed:
            self.log(s, "expert_excluded", island_id, e.id, sha256=e.checkpoint_sha256)
            self._reopen_signed(s, e)
        if not signed:
            return [], [], []
        ids = ", ".join(str(e.id) for e in signed)
        published = s.scalars(select(Ensemble).where(Ensemble.state == "published")).all()
        withdrawn = [e for e in published if excluded & set(Manifest.stored(e.manifest_json).checkpoints)]
        self._withdraw(
            s,
            withdrawn,
            f"withdrawn: it names expert(s) {ids} of island {island_id}, excluded ({reason})",
            "withdrawn",
            island_id,
            also=excluded,
            reason=reason,
        )
        stopped = s.scalars(select(Ensemble).where(Ensemble.state == "training")).all()
        for ensemble in stopped:
            ensemble.state, ensemble.updated_at = "failed", self.clock.now()
            ensemble.reason = f"stopped: expert(s) {ids} of island {island_id} were excluded while it assembled"
            self.log(s, "assemble_failed", ensemble_id=ensemble.id, reason=ensemble.reason)
        return [e.id for e in signed], [e.id for e in withdrawn], [e.id for e in stopped]

    def drop_lost_artifact(self, sha256: str, kind: str, why: str, experts: list[int], ensembles: list[int]) -> None:
        """One transaction, for an artifact the store lost: reopen the ``experts`` it was the
        signed checkpoint of, withdraw the published ``ensembles`` that name it, forget its row."""
        reason = f"the {kind} {sha256[:12]}… it names is lost ({why})"
        with self.transaction() as s:
            for expert in s.scalars(
                select(Expert).where(
                    Expert.id.in_(experts), Expert.state == "signed", Expert.checkpoint_sha256 == sha256
                )
            ).all():
                self._reopen_signed(s, expert)
                self.log(s, "expert_reopened", expert_id=expert.id, sha256=sha256, reason=reason)
            s.execute(delete(Artifact).where(Artifact.sha256 == sha256))
            published = s.scalars(
                select(Ensemble).where(Ensemble.id.in_(ensembles), Ensemble.state == "published")
            ).all()
            self._withdraw(s, list(published), reason, "ensemble_withdrawn", reason=reason)
