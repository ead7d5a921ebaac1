"""The ensemble manifest: the one type that builds, reads and checks it, on both sides.

A manifest (signed as a whole, canonical JSON) names the router, every expert (each with its
own signed entry, checked again when it is read) and, once distilled, the dense student, each
by sha256, size and model config, and the experts' shares of the data (protocol/shares.py;
absent in older manifests, which then mean uniform shares). A latent ensemble's manifest also
names its autoencoder (file, size and identity), the one its samples are decoded with; it is a
home-wide artifact that any enrolled identity may read, so it is not among ``artifacts``.

The coordinator builds one when it assembles an ensemble (``Manifest.build``) and a new version
of it when it distils a student (``with_student``); its registry, reconciliation and restart
read the artifacts a stored manifest names (``Manifest.stored``); whoever downloads an ensemble,
the coordinator distilling from its own included, reads it only once its signature and every
entry's checked out (``Manifest.verified``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from .shares import SharesError, check_shares
from .trust import ENTRY_FORMAT, MANIFEST_FORMAT, TrustError, canonical_json, is_sha256, verify_signature


@dataclass
class Member:
    name: str  # file name in a downloaded ensemble folder
    kind: str  # "router", "expert", "student" (checkpoint kinds) or "autoencoder"
    sha256: str
    size: int
    config: dict


@dataclass(frozen=True)
class Manifest:
    """A manifest's JSON object; ``members`` is filled only by ``verified``."""

    data: dict
    members: tuple[Member, ...] = field(default=(), compare=False)

    @classmethod
    def build(
        cls,
        ensemble_id: int,
        created_at: str,
        mode: str,
        dataset: dict,
        clustering_sha256: str,
        router: dict,
        experts: list[tuple[bytes, bytes]],
        shares: dict | None,
        autoencoder: dict | None = None,
    ) -> Manifest:
        """A new ensemble's manifest; ``experts`` holds each signed (entry JSON, signature) in
        the order of the router's outputs; ``autoencoder`` describes a latent ensemble's
        autoencoder (sha256, size, identity, config, ...)."""
        latent = {} if autoencoder is None else {"autoencoder": autoencoder}
        private = privacy_summary(mode, [json.loads(entry) for entry, _ in experts])
        return cls(
            {
                **latent,
                **({"privacy": private} if private else {}),
                "format": MANIFEST_FORMAT,
                "ensemble_id": ensemble_id,
                "created_at": created_at,
                "mode": mode,
                "dataset": dataset,
                "clustering_sha256": clustering_sha256,
                "router": router,
                "experts": [
                    {"entry": json.loads(entry), "signature": base64.b64encode(signature).decode()}
                    for entry, signature in experts
                ],
                "shares": shares,
            }
        )

    def with_student(self, ensemble_id: int, created_at: str, student: dict) -> Manifest:
        """The next version of this ensemble: the same router and experts, plus ``student``."""
        return Manifest({**self.data, "ensemble_id": ensemble_id, "created_at": created_at, "student": student})

    @classmethod
    def parse(cls, raw: bytes | None) -> Manifest:
        """A stored manifest as the coordinator wrote it, unchecked (None or empty: one that
        names nothing); TrustError if it is not a JSON object."""
        try:
            data = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            raise TrustError("the manifest is not valid JSON") from None
        if not isinstance(data, dict):
            raise TrustError("the manifest is not a JSON object")
        return cls(data)

    @classmethod
    def stored(cls, raw: bytes | None) -> Manifest:
        """A manifest the coordinator wrote and kept, read for what it names; one damaged on
        disk names nothing (reconciliation and the store's checks report the damage)."""
        try:
            return cls.parse(raw)
        except TrustError:
            return cls({})

    @classmethod
    def verified(cls, raw: bytes, signature: bytes, public_key: bytes, what: str = "the ensemble manifest") -> Manifest:
        """The manifest once its signature, its format and every expert entry's signature check
        out against ``public_key``; its members are the files it names."""
        verify_signature(public_key, raw, signature, what)
        manifest = cls.parse(raw)
        try:
            found = members(manifest.data, public_key)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrustError(f"{what} is malformed ({type(exc).__name__}: {exc})") from None
        return cls(manifest.data, tuple(found))

    @property
    def privacy(self) -> dict | None:
        """The ensemble's differential-privacy guarantee (``privacy_summary``), if it has one."""
        return self.data.get("privacy")

    def __getitem__(self, key: str):
        """The manifest's JSON fields, read as from the object itself."""
        return self.data[key]

    @property
    def ensemble_id(self) -> int | None:
        return self.data.get("ensemble_id")

    @property
    def router(self) -> dict:
        router = self.data.get("router")
        return router if isinstance(router, dict) else {}

    @property
    def clusters(self) -> list[int]:
        """The cluster each router output names, in order."""
        return list(self.router.get("clusters") or [])

    @property
    def entries(self) -> list[dict]:
        """Every expert's signed entry, in the order of the router's outputs."""
        experts = self.data.get("experts")
        items = experts if isinstance(experts, list) else []
        return [item["entry"] for item in items if isinstance(item, dict) and isinstance(item.get("entry"), dict)]

    @property
    def checkpoints(self) -> list[str]:
        """The sha256 of every expert checkpoint it names."""
        return [entry["sha256"] for entry in self.entries if entry.get("sha256")]

    @property
    def student(self) -> dict | None:
        student = self.data.get("student")
        return student if isinstance(student, dict) else None

    @property
    def shares(self) -> dict | None:
        return self.data.get("shares")

    @property
    def autoencoder(self) -> dict | None:
        """A latent ensemble's autoencoder, which decodes its samples; None in pixel space."""
        autoencoder = self.data.get("autoencoder")
        return autoencoder if isinstance(autoencoder, dict) else None

    @property
    def artifacts(self) -> set[str]:
        """Every artifact it names: its router, its experts and any student."""
        student = (self.student or {}).get("sha256")
        return {self.router.get("sha256"), student, *self.checkpoints} - {None, ""}


