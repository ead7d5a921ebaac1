"""Path-like names in every field that names something: upload ids, sha256 values, lease ids,
island names, dataset names, release reasons (checkpoint tensor names: test_payloads).

None of them may reach the file system: every call ends in its usual status, nothing is
written outside the coordinator's home (nor, relative to the working folder, anywhere), nothing
in the home but the database changes, and no file outside the store is ever served.
"""

from __future__ import annotations

import hashlib

import pytest
from grpc import StatusCode as S

from protocol import ddm_pb2 as pb

from .conftest import chunk, enroll, open_upload
from .harness import OK, Wire, assert_changes_within, assert_unchanged, check, diff, registry_state, tree
from .strategies import PATHLIKE

NAMES = (*PATHLIKE, "", "/", "//", "./.", "a/../../b", "\\\\server\\share", "ddm.db", "staging", "artifacts")
# What may change inside the home while names are thrown at it: SQLite's own files.
# The SQLite file and its own files, and the registry's named locks (registry/core.py exclusive).
DATABASE_FILES = {
    "ddm.db",
    "ddm.db-wal",
    "ddm.db-shm",
    "ddm.db-journal",
    "ddm.db.complete.lock",
    "ddm.db.assembly.lock",
}


@pytest.fixture
def jail(server, tmp_path, monkeypatch):
    """Run in a deep working folder next to the home; yields the folders to watch."""
    cwd = tmp_path / "cwd" / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return [server.home.root.parent, tmp_path]


def watched(folders) -> dict:
    return {str(folder): tree(folder) for folder in folders}


def test_path_like_names_never_reach_the_file_system(server, jail):
    me = enroll(server, lease=True, name="paths")
    data = bytes(range(256)) * 8
    # An open upload that one chunk of ``data`` would complete: a name taken for its id would show.
    own = open_upload(me, data)
    secrets_before = {
        name: hashlib.sha256((server.home.root / name).read_bytes()).hexdigest()
        for name in ("signing_key.pem", "config.json")
    }
    before_disk = watched(jail)
    shard = me.lease.shard.sha256
    for name in NAMES:
        before = registry_state(server)
        refusals = [
            ("Heartbeat", pb.HeartbeatRequest(lease_id=name, step=1), {S.PERMISSION_DENIED: "not held"}),
            ("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=name, reason=name), {S.PERMISSION_DENIED: "not held"}),
            (
                "BeginUpload",
                pb.BeginUploadRequest(lease_id=me.lease.lease_id, size=10, sha256=name),
                {S.INVALID_ARGUMENT: "sha256"},
            ),
            (
                "BeginUpload",
                pb.BeginUploadRequest(lease_id=name, size=10, sha256="ab" * 32),
                {S.PERMISSION_DENIED: "not held"},
            ),
            ("UploadChunks", [chunk(name, 0, data)], {S.NOT_FOUND: "no upload"}),
            ("QueryUpload", pb.QueryUploadRequest(upload_id=name), {S.NOT_FOUND: "no upload"}),
            ("CompleteUpload", pb.CompleteUploadRequest(upload_id=name), {S.NOT_FOUND: "no upload"}),
            ("Download", pb.DownloadRequest(sha256=name), {S.NOT_FOUND: None}),
            ("Download", pb.DownloadRequest(sha256=f"{shard}/{name}"), {S.NOT_FOUND: None}),
        ]
        for method, request, allowed in refusals:
            allowed.setdefault(S.INVALID_ARGUMENT, None)  # a bound on the field may refuse it first
            check(me.call(method, request), allowed, f"{method} with {name!r}")
        assert_unchanged(server, before, f"refusals naming {name!r}")

        # Calls that may succeed with such a name; they must store it, never use it as a path.
        out = me.call("AcquireLease", pb.AcquireLeaseRequest(local_dataset=name))
        check(out, {OK: None, S.INVALID_ARGUMENT: None}, f"AcquireLease(local_dataset={name!r})")
        renewed = {("leases", me.lease.lease_id, "deadline_at")}
        assert_changes_within(diff(before, registry_state(server)), renewed, f"AcquireLease({name!r})")
        token = server.registry.create_invite("island", 60)
        before = registry_state(server)
        anonymous = Wire(server.address)
        out = anonymous.call("Enroll", pb.EnrollRequest(token=token, name=name))
        anonymous.close()
        check(out, {OK: None, S.INVALID_ARGUMENT: None}, f"Enroll(name={name!r})")
        allowed = {("invites", None, "used_at"), ("invites", None, "island_id"), ("islands", None, "+row")}
        assert_changes_within(diff(before, registry_state(server)), allowed, f"Enroll(name={name!r})")

    after_disk = watched(jail)
    home = server.home.root
    for folder, paths in before_disk.items():
        added, removed = after_disk[folder] - paths, paths - after_disk[folder]
        if folder == str(home.parent):
            prefix = f"{home.name}/"
            added = {p for p in added if p.removeprefix(prefix) not in DATABASE_FILES}
        assert not added and not removed, f"under {folder}: added {sorted(added)[:5]}, removed {sorted(removed)[:5]}"
    for name, digest in secrets_before.items():
        assert hashlib.sha256((home / name).read_bytes()).hexdigest() == digest
    assert me.ok("QueryUpload", pb.QueryUploadRequest(upload_id=own.upload_id)).committed_offset == 0
