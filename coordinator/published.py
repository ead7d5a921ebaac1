"""A published ensemble read back from the coordinator's own registry and store, trusting
nothing not checked again: the manifest's signature against the home's key (and each expert
entry's), each member's sha256 in the store, and each checkpoint's structure against the
config its entry names. Distillation and the dashboard's sample grids start here."""

from __future__ import annotations

import torch

from ddm_model.checkpoint import CheckpointError, load_checkpoint
from ddm_model.ensemble import RoutedEnsemble
from ddm_model.errors import DDMError
from protocol.manifest import Manifest, Member
from protocol.shares import check_shares
from protocol.trust import TrustError, sha256_file

from .keys import SigningKey
from .registry import Ensemble
from .store import Store


class PublishedError(DDMError):
    """A published ensemble that does not check out; the message says which part."""


def verified_manifest(row: Ensemble, key: SigningKey) -> Manifest:
    """The manifest of a published ``row``, its signatures checked against ``key``."""
    try:
        return Manifest.verified(row.manifest_json, row.signature, key.public_bytes, "the published manifest")
    except TrustError as exc:
        raise PublishedError(f"ensemble {row.id} does not verify: {exc}") from None


def load_member(store: Store, member: Member, device: str = "cpu") -> torch.nn.Module:
    """A manifest member's model from the store, once its bytes match the signed sha256."""
    path = store.path(member.sha256)
    if not store.has(member.sha256) or sha256_file(path) != member.sha256:
        raise PublishedError(f"the artifact store's copy of {member.name} does not match the signed manifest")
    try:
        return load_checkpoint(path, expect_kind=member.kind, expect_config=member.config, device=device)[0]
    except CheckpointError as exc:
        raise PublishedError(f"{member.name} is signed but not a valid {member.kind}: {exc}") from None


def load_ensemble(store: Store, manifest: Manifest, device: str = "cpu") -> RoutedEnsemble:
    """The routed ensemble a verified manifest names, with its shares as the priors."""
    router = load_member(store, manifest.members[0], device)
    experts = [load_member(store, m, device) for m in manifest.members if m.kind == "expert"]
    return RoutedEnsemble.from_shares(experts, router, check_shares(manifest.shares, len(experts)))
