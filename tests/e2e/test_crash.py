"""Crashes at every stage, with real processes on loopback.

The coordinator (`ddm-coordinator serve`) is SIGKILLed at each stage of an upload and of
router training by a fault point (coordinator/faults.py, armed through DDM_FAULT), then served
again without it; islands are SIGKILLed while downloading their data and while uploading;
connections are cut mid-stream by a TCP proxy (proxy.py). After each, the run ends with a
published ensemble and every finished artifact intact (intact.py says what that means).

An island killed mid-training is test_faults.py's; the chaos test (test_chaos.py) kills at
random moments.

One coordinator home and its two experts, trained for their leases, are made once for the
module; each test serves its own copy. The experts use the `small` preset (1.3 MB), so that an
upload in 1 MiB chunks has two: a crash can fall between them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from client.connection import ClientError, Connection
from client.island import enroll
from client.state import IslandState
from client.transfer import upload_checkpoint
from coordinator.bootstrap import lease_train_config
from coordinator.home import Home
from coordinator.registry import Registry
from ddm_model.data import load_dataset_file
from ddm_model.dit import DiTConfig
from ddm_model.train import train_expert
from protocol import ddm_pb2 as pb
from protocol.limits import MiB
from protocol.trust import verify_signature

from .conftest import TLS_LINE, Coordinator, child_env, cli, sha256_of, wait_for
from .intact import assert_intact
from .proxy import Proxy

INIT = [
    "--experts", "2", "--preset", "small", "--steps", "40", "--router-preset", "tiny", "--router-steps", "30",
    "--heartbeat-seconds", "1", "--lease-seconds", "120",
]  # fmt: skip


@dataclass
class Template:
    home: Path
    fingerprint: str  # the signing key's
    tls_fingerprint: str  # the TLS certificate's
    checkpoints: dict[int, Path]  # expert id -> a checkpoint trained for its lease
    shard_fingerprints: dict[int, str]
    tokens: dict[str, list[str]]  # role -> invites made in the template, so valid in every copy


class Copy(Coordinator):
    """A served copy of the template; ``invite`` hands out the template's invites (no process
    per invite)."""

    def __init__(self, home: Path, template: Template, run, spawn):
        super().__init__(home, template.fingerprint, template.tls_fingerprint, run, spawn)
        self.tokens = {role: list(tokens) for role, tokens in template.tokens.items()}

    def invite(self, role: str = "island") -> str:
        return self.tokens[role].pop()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    root = tmp_path_factory.mktemp("crash")
    home = Home(root / "home")
    made = subprocess.run(
        [*cli("ddm-coordinator"), "init", "--home", str(home.root), *INIT],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    config = home.load_config()
    registry = Registry(home.database_url(config))
    experts = registry.experts()
    tokens = {role: [registry.create_invite(role, 86400) for _ in range(4)] for role in ("island", "reader")}
    registry.close()
    checkpoints, fingerprints = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see serve()
    try:
        for e in experts:
            _train(home, config, e, root, checkpoints, fingerprints)
    finally:
        torch.set_num_threads(threads)
    assert all(p.stat().st_size > MiB for p in checkpoints.values())  # two 1 MiB chunks
    lines = made.stdout.strip().splitlines()
    tls_fingerprint = next(line[len(TLS_LINE) :] for line in lines if line.startswith(TLS_LINE))
    return Template(home.root, lines[-1], tls_fingerprint, checkpoints, fingerprints, tokens)


def _train(home: Home, config, e, root: Path, checkpoints: dict, fingerprints: dict) -> None:
    data = load_dataset_file(home.artifacts / e.shard_sha256, expect_fingerprint=e.shard_fingerprint)
    settings = lease_train_config(config, e.id)
    trained = train_expert(data, DiTConfig.from_dict(config.model), settings, progress=False)
    checkpoints[e.id] = root / f"expert-{e.id}.safetensors"
    trained.export(checkpoints[e.id], e.shard_fingerprint, cluster_id=e.cluster_id)
    fingerprints[e.id] = e.shard_fingerprint


@pytest.fixture
def coord(template, tmp_path, run, spawn) -> Copy:
    """A copy of the template home, not yet served."""
    home = tmp_path / "home"
    shutil.copytree(template.home, home)
    return Copy(home, template, run, spawn)


# -- helpers -----------------------------------------------------------------------------------------


def serve(coord: Coordinator, fault: str | None = None, same_port: bool = False) -> None:
    """Serve the home, with ``fault`` armed; one torch thread, as the islands have (the router
    trains inside serve, and two spinning threads on a busy 2-core machine run many times slower)."""
    env = {"OMP_NUM_THREADS": "1", **({"DDM_FAULT": fault} if fault else {})}
    coord.start(env=env, same_port=same_port)


def killed_at(coord: Coordinator, point: str) -> None:
    """The serving process died of SIGKILL at ``point``."""
    code = coord.proc.wait(timeout=60)
    assert code == -signal.SIGKILL, (code, coord.log()[-3000:])
    assert f"fault point {point.split(':')[0]}: killing process" in coord.log(), coord.log()[-3000:]


def published(coord: Coordinator, timeout: float = 90) -> dict:
    def check():
        if coord.proc.poll() is not None:
            raise AssertionError(f"serve exited with {coord.proc.poll()}: {coord.log()[-3000:]}")
        return coord.db("SELECT * FROM ensembles WHERE state = 'published'")

    return wait_for(check, timeout, "a published ensemble", every=0.2)[0]


def library_island(coord: Coordinator, tmp_path: Path, address: str | None = None, attempts: int = 1):
    """An island driven by the client library from this process: (identity, connection)."""
    state = IslandState(tmp_path / "library-island")
    identity = enroll(state, coord.address, coord.invite(), "library", "island", coord.fingerprint, coord.tls)
    return identity, Connection(address or coord.address, identity.credential, attempts=attempts, tls=coord.tls)


def take_lease(conn: Connection) -> pb.Lease:
    reply = conn.unary("AcquireLease", pb.AcquireLeaseRequest())
    assert reply.WhichOneof("result") == "lease", reply
    return reply.lease


def upload_next(conn: Connection, template: Template) -> pb.Lease:
    """Take the next lease and upload the template's checkpoint of its expert."""
    lease = take_lease(conn)
    upload_checkpoint(conn, lease.lease_id, template.checkpoints[lease.expert_id])
    return lease


