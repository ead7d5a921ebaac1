"""`ddm-client download` and `ddm-client sample`: fetch a published ensemble, verify every
signature and hash against the pinned coordinator key, and sample from it.

A downloaded ensemble is a folder:

    manifest.json          the manifest exactly as signed (canonical JSON)
    manifest.sig           its Ed25519 signature
    coordinator.pub        the coordinator's raw public key
    router.safetensors
    expert-<cluster>.safetensors
    student.safetensors    the distilled dense model, when the manifest names one
    autoencoder.safetensors  a latent ensemble's autoencoder, which decodes its samples

The key is pinned by the fingerprint given on the command line, else by the one this state
folder saw first for this coordinator (trust on first use, with a warning). ``load_verified``
checks everything again before a single weight is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from ddm_model.autoencoder import Autoencoder, AutoencoderError, load_packed, verify_packed
from ddm_model.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from ddm_model.ensemble import RoutedEnsemble
from ddm_model.fsutil import atomic_path
from ddm_model.progress import transfer_bar
from protocol import ddm_pb2 as pb
from protocol.manifest import Manifest, Member
from protocol.shares import check_shares
from protocol.trust import TrustError, key_fingerprint, sha256_file

from .connection import Connection
from .island import enroll, tls_for, tofu_warning
from .state import IslandState
from .tls import TlsSettings
from .transfer import bar_callback, download_artifact

console = Console(stderr=True)


def pin_key(state: IslandState, coordinator: str, public_key: bytes, fingerprint: str | None) -> None:
    actual = key_fingerprint(public_key)
    if fingerprint:
        if actual != fingerprint:
            raise TrustError(f"the coordinator's key is {actual}, not the pinned {fingerprint}; refusing the download")
        state.remember_key(coordinator, actual)
        return
    known = state.known_key(coordinator)
    if known is None:
        tofu_warning(actual)
        state.remember_key(coordinator, actual)
    elif known != actual:
        raise TrustError(
            f"the coordinator at {coordinator} now presents key {actual}, but {known} was pinned before; refusing"
        )


def download_ensemble(
    coordinator: str,
    out: Path,
    state_dir: Path,
    fingerprint: str | None = None,
    token: str | None = None,
    tls: TlsSettings | None = None,
) -> Path:
    """``tls``: the TLS flags given (client.island.tls_for completes them)."""
    state = IslandState(state_dir)
    tls = tls_for(state, coordinator, tls)
    identity = enroll(state, coordinator, token, "downloader", "reader", fingerprint, tls)
    conn = Connection(coordinator, identity.credential, tls=tls)
    try:
        signed = conn.unary("GetManifest", pb.GetManifestRequest())
        state.remember_tls(identity, tls)
        pin_key(state, coordinator, signed.coordinator_public_key, fingerprint)
        wanted = Manifest.verified(signed.manifest_json, signed.signature, signed.coordinator_public_key).members
        out.mkdir(parents=True, exist_ok=True)
        with transfer_bar() as bar:
            for m in wanted:
                dest = out / m.name
                if dest.exists() and sha256_file(dest) == m.sha256:
                    continue
                download_artifact(conn, m.sha256, dest, m.size, bar_callback(bar, m.name, m.size))
    finally:
        conn.close()
    for m in wanted:
        try:
            if m.kind == "autoencoder":
                verify_packed(out / m.name, expect_identity=m.config["identity"])
            else:
                verify_checkpoint(out / m.name, expect_kind=m.kind, expect_config=m.config)
        except (CheckpointError, AutoencoderError) as exc:
            raise TrustError(f"{m.name} is signed but not a valid {m.kind}: {exc}") from None
    for name, data in (
        ("coordinator.pub", signed.coordinator_public_key),
        ("manifest.sig", signed.signature),
        ("manifest.json", signed.manifest_json),
    ):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    return out


def verified_manifest(folder: Path, trusted: set[str]) -> Manifest:
    """Check a downloaded ensemble folder end to end against the trusted key fingerprints (the
    one given on the command line, or those pinned in the state folder): the manifest's
    signature, every expert entry's, and every file's sha256. The key stored in the folder is
    only used once it is one of them."""
    try:
        public_key = (folder / "coordinator.pub").read_bytes()
        manifest_json = (folder / "manifest.json").read_bytes()
        signature = (folder / "manifest.sig").read_bytes()
    except OSError as exc:
        raise TrustError(f"{folder} is not a downloaded ensemble ({exc.strerror}: {exc.filename})") from None
    signer = key_fingerprint(public_key)
    if signer not in trusted:
        pinned = ", ".join(sorted(trusted)) or "none"
        raise TrustError(
            f"{folder} was signed by {signer}, which is not a trusted key (trusted: {pinned}); "
            "pass --fingerprint if you trust it"
        )
    manifest = Manifest.verified(manifest_json, signature, public_key)
    for m in manifest.members:
        path = folder / m.name
        if not path.exists() or sha256_file(path) != m.sha256:
            raise TrustError(f"{path} does not match the signed manifest (tampered or incomplete); download again")
    return manifest


def _load(folder: Path, member: Member, device: str):
    return load_checkpoint(folder / member.name, expect_kind=member.kind, expect_config=member.config, device=device)[0]


def load_verified(folder: Path, trusted: set[str], device: str = "cpu") -> tuple[RoutedEnsemble, Manifest]:
    """The routed ensemble of a folder that ``verified_manifest`` accepts, and its manifest. The
    manifest's shares (uniform when it has none) become the ensemble's p(k) and, with per-class
    counts, p(k | y) (``RoutedEnsemble.from_shares``)."""
    manifest = verified_manifest(folder, trusted)
    router = _load(folder, manifest.members[0], device)
    experts = [_load(folder, m, device) for m in manifest.members if m.kind == "expert"]
    shares = check_shares(manifest.shares, len(experts))  # checked by Manifest.verified already
    return RoutedEnsemble.from_shares(experts, router, shares), manifest


def load_verified_student(folder: Path, trusted: set[str], device: str = "cpu") -> tuple[torch.nn.Module, Manifest]:
    """The distilled student of a folder that ``verified_manifest`` accepts, and its manifest."""
    manifest = verified_manifest(folder, trusted)
    student = [m for m in manifest.members if m.kind == "student"]
    if not student:
        raise TrustError(
            f"the ensemble in {folder} has no distilled student; run `ddm-coordinator distill` and download again"
        )
    return _load(folder, student[0], device), manifest


def load_verified_autoencoder(folder: Path, manifest: Manifest, device: str = "cpu") -> Autoencoder | None:
    """A latent ensemble's autoencoder, from a folder ``verified_manifest`` accepted, checked
    against the identity the manifest names (None for a pixel-space ensemble)."""
    described = manifest.autoencoder
    if described is None:
        return None
    try:
        return load_packed(folder / "autoencoder.safetensors", expect_identity=described["identity"], device=device)
    except AutoencoderError as exc:
        raise TrustError(f"the ensemble's autoencoder cannot be used: {exc}") from None