def privacy_summary(mode: str, entries: list[dict]) -> dict | None:
    """What a siloed ensemble guarantees about any one sample of one island's silo, when every
    expert declares a differentially private guarantee: the largest epsilon and delta among
    them. Each island's silo reaches only its own expert (parallel composition; a sample held by
    several islands counts once per island), and the router and a student learn only from expert
    samples, which is post-processing. None otherwise: in shared mode the coordinator trains the
    router on the data itself."""
    guarantees = [entry.get("privacy") for entry in entries]
    if mode != "siloed" or not guarantees or any(not isinstance(g, dict) for g in guarantees):
        return None
    return {
        "epsilon": max(g["epsilon"] for g in guarantees),
        "delta": max(g["delta"] for g in guarantees),
        "unit": "one sample of one island's data",
        "experts": len(guarantees),
    }


def members(manifest: dict, public_key: bytes) -> list[Member]:
    """Router, experts (ordered as the router's outputs) and the student if there is one, each
    expert entry's signature checked against ``public_key``."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TrustError(f"unsupported ensemble manifest (format {MANIFEST_FORMAT} expected)")
    router = manifest["router"]
    found = [Member("router.safetensors", "router", router["sha256"], router["size"], router["config"])]
    clusters = router["clusters"]
    if len(clusters) != len(manifest["experts"]):
        raise TrustError("the manifest's router and expert list disagree")
    for cluster, item in zip(clusters, manifest["experts"], strict=True):
        entry = item["entry"]
        if entry.get("format") != ENTRY_FORMAT:
            raise TrustError(f"unsupported expert entry in the manifest (format {ENTRY_FORMAT} expected)")
        verify_signature(
            public_key, canonical_json(entry), base64.b64decode(item["signature"]), f"expert {entry['expert_id']}"
        )
        if entry["cluster_id"] != cluster:
            raise TrustError("the manifest routes to a cluster its expert entry does not name")
        found.append(Member(f"expert-{cluster}.safetensors", "expert", entry["sha256"], entry["size"], entry["config"]))
    try:
        check_shares(manifest.get("shares"), len(clusters))
    except SharesError as exc:
        raise TrustError(str(exc)) from None
    student = manifest.get("student")
    if student is not None:
        if not is_sha256(str(student.get("sha256", ""))) or not isinstance(student.get("size"), int):
            raise TrustError("the manifest's student entry does not name a file by sha256 and size")
        found.append(Member("student.safetensors", "student", student["sha256"], student["size"], student["config"]))
    autoencoder = manifest.get("autoencoder")
    if autoencoder is not None:
        if (
            not isinstance(autoencoder, dict)
            or not is_sha256(str(autoencoder.get("sha256", "")))
            or not isinstance(autoencoder.get("size"), int)
            or not is_sha256(str(autoencoder.get("identity", "")))
        ):
            raise TrustError("the manifest's autoencoder entry does not name a file by sha256, size and identity")
        found.append(
            Member("autoencoder.safetensors", "autoencoder", autoencoder["sha256"], autoencoder["size"], autoencoder)
        )
    return found