def finish_the_other_expert(coord: Coordinator, template: Template, tmp_path: Path) -> None:
    """A library island uploads the expert still open; the run then publishes, every artifact intact."""
    _, conn = library_island(coord, tmp_path)
    upload_next(conn, template)
    conn.close()
    published(coord)
    assert_intact(coord)


def seeded_state(template: Template, state: Path) -> Path:
    """An island state folder whose outbox already holds a finished checkpoint for either expert,
    so that `join` goes straight from its data to the upload."""
    outbox = state / "outbox"
    outbox.mkdir(parents=True)
    for expert_id, path in template.checkpoints.items():
        fingerprint = template.shard_fingerprints[expert_id]
        shutil.copyfile(path, outbox / f"expert-{expert_id}-{fingerprint[:16]}.safetensors")
    return state


def join(coord: Coordinator, state: Path, address: str | None = None, token: bool = True) -> list:
    args = ["join", "--coordinator", address or coord.address, "--tls-fingerprint", coord.tls_fingerprint]
    args += ["--state-dir", state, "--once", "--threads", "1"]
    return [*args, "--token", coord.invite()] if token else args


def alive(child, what: str, condition):
    def check():
        if child.poll() is not None:
            raise AssertionError(f"{what} exited with {child.poll()}: {child.stderr()[-2000:]}")
        return condition()

    return check


