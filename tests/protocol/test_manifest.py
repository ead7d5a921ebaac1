"""The one manifest type: built, versioned, read back and verified the same way everywhere."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.manifest import Manifest
from protocol.trust import ENTRY_FORMAT, TrustError, canonical_json


class Key:
    def __init__(self):
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, obj) -> tuple[bytes, bytes]:
        data = canonical_json(obj)
        return data, self.private.sign(data)


def entry(k: int) -> dict:
    return {
        "format": ENTRY_FORMAT,
        "expert_id": k,
        "cluster_id": k,
        "sha256": f"{k:02d}" * 32,
        "size": 10 + k,
        "config": {"preset": "tiny"},
    }


def built(key: Key) -> Manifest:
    router = {"sha256": "cc" * 32, "size": 5, "config": {"preset": "tiny"}, "clusters": [0, 1]}
    experts = [key.sign(entry(k)) for k in (0, 1)]
    shares = {"source": "clusters", "clusters": [3, 1], "classes": None}
    return Manifest.build(7, "2026-12-01T00:00:00+00:00", "shared", {"name": "digits"}, "", router, experts, shares)


def test_a_built_manifest_verifies_and_names_its_members_in_router_order():
    key = Key()
    raw, signature = key.sign(built(key).data)
    manifest = Manifest.verified(raw, signature, key.public)
    assert [(m.name, m.kind) for m in manifest.members] == [
        ("router.safetensors", "router"),
        ("expert-0.safetensors", "expert"),
        ("expert-1.safetensors", "expert"),
    ]
    assert manifest.ensemble_id == 7 and manifest.clusters == [0, 1]
    assert manifest.checkpoints == ["00" * 32, "01" * 32]
    assert manifest.artifacts == {"cc" * 32, "00" * 32, "01" * 32}
    assert manifest.shares["clusters"] == [3, 1] and manifest["mode"] == "shared"


def test_a_student_version_keeps_the_ensemble_and_adds_the_student():
    key = Key()
    base = built(key)
    student = {"sha256": "ee" * 32, "size": 9, "config": {"preset": "tiny"}, "teacher_ensemble_id": 7}
    version = base.with_student(8, "2026-12-02T00:00:00+00:00", student)
    raw, signature = key.sign(version.data)
    verified = Manifest.verified(raw, signature, key.public)
    assert verified.ensemble_id == 8 and verified.student["sha256"] == "ee" * 32
    assert verified.artifacts == base.artifacts | {"ee" * 32}
    assert [m.kind for m in verified.members][-1] == "student"
    assert "student" not in base.data  # the base version is untouched


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["experts"][0].pop("signature"),
        lambda m: m["router"].pop("clusters"),
        lambda m: m.__setitem__("experts", "not a list"),
        lambda m: m["experts"][1].__setitem__("entry", {**m["experts"][1]["entry"], "size": 99}),
        lambda m: m.__setitem__("format", "ddm.ensemble/0"),
    ],
    ids=["unsigned-entry", "no-clusters", "experts-not-a-list", "entry-changed", "format"],
)
def test_a_malformed_or_forged_manifest_is_one_trust_error(mutate):
    key = Key()
    data = json.loads(json.dumps(built(key).data))
    mutate(data)
    raw, signature = key.sign(data)  # signed as a whole: only its inner structure is wrong
    with pytest.raises(TrustError):
        Manifest.verified(raw, signature, key.public)


def test_a_stored_manifest_is_read_without_verifying_and_bad_json_is_refused():
    assert Manifest.parse(None).artifacts == set() and Manifest.parse(b"").checkpoints == []
    assert Manifest.parse(b'{"experts": [{"entry": {"sha256": "ab"}}]}').checkpoints == ["ab"]
    for raw in (b"not json", b"[1, 2]", b"[" * 100_000):
        with pytest.raises(TrustError):
            Manifest.parse(raw)
    key = Key()
    raw, signature = key.sign(built(key).data)
    with pytest.raises(TrustError, match="does not verify"):
        Manifest.verified(raw, signature, Key().public)


def test_a_stored_manifest_damaged_on_disk_names_nothing():
    assert Manifest.stored(b"not json").artifacts == set() and Manifest.stored(b"[1]").clusters == []
    key = Key()
    assert Manifest.stored(canonical_json(built(key).data)).checkpoints == ["00" * 32, "01" * 32]
