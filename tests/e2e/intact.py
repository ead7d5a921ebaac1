"""What "nothing finished was lost" means, checked on a coordinator home after a crash test."""

from __future__ import annotations

import json

from coordinator.keys import SigningKey
from protocol.manifest import members
from protocol.trust import key_fingerprint, verify_signature

from .conftest import sha256_of


def assert_intact(coord) -> dict:
    """The store and the registry agree and the published ensemble verifies; returns its manifest.

    - every file in artifacts/ hashes to its name, and no temporary file is left;
    - every artifact row has its file, of its size, and every file has its row (no orphan);
    - no staged bytes are left: every upload finished;
    - every expert is signed, and the latest published manifest verifies under the key whose
      fingerprint `init` printed, names every signed checkpoint and a router, all in the store.
    """
    store = coord.home / "artifacts"
    files = {p.name: p for p in store.iterdir()}
    assert not [n for n in files if n.startswith(".")], f"temporary files left in the store: {sorted(files)}"
    for name, path in files.items():
        assert sha256_of(path) == name, f"artifacts/{name} does not hash to its name"
    rows = {r["sha256"]: r for r in coord.db("SELECT sha256, kind, size FROM artifacts")}
    assert set(rows) == set(files), f"rows without a file: {set(rows) - set(files)}, orphans: {set(files) - set(rows)}"
    for sha, row in rows.items():
        assert files[sha].stat().st_size == row["size"], row
    assert list((coord.home / "staging").iterdir()) == []

    experts = coord.db("SELECT id, state, checkpoint_sha256 FROM experts ORDER BY id")
    assert all(e["state"] == "signed" for e in experts), experts
    ensemble = coord.db("SELECT * FROM ensembles WHERE state = 'published' ORDER BY id DESC LIMIT 1")
    assert ensemble, coord.db("SELECT id, state, reason FROM ensembles")
    public_key = SigningKey.load(coord.home / "signing_key.pem").public_bytes
    assert key_fingerprint(public_key) == coord.fingerprint
    verify_signature(public_key, ensemble[0]["manifest_json"], ensemble[0]["signature"], "the ensemble manifest")
    manifest = json.loads(ensemble[0]["manifest_json"])
    named = members(manifest, public_key)  # checks every expert entry's signature too
    assert [m.kind for m in named] == ["router"] + ["expert"] * len(experts)
    assert {m.sha256 for m in named if m.kind == "expert"} == {e["checkpoint_sha256"] for e in experts}
    for m in named:
        assert m.sha256 in files and files[m.sha256].stat().st_size == m.size, m
        assert rows[m.sha256]["kind"] == m.kind
    return manifest