# -- the coordinator killed during an upload ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "committed", "staged"),
    [
        ("upload.chunk_written:2", MiB, "all"),  # the second chunk is on disk, not committed
        ("upload.chunk_committed:1", MiB, MiB),  # the first chunk is committed
    ],
)
def test_coordinator_killed_between_chunks(point, committed, staged, template, coord, tmp_path):
    serve(coord, point)
    identity, conn = library_island(coord, tmp_path)
    lease = take_lease(conn)
    path = template.checkpoints[lease.expert_id]
    size, digest = path.stat().st_size, sha256_of(path)
    with pytest.raises(ClientError):
        upload_checkpoint(conn, lease.lease_id, path, chunk_bytes=MiB)
    conn.close()
    killed_at(coord, point)

    # The committed offset counts only what was committed; bytes past it may sit in staging.
    [row] = coord.db("SELECT * FROM uploads")
    assert row["state"] == "open" and row["committed_offset"] == committed, row
    staged_file = coord.home / "staging" / row["id"]
    assert staged_file.stat().st_size == (size if staged == "all" else staged)
    with open(staged_file, "rb") as s, open(path, "rb") as f:
        assert s.read(committed) == f.read(committed)

    serve(coord)
    conn = coord.connection(identity.credential, attempts=1)
    report = upload_checkpoint(conn, lease.lease_id, path, chunk_bytes=MiB)
    assert report.upload_id == row["id"] and report.resumed_from == committed
    assert report.sent_offsets == list(range(committed, size, MiB))  # nothing committed is sent again
    verify_signature(identity.public_key, report.reply.entry_json, report.reply.signature, "the entry")
    assert json.loads(report.reply.entry_json)["sha256"] == digest
    [row] = coord.db("SELECT * FROM uploads")
    assert row["state"] == "complete" and row["chunks"] == 2 and row["bytes_received"] == size, row

    upload_next(conn, template)  # the other expert
    conn.close()
    published(coord)
    assert_intact(coord)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "expert_state"),
    [
        ("complete.stored", "uploaded"),  # the checkpoint is in the store, unregistered
        ("complete.verified", "verified"),  # ... and the expert verified
        ("complete.signed", "verified"),  # ... and the entry signed, not yet registered
    ],
)
def test_coordinator_killed_while_completing_an_upload(point, expert_state, template, coord, spawn, tmp_path):
    serve(coord, point)
    island = spawn("ddm-client", *join(coord, seeded_state(template, tmp_path / "island")), label="island")
    killed_at(coord, point)

    # The checkpoint was moved into the store; no row names it yet.
    [upload] = coord.db("SELECT * FROM uploads")
    assert upload["state"] == "open" and upload["committed_offset"] == upload["size"]
    assert (coord.home / "artifacts" / upload["sha256"]).exists()
    assert not (coord.home / "staging" / upload["id"]).exists()
    assert coord.db("SELECT * FROM artifacts WHERE sha256 = ?", upload["sha256"]) == []
    [expert] = coord.db("SELECT state FROM experts WHERE id = ?", upload["expert_id"])
    assert expert["state"] == expert_state

    # Served again on the same address: reconciliation keeps the file of the open upload, and
    # the island, retrying all along, finishes.
    serve(coord, same_port=True)
    assert f"kept {upload['sha256'][:12]}…: the checkpoint of open upload {upload['id']}" in coord.log()
    assert island.wait(timeout=120) == 0, island.stderr()[-3000:]
    assert "unreachable; retrying" in island.stderr()
    [done] = coord.db("SELECT * FROM uploads WHERE id = ?", upload["id"])
    assert done["state"] == "complete" and done["chunks"] == 1
    [expert] = coord.db("SELECT state, checkpoint_sha256 FROM experts WHERE id = ?", upload["expert_id"])
    assert expert == {"state": "signed", "checkpoint_sha256": upload["sha256"]}

    finish_the_other_expert(coord, template, tmp_path)


# -- the coordinator killed during router training ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("point", ["router.training:2", "router.stored"])
def test_coordinator_killed_during_router_training(point, template, coord, run, tmp_path):
    serve(coord, point)
    _, conn = library_island(coord, tmp_path)
    for _ in range(2):
        upload_next(conn, template)
    conn.close()
    killed_at(coord, point)

    [ensemble] = coord.db("SELECT * FROM ensembles")
    assert ensemble["state"] == "training"
    rows = {r["sha256"] for r in coord.db("SELECT sha256 FROM artifacts")}
    orphans = [p.name for p in (coord.home / "artifacts").iterdir() if p.name not in rows]
    if point == "router.training:2":
        assert ensemble["router_step"] == 20 and orphans == []  # progress reports come every 10 steps
    else:
        assert ensemble["router_step"] == 30 and len(orphans) == 1  # the router, stored, not published

    serve(coord)
    final = published(coord)
    assert final["id"] == ensemble["id"] + 1
    [interrupted] = coord.db("SELECT state, reason FROM ensembles WHERE id = ?", ensemble["id"])
    assert interrupted["state"] == "failed" and "restart" in interrupted["reason"]
    if orphans:
        assert f"removed the orphan {orphans[0][:12]}…" in coord.log()
        [event] = coord.db("SELECT detail FROM events WHERE kind = 'store_orphan_removed'")
        assert json.loads(event["detail"]) == {"sha256": orphans[0]}
    manifest = assert_intact(coord)
    assert manifest["ensemble_id"] == final["id"] and manifest["router"]["steps"] == 30
    if not orphans:
        return

    # A reader downloads it and verifies every signature and hash against the pinned key.
    reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
    out = tmp_path / "ensemble"
    got = run("ddm-client", "download", *coord.connect_args, "--out", out, "--fingerprint", coord.fingerprint, *reader)
    assert got.returncode == 0, got.stderr[-3000:]
    assert sha256_of(out / "router.safetensors") == manifest["router"]["sha256"]


# -- islands killed while downloading and uploading ---------------------------------------------------


