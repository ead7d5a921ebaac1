"""What the island and the downloader trust: pinned keys, signed files, their own identity."""

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.connection import ClientError
from client.ensemble import load_verified, load_verified_student
from client.island import enroll
from client.state import Identity, IslandState
from ddm_model.checkpoint import CheckpointError, save_checkpoint
from ddm_model.dit import DiT, DiTConfig
from ddm_model.router import Router, RouterConfig
from protocol.trust import ENTRY_FORMAT, MANIFEST_FORMAT, TrustError, canonical_json, key_fingerprint, sha256_file


def make_ensemble(folder, private=None, student_kind=None):
    """A two-expert ensemble folder signed by ``private`` (a fresh key by default), with a
    student checkpoint of ``student_kind`` if given."""
    private = private or Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    folder.mkdir(parents=True, exist_ok=True)
    router_cfg = RouterConfig("tiny", 8, 1, 2)
    save_checkpoint(folder / "router.safetensors", Router(router_cfg))
    experts = []
    for cluster in (0, 1):
        path = folder / f"expert-{cluster}.safetensors"
        save_checkpoint(path, DiT(DiTConfig("tiny", 8, 1)), cluster_id=cluster, steps=1)
        entry = {
            "format": ENTRY_FORMAT,
            "expert_id": cluster,
            "cluster_id": cluster,
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "config": DiTConfig("tiny", 8, 1).to_dict(),
        }
        experts.append({"entry": entry, "signature": base64.b64encode(private.sign(canonical_json(entry))).decode()})
    router = folder / "router.safetensors"
    manifest = {
        "format": MANIFEST_FORMAT,
        "router": {
            "sha256": sha256_file(router),
            "size": router.stat().st_size,
            "config": router_cfg.to_dict(),
            "clusters": [0, 1],
        },
        "experts": experts,
    }
    if student_kind is not None:
        path = folder / "student.safetensors"
        save_checkpoint(path, DiT(DiTConfig("tiny", 8, 1)), steps=1, kind=student_kind)
        config = DiTConfig("tiny", 8, 1).to_dict()
        manifest["student"] = {"sha256": sha256_file(path), "size": path.stat().st_size, "config": config}
    data = canonical_json(manifest)
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(private.sign(data))
    (folder / "coordinator.pub").write_bytes(public)
    return key_fingerprint(public)


def test_a_folder_signed_by_a_trusted_key_loads(tmp_path):
    fp = make_ensemble(tmp_path / "ens")
    ensemble, manifest = load_verified(tmp_path / "ens", {fp})
    assert len(ensemble) == 2 and manifest["router"]["clusters"] == [0, 1]


def test_a_folder_resigned_by_another_key_is_refused(tmp_path):
    trusted = make_ensemble(tmp_path / "ens")
    make_ensemble(tmp_path / "ens")  # an attacker rewrites everything with their own key
    with pytest.raises(TrustError, match="not a trusted key"):
        load_verified(tmp_path / "ens", {trusted})
    with pytest.raises(TrustError, match=r"not a trusted key .*trusted: none"):
        load_verified(tmp_path / "ens", set())


def test_a_tampered_file_is_refused(tmp_path):
    fp = make_ensemble(tmp_path / "ens")
    path = tmp_path / "ens" / "expert-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TrustError, match=r"expert-1\.safetensors does not match the signed manifest"):
        load_verified(tmp_path / "ens", {fp})


def test_a_tampered_manifest_is_refused(tmp_path):
    fp = make_ensemble(tmp_path / "ens")
    manifest = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    manifest["router"]["clusters"] = [1, 0]
    (tmp_path / "ens" / "manifest.json").write_bytes(canonical_json(manifest))
    with pytest.raises(TrustError, match="signature of the ensemble manifest"):
        load_verified(tmp_path / "ens", {fp})


def test_a_reader_identity_cannot_join(tmp_path):
    state = IslandState(tmp_path / "state")
    state.save_identity(Identity("127.0.0.1:1", "r1", "r1.secret", "reader", "00" * 32, "sha256:" + "0" * 64))
    with pytest.raises(ClientError, match="holds a reader identity"):
        enroll(state, "127.0.0.1:1", None, "x", "island", None)
    # ...but it serves for downloads, without contacting anyone
    assert enroll(state, "127.0.0.1:1", None, "x", "reader", None).island_id == "r1"
    assert (tmp_path / "state" / "identity.json").stat().st_mode & 0o077 == 0


def test_a_signed_student_loads_alone_and_only_as_a_student(tmp_path):
    fp = make_ensemble(tmp_path / "ens", student_kind="student")
    student, manifest = load_verified_student(tmp_path / "ens", {fp})
    assert isinstance(student, DiT) and manifest["student"]["config"]["preset"] == "tiny"
    ensemble, _ = load_verified(tmp_path / "ens", {fp})  # the routed ensemble still loads beside it
    assert len(ensemble) == 2
    # An expert checkpoint named as the student, even signed, is refused by its header's kind.
    fp = make_ensemble(tmp_path / "swapped", student_kind="expert")
    with pytest.raises(CheckpointError, match="holds a expert, expected a student"):
        load_verified_student(tmp_path / "swapped", {fp})
    # A manifest without a student says what to do.
    fp = make_ensemble(tmp_path / "plain")
    with pytest.raises(TrustError, match="no distilled student; run `ddm-coordinator distill`"):
        load_verified_student(tmp_path / "plain", {fp})
