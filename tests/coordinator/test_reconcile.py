"""Reconciliation of the registry with the store, on a real home: real SQLite, real files.

Signed experts and a published ensemble are made through the registry's own calls with
stand-in bytes (reconciliation never reads a checkpoint), then the home is damaged the way a
crash, a disk or a person would.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home, HomeBusy, HomeLock
from coordinator.keys import SigningKey
from coordinator.reconcile import ReconcileError, reconcile
from coordinator.registry import Registry
from coordinator.server import CoordinatorServer
from coordinator.status import build_status
from coordinator.store import Store
from tests.helpers import one_line_error

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconcile") / "home"
    init_home(InitOptions(home=root, experts=4, preset="tiny", steps=3, clustering="random", router_steps=5))
    return root


class Bench:
    """A copy of the template home with its registry and store open."""

    def __init__(self, root: Path):
        self.home = Home(root)
        self.registry = Registry(self.home.database_url(self.home.load_config()))
        self.store = Store(self.home.artifacts, self.home.staging)

    def upload(self, payload: bytes, into_store: bool = False, commit: bool = True):
        """A new island's open upload of ``payload`` for the next free expert; its bytes are
        staged (and, with ``into_store``, moved into the store as CompleteUpload does before
        registering). Returns (island id, expert id, upload)."""
        island, _ = self.registry.redeem_invite(self.registry.create_invite("island", 60), "bench")
        grant = self.registry.acquire_lease(island.id)
        sha = hashlib.sha256(payload).hexdigest()
        upload, _ = self.registry.begin_upload(island.id, grant.lease_id, len(payload), sha, 1 << 30)
        self.store.write_chunk(upload.id, 0, payload)
        if commit:
            self.registry.commit_chunk(island.id, upload, 0, len(payload))
        if into_store:
            self.store.add_file(self.store.staging_path(upload.id), move=True, digest=sha)
        return island.id, grant.expert_id, upload

    def sign(self, payload: bytes) -> tuple[int, str]:
        island_id, expert_id, upload = self.upload(payload, into_store=True)
        self.registry.mark_verified(island_id, upload)
        self.registry.register_expert(island_id, upload, len(payload), 3, b'{"entry": "x"}', b"sig")
        return expert_id, upload.sha256

    def publish(self, experts: list[tuple[int, str]], router: bytes = b"a router") -> tuple[int, str]:
        ensemble_id = self.registry.start_ensemble(len(experts), 5)
        staged = self.home.root / "router.tmp-bytes"
        staged.write_bytes(router)
        router_sha, size = self.store.add_file(staged, move=True)
        manifest = {
            "router": {"sha256": router_sha, "clusters": [e for e, _ in experts]},
            "experts": [{"entry": {"sha256": sha, "expert_id": e}} for e, sha in experts],
        }
        shas = [sha for _, sha in experts]
        self.registry.publish_ensemble(ensemble_id, router_sha, size, shas, json.dumps(manifest).encode(), b"sig")
        return ensemble_id, router_sha

    def events(self, *kinds) -> list[dict]:
        return [
            {"kind": e.kind, "expert_id": e.expert_id, **json.loads(e.detail)}
            for e in self.registry.events()
            if e.kind in kinds
        ]

    def run(self, **kwargs):
        return reconcile(self.home, self.registry, self.store, **kwargs)


@pytest.fixture
def bench(template, tmp_path):
    shutil.copytree(template, tmp_path / "home")
    b = Bench(tmp_path / "home")
    yield b
    b.registry.close()


def listing(bench) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(bench.home.artifacts)), sorted(os.listdir(bench.home.staging))


def test_a_clean_home_needs_nothing(bench):
    result = bench.run(rehash=True)
    assert result.integrity == "ok"
    assert (result.actions, result.problems, result.notes) == ([], [], [])
    assert result.artifacts == result.hashed == 5  # 4 shards and the clustering
    assert result.summary() == "registry integrity ok; 5 artifacts, 5 re-hashed; 0 changed; 0 problem(s)"


def test_crash_leftovers_go_and_open_uploads_stay(bench):
    signed = [bench.sign(b"expert zero"), bench.sign(b"expert one")]
    ensemble_id, router_sha = bench.publish(signed)
    *_, in_store = bench.upload(b"moved into the store, not yet registered", into_store=True)
    *_, staged = bench.upload(b"half sent", commit=False)
    artifacts, staging, work = bench.home.artifacts, bench.home.staging, bench.home.work
    (artifacts / f".{'c' * 64}.tmp").write_bytes(b"cut short")
    orphan = hashlib.sha256(b"an orphan").hexdigest()
    (artifacts / orphan).write_bytes(b"an orphan")
    (artifacts / "README").write_text("not ours")
    (staging / "f00d").write_bytes(b"bytes of a finished upload")
    work.mkdir()
    (work / f"router-{ensemble_id}.safetensors").write_bytes(b"exported, then stored")
    (work / "router-0-1").mkdir()  # the published ensemble's clusters
    (work / "router-0-1" / "resume.pt").write_bytes(b"state")
    (work / "router-1-2").mkdir()  # clusters no ensemble was published for: kept for a resume

    result = bench.run()
    assert result.problems == []
    assert result.actions == [
        f"removed the unfinished store write .{'c' * 64}.tmp",
        f"removed the orphan {orphan[:12]}… (no artifact row names it)",
        "removed staged bytes f00d (no open upload)",
        "removed the router training state router-0-1 of a published ensemble",
        f"removed the exported router router-{ensemble_id}.safetensors of a finished assembly",
    ]
    assert result.notes == [
        "artifacts/README is not a ddm artifact; left alone",
        f"kept {in_store.sha256[:12]}…: the checkpoint of open upload {in_store.id}",
    ]
    files, staged_files = listing(bench)
    assert orphan not in files and in_store.sha256 in files and router_sha in files and "README" in files
    assert not [f for f in files if f.endswith(".tmp")]
    assert staged_files == [staged.id]
    assert sorted(os.listdir(work)) == ["router-1-2"]
    removals = ("store_tmp_removed", "store_orphan_removed", "staging_removed", "work_removed")
    kinds = [e["kind"] for e in bench.events(*removals)]
    assert kinds == ["store_tmp_removed", "store_orphan_removed", "staging_removed", "work_removed", "work_removed"]

    # Nothing is left to do, and nothing that is still needed was touched.
    again = bench.run()
    assert again.actions == [] and again.problems == []
    assert bench.registry.latest_published().id == ensemble_id


def test_a_lost_expert_checkpoint_reopens_the_expert_and_withdraws_the_ensemble(bench):
    (e0, sha0), (e1, sha1) = bench.sign(b"expert zero"), bench.sign(b"expert one")
    ensemble_id, router_sha = bench.publish([(e0, sha0), (e1, sha1)])
    (bench.home.artifacts / sha0).chmod(0o644)
    (bench.home.artifacts / sha0).unlink()

    result = bench.run()
    assert result.problems == [f"expert artifact {sha0[:12]}… is lost: its file is missing"]
    assert result.actions == [
        f"dropped the lost expert {sha0[:12]}…: expert {e0} reopened for retraining, ensemble {ensemble_id} withdrawn"
    ]
    expert = bench.registry.expert(e0)
    assert (expert.state, expert.checkpoint_sha256, expert.signature, expert.island_id) == ("open", None, None, None)
    assert bench.registry.expert(e1).state == "signed"
    assert bench.registry.latest_published() is None  # no manifest naming a missing file is served
    snap = bench.registry.snapshot()
    [ensemble] = snap["ensembles"]
    assert ensemble["state"] == "withdrawn" and sha0[:12] in ensemble["reason"]
    rows = {a["sha256"] for a in snap["artifacts"]}
    assert sha0 not in rows and router_sha in rows
    [missing] = bench.events("artifact_missing")
    assert missing["sha256"] == sha0 and missing["action"] == "dropped" and missing["experts_reopened"] == [e0]
    assert [e["expert_id"] for e in bench.events("expert_reopened")] == [e0]
    assert [e["kind"] for e in bench.events("ensemble_withdrawn")] == ["ensemble_withdrawn"]
    status = build_status(bench.home, bench.home.load_config(), bench.registry, "fp")
    assert status["ensemble"]["state"] == "withdrawn" and status["router"]["state"] == "withdrawn"
    flagged = [f["kind"] for f in status["store"]["flagged"]]
    assert flagged == ["artifact_missing", "ensemble_withdrawn", "expert_reopened"]
    assert status["store"]["missing"] == []  # the lost row is gone; its consequences are in the flags

    # The expert is leased again and the same checkpoint is accepted again.
    assert bench.sign(b"expert zero") == (e0, sha0)
    assert bench.run().actions == []


def test_a_lost_student_withdraws_the_version_that_names_it_and_no_other(bench):
    signed = [bench.sign(b"expert zero"), bench.sign(b"expert one")]
    base, _ = bench.publish(signed)
    staged = bench.home.root / "student.tmp-bytes"
    staged.write_bytes(b"a student")
    sha, size = bench.store.add_file(staged, move=True)
    manifest = json.loads(bench.registry.latest_published().manifest_json)
    version = bench.registry.publish_student(
        base,
        sha,
        size,
        lambda v: (json.dumps({**manifest, "ensemble_id": v, "student": {"sha256": sha}}).encode(), b"s"),
    )
    assert bench.registry.latest_published().id == version
    (bench.home.artifacts / sha).chmod(0o644)
    (bench.home.artifacts / sha).unlink()

    result = bench.run()
    assert result.problems == [f"student artifact {sha[:12]}… is lost: its file is missing"]
    assert result.actions == [f"dropped the lost student {sha[:12]}…: ensemble {version} withdrawn"]
    # The version without the student is served again; the experts stay signed.
    assert bench.registry.latest_published().id == base
    assert [bench.registry.expert(e).state for e, _ in signed] == ["signed", "signed"]
    assert bench.run().actions == []


def test_damaged_files_are_set_aside(bench):
    signed = [bench.sign(b"expert zero"), bench.sign(b"expert one")]
    _, router_sha = bench.publish(signed)
    router = bench.home.artifacts / router_sha
    router.chmod(0o644)
    router.write_bytes(b"a rout")  # the wrong size: found at every start
    shard_sha = bench.registry.expert(2).shard_sha256
    shard = bench.home.artifacts / shard_sha
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))  # the same size: found only by --hash

    quick = bench.run()
    assert quick.problems == [f"router artifact {router_sha[:12]}… is lost: its file holds 6 bytes, 8 were registered"]
    assert bench.registry.latest_published() is None
    assert (bench.home.damaged / router_sha).read_bytes() == b"a rout"

    hashed = bench.run(rehash=True)
    assert hashed.hashed == 7  # 4 shards, the clustering, 2 experts
    [problem] = hashed.problems
    assert problem.startswith(f"shard artifact {shard_sha[:12]}… is lost: its file hashes to")
    assert hashed.actions == [
        f"moved the damaged shard file {shard_sha[:12]}… to damaged/",
        f"flagged the missing shard {shard_sha[:12]}…; restore artifacts/{shard_sha} from a backup",
    ]
    assert not shard.exists() and (bench.home.damaged / shard_sha).exists()
    status = build_status(bench.home, bench.home.load_config(), bench.registry, "fp")
    assert status["store"]["missing"] == [{"sha256": shard_sha, "kind": "shard", "reason": "missing"}]


def test_a_dry_run_changes_nothing(bench):
    e0, sha0 = bench.sign(b"expert zero")
    (bench.home.artifacts / sha0).chmod(0o644)
    (bench.home.artifacts / sha0).unlink()
    (bench.home.staging / "f00d").write_bytes(b"x")
    before = (bench.registry.snapshot(), len(bench.registry.events()), listing(bench))
    result = bench.run(repair=False)
    assert result.actions == [
        f"would drop the lost expert {sha0[:12]}…: expert {e0} reopened for retraining",
        "would remove staged bytes f00d (no open upload)",
    ]
    assert len(result.problems) == 1
    assert (bench.registry.snapshot(), len(bench.registry.events()), listing(bench)) == before


def test_a_lost_staging_file_closes_its_upload(bench):
    island_id, expert_id, upload = bench.upload(b"committed, then lost")
    bench.store.staging_path(upload.id).unlink()
    result = bench.run()
    assert result.problems == [f"upload {upload.id} lost its 20 committed bytes"]
    assert bench.registry.upload_for(island_id, upload.id).state == "rejected"
    # The island's next BeginUpload starts afresh.
    grant = bench.registry.acquire_lease(island_id)
    again, _ = bench.registry.begin_upload(island_id, grant.lease_id, 20, upload.sha256, 1 << 30)
    assert again.id != upload.id and again.committed_offset == 0 and grant.expert_id == expert_id


# -- a registry that must not be served -----------------------------------------------------------


def test_a_corrupt_or_missing_registry_is_refused(bench):
    bench.registry.close()
    db = bench.home.root / "ddm.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 8 * 4096
    for offset in range(2 * 4096, 6 * 4096, 7):
        data[offset] ^= 0x5A
    db.write_bytes(bytes(data))
    with pytest.raises(ReconcileError) as refused:
        CoordinatorServer(bench.home, "127.0.0.1:0")
    message = one_line_error(refused)
    assert "ddm.db" in message and "restore it from a backup" in message
    # The refused server let go of the home: the next attempt meets the same error, not a lock.
    with pytest.raises(ReconcileError):
        CoordinatorServer(bench.home, "127.0.0.1:0")

    for leftover in bench.home.root.glob("ddm.db*"):
        leftover.unlink()
    with pytest.raises(ReconcileError) as empty:
        CoordinatorServer(bench.home, "127.0.0.1:0")
    assert "holds no experts" in one_line_error(empty)
    assert sorted(os.listdir(bench.home.artifacts))  # nothing was removed as an orphan


def test_one_process_serves_a_home(bench):
    lock = HomeLock(bench.home)
    try:
        with pytest.raises(HomeBusy) as busy:
            HomeLock(bench.home)
        assert f"pid {os.getpid()}" in one_line_error(busy)
    finally:
        lock.release()
    HomeLock(bench.home).release()


def check(home: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    command = [sys.executable, "-m", "coordinator.cli", "check", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_the_check_command(bench):
    e0, sha0 = bench.sign(b"expert zero")
    (bench.home.artifacts / sha0).chmod(0o644)
    (bench.home.artifacts / sha0).unlink()
    (bench.home.staging / "f00d").write_bytes(b"x")
    bench.registry.close()

    # While a coordinator serves the home, check only reports.
    lock = HomeLock(bench.home)
    try:
        busy = check(bench.home.root, "--hash")
    finally:
        lock.release()
    assert busy.returncode == 1, busy.stderr
    assert "reporting only, nothing is changed" in busy.stdout
    assert "would remove staged bytes f00d" in busy.stdout and (bench.home.staging / "f00d").exists()

    fixed = check(bench.home.root, "--hash")
    assert fixed.returncode == 1, fixed.stderr  # a lost artifact stays a problem to report
    assert f"problem: expert artifact {sha0[:12]}… is lost" in fixed.stdout
    assert "removed staged bytes f00d" in fixed.stdout
    assert fixed.stdout.strip().splitlines()[-1] == (
        "registry integrity ok; 6 artifacts, 5 re-hashed; 2 changed; 1 problem(s)"
    )
    clean = check(bench.home.root)
    assert clean.returncode == 0
    assert clean.stdout.strip() == "registry integrity ok; 5 artifacts; 0 changed; 0 problem(s)"
    assert Registry(bench.home.database_url(bench.home.load_config())).expert(e0).state == "open"

    (bench.home.root / "ddm.db").write_bytes(b"not a database at all" * 500)
    broken = check(bench.home.root)
    assert broken.returncode == 2 and broken.stdout == ""
    [line] = broken.stderr.strip().splitlines()
    assert line.startswith("error: cannot read the registry database") and "restore it from a backup" in line


def test_status_shows_a_missing_artifact(bench):
    sha = bench.registry.expert(1).shard_sha256
    (bench.home.artifacts / sha).chmod(0o644)
    (bench.home.artifacts / sha).unlink()
    fingerprint = SigningKey.load(bench.home.key_path).fingerprint
    status = build_status(bench.home, bench.home.load_config(), bench.registry, fingerprint)
    assert status["store"] == {
        "artifacts": 5,
        "missing": [{"sha256": sha, "kind": "shard", "reason": "missing"}],
        "flagged": [],
    }


def test_a_withdrawn_ensemble_unpublishes_what_it_named_as_revoke_exclude_does(bench):
    """Reconciliation and `revoke --exclude` withdraw an ensemble the same way: every artifact
    it named that no other published ensemble names stops being served, its router included."""
    (e0, sha0), (e1, sha1) = bench.sign(b"expert zero"), bench.sign(b"expert one")
    _, router_sha = bench.publish([(e0, sha0), (e1, sha1)])
    (bench.home.artifacts / sha0).chmod(0o644)
    (bench.home.artifacts / sha0).unlink()
    bench.run()

    published = {a["sha256"]: a["published"] for a in bench.registry.snapshot()["artifacts"]}
    assert published[router_sha] is False and published[sha1] is False
    assert sorted(e["sha256"] for e in bench.events("unpublished")) == sorted([router_sha, sha1])
    reader, _ = bench.registry.redeem_invite(bench.registry.create_invite("reader", 60), "reader")
    assert bench.registry.readable_by(reader, router_sha) is None
    assert bench.registry.readable_by(reader, sha1) is None


def test_a_damaged_manifest_does_not_stop_reconciliation(bench):
    """A published ensemble whose stored manifest no longer parses still has its lost router
    handled: the ensemble is withdrawn, its router row dropped, and the registry stays servable."""
    signed = [bench.sign(b"expert zero"), bench.sign(b"expert one")]
    ensemble_id, router_sha = bench.publish(signed)
    with bench.registry.transaction() as s:  # the row damaged as a disk or a person would
        from coordinator.registry import Ensemble

        s.get(Ensemble, ensemble_id).manifest_json = b"{not json"
    (bench.home.artifacts / router_sha).chmod(0o644)
    (bench.home.artifacts / router_sha).unlink()
    result = bench.run()
    assert result.problems == [f"router artifact {router_sha[:12]}… is lost: its file is missing"]
    [ensemble] = bench.registry.snapshot()["ensembles"]
    assert ensemble["state"] == "withdrawn"
    assert router_sha not in {a["sha256"] for a in bench.registry.snapshot()["artifacts"]}