@pytest.mark.slow
def test_island_killed_while_downloading_and_while_uploading(template, coord, spawn, run, tmp_path):
    serve(coord)
    proxy = Proxy(coord.address)
    try:
        state = seeded_state(template, tmp_path / "island")

        # Killed with its data shard half received: the proxy holds back the rest.
        proxy.arm("down", 20_000, "stall")
        first = spawn("ddm-client", *join(coord, state, proxy.address), label="island-download")
        wait_for(alive(first, "the island", proxy.tripped.is_set), 60, "the island to be mid-download")
        [lease] = coord.db("SELECT * FROM leases")
        assert coord.db("SELECT * FROM uploads") == []
        first.kill()
        assert not list((state / "shards").glob("*.safetensors"))  # only a .part, if anything

        # Killed again with its checkpoint half sent.
        proxy.arm("up", 400_000, "stall")
        second = spawn("ddm-client", *join(coord, state, proxy.address, token=False), label="island-upload")
        wait_for(alive(second, "the island", proxy.tripped.is_set), 60, "the island to be mid-upload")
        [upload] = coord.db("SELECT * FROM uploads")
        assert upload["state"] == "open" and upload["committed_offset"] == 0
        second.kill()

        # Restarted a third time, it finishes on the same lease and the same upload.
        third = run("ddm-client", *join(coord, state, proxy.address, token=False), timeout=120)
        assert third.returncode == 0, third.stderr[-3000:]
    finally:
        proxy.close()
    assert [(r["id"], r["state"]) for r in coord.db("SELECT * FROM leases")] == [(lease["id"], "completed")]
    [done] = coord.db("SELECT * FROM uploads")
    assert done["id"] == upload["id"] and done["state"] == "complete" and done["chunks"] == 1
    [shard] = list((state / "shards").glob("*.safetensors"))
    [expert] = coord.db("SELECT * FROM experts WHERE id = ?", lease["expert_id"])
    assert shard.name == f"{expert['shard_sha256']}.safetensors" and sha256_of(shard) == expert["shard_sha256"]
    assert sha256_of(state / "signed" / f"expert-{expert['id']}.safetensors") == expert["checkpoint_sha256"]

    finish_the_other_expert(coord, template, tmp_path)


# -- connections cut mid-stream -----------------------------------------------------------------------


@pytest.mark.slow
def test_connection_cut_mid_stream_resumes_from_the_committed_offset(template, coord, run, tmp_path):
    serve(coord)
    proxy = Proxy(coord.address)
    try:
        # The client library, in 1 MiB chunks: cut inside the second chunk once the first is
        # committed, it resumes by itself from the first chunk's end.
        _, conn = library_island(coord, tmp_path, address=proxy.address, attempts=8)
        lease = take_lease(conn)
        path = template.checkpoints[lease.expert_id]
        size = path.stat().st_size
        proxy.arm("up", MiB + MiB // 8, "stall")
        with ThreadPoolExecutor(1) as pool:
            upload = pool.submit(upload_checkpoint, conn, lease.lease_id, path, chunk_bytes=MiB)
            wait_for(lambda: coord.db("SELECT 1 FROM uploads WHERE committed_offset = ?", MiB), 60, "chunk 1")
            assert proxy.cut() == 1
            report = upload.result(timeout=120)
        conn.close()
        assert report.sent_offsets == [0, MiB, MiB], report.sent_offsets
        [row] = coord.db("SELECT * FROM uploads")
        assert row["state"] == "complete" and row["chunks"] == 2 and row["bytes_received"] == size, row

        # A real island, its one-chunk upload cut halfway.
        proxy.arm("up", 600_000, "drop")
        island = run("ddm-client", *join(coord, seeded_state(template, tmp_path / "island"), proxy.address))
        assert island.returncode == 0, island.stderr[-3000:]
        assert proxy.tripped.is_set()
        assert len(coord.db("SELECT * FROM uploads")) == 2  # the cut upload was resumed, not begun anew
        published(coord)
        manifest = assert_intact(coord)

        # A reader's download, cut partway, resumes and verifies.
        proxy.arm("down", 300_000, "drop")
        reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
        out = tmp_path / "ensemble"
        args = ["download", "--coordinator", proxy.address, "--tls-fingerprint", coord.tls_fingerprint]
        args += ["--out", out, "--fingerprint", coord.fingerprint]
        got = run("ddm-client", *args, *reader)
        assert got.returncode == 0, got.stderr[-3000:]
        assert proxy.tripped.is_set()
    finally:
        proxy.close()
    for item in manifest["experts"]:
        entry = item["entry"]
        assert sha256_of(out / f"expert-{entry['cluster_id']}.safetensors") == entry["sha256"]
