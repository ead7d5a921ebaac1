"""Several `ddm-coordinator serve` processes on one PostgreSQL registry and one home folder.

- Spread: two processes on two ports, one island joined through each (as islands spread by a
  load balancer would be); both experts are signed, exactly one ensemble is assembled and
  published, and a reader downloads and verifies it through either port.
- Chaos: three processes behind a failover TCP balancer (tests/e2e/proxy.py); the first is
  SIGKILLed mid-upload (a chunk durable in staging, its offset not committed), the second
  mid-router-training; the run completes through the third, which takes over the orphaned
  assembly and resumes the router, with every artifact intact.

Real processes throughout: `ddm-coordinator init/serve`, `ddm-client join/download`, the real
PostgreSQL cluster (tests/postgres.py: skipped when it is unreachable, failed under
DDM_REQUIRE_POSTGRES=1). `init` runs once for the module: each test serves a fresh copy of its
home folder and of its database.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import postgres

from .conftest import Coordinator, init_home, sha256_of, wait_for
from .intact import assert_intact
from .proxy import Proxy

INIT = [
    "--experts", "2", "--preset", "tiny", "--steps", "60", "--router-preset", "tiny", "--router-steps", "40",
    "--heartbeat-seconds", "1", "--lease-seconds", "20",
]  # fmt: skip
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@dataclass
class Template:
    home: Path  # made by `init`, never served
    database: str  # the URL its config names, which every copy of the home names too
    pristine: str  # a copy of that database as `init` left it
    fingerprint: str  # the signing key's
    tls_fingerprint: str


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    """A home on PostgreSQL, made once by the real `ddm-coordinator init`."""
    home = tmp_path_factory.mktemp("processes") / "home"
    with postgres.fresh_database() as url:
        fingerprint, tls_fingerprint = init_home(home, *INIT, "--database", url)
        assert json.loads((home / "config.json").read_text())["database_url"] == url
        with postgres.fresh_database(template=url) as pristine:
            yield Template(home, url, pristine, fingerprint, tls_fingerprint)


@pytest.fixture
def coord(template, tmp_path, run, spawn) -> Coordinator:
    """A copy of the template home, on the template's database made again as `init` left it;
    not yet served (each test starts its own `serve` processes)."""
    home = tmp_path / "home"
    shutil.copytree(template.home, home)
    postgres.copy_database(template.pristine, template.database)
    made = Coordinator(home, template.fingerprint, template.tls_fingerprint, run, spawn)
    return on_postgres(made, template.database)


def on_postgres(coord: Coordinator, url: str) -> Coordinator:
    """Make ``coord.db`` read the registry from PostgreSQL (it reads SQLite otherwise)."""
    from psycopg.rows import dict_row

    def db(sql: str, *params) -> list[dict]:
        with postgres.connect(url) as conn:
            return conn.cursor(row_factory=dict_row).execute(sql.replace("?", "%s"), params).fetchall()

    coord.db = db
    return coord


def process(coord: Coordinator, name: str, run, spawn) -> Coordinator:
    """Another `serve` process of the same home."""
    return Coordinator(coord.home, coord.fingerprint, coord.tls_fingerprint, run, spawn, name=name)


def join(spawn, address: str, coord: Coordinator, state, name: str):
    args = ["join", "--coordinator", address, "--tls-fingerprint", coord.tls_fingerprint, "--state-dir", state]
    return spawn("ddm-client", *args, "--token", coord.invite(), "--threads", "1", "--name", name, label=name)


def published(coord: Coordinator) -> list[dict]:
    return coord.db("SELECT id FROM ensembles WHERE state = 'published'")


def download(run, coord: Coordinator, address: str, tmp_path, manifest: dict) -> None:
    # This invite comes from `ddm-coordinator invite` itself, on PostgreSQL; the islands' from the registry.
    reader = ["--token", coord.invite("reader", cli=True), "--state-dir", tmp_path / "reader"]
    out = tmp_path / "ensemble"
    args = ["--coordinator", address, "--tls-fingerprint", coord.tls_fingerprint, "--fingerprint", coord.fingerprint]
    got = run("ddm-client", "download", *args, "--out", out, *reader)
    assert got.returncode == 0, got.stderr[-3000:]
    assert sha256_of(out / "router.safetensors") == manifest["router"]["sha256"]


def finished(islands: list, coord: Coordinator, timeout: float) -> None:
    def done():
        for child in islands:
            code = child.poll()
            assert code in (None, 0), f"an island exited with {code}: {child.stderr()[-2000:]}"
        return published(coord) and all(child.poll() == 0 for child in islands)

    wait_for(done, timeout, "every island done and an ensemble published", every=0.2)


@pytest.mark.slow
def test_islands_spread_over_two_processes_train_and_publish_once(coord, run, spawn, tmp_path):
    first, second = process(coord, "serve-a", run, spawn), process(coord, "serve-b", run, spawn)
    first.start(env=ONE_THREAD)
    second.start(env=ONE_THREAD)  # a SQLite home would refuse a second process; this one serves beside it
    islands = [
        join(spawn, served.address, coord, tmp_path / f"island-{i}", f"island-{i}")
        for i, served in enumerate((first, second))
    ]
    finished(islands, coord, timeout=240)

    manifest = assert_intact(coord)
    kinds = [e["kind"] for e in coord.db("SELECT kind FROM events ORDER BY id")]
    assert kinds.count("assemble") == 1 and kinds.count("published") == 1, kinds
    # Each island's calls went to its own process: both processes served leases and heartbeats.
    leases = coord.db("SELECT island_id, expert_id FROM leases WHERE state = 'completed'")
    assert len(leases) == 2 and len({lease["island_id"] for lease in leases}) == 2
    for served in (first, second):
        assert served.proc.poll() is None, served.log()[-2000:]
    status = json.loads(run("ddm-coordinator", "status", "--home", coord.home, "--json").stdout)
    assert [e["state"] for e in status["experts"]] == ["signed", "signed"]
    download(run, coord, second.address, tmp_path, manifest)


@pytest.mark.slow
def test_a_run_completes_through_the_others_when_processes_are_killed(coord, run, spawn, tmp_path):
    uploading = process(coord, "serve-uploading", run, spawn)
    assembling = process(coord, "serve-assembling", run, spawn)
    survivor = process(coord, "serve-survivor", run, spawn)
    uploading.start(env={**ONE_THREAD, "DDM_FAULT": "upload.chunk_written"})
    assembling.start(env={**ONE_THREAD, "DDM_FAULT": "router.training:2"})
    survivor.start(env=ONE_THREAD)
    # Failover: every connection goes to the first process that is up, so the first upload
    # reaches `uploading`, and what follows reaches `assembling`, until each is killed.
    balancer = Proxy([uploading.address, assembling.address, survivor.address], order="failover")
    try:
        islands = [join(spawn, balancer.address, coord, tmp_path / f"island-{i}", f"island-{i}") for i in range(2)]
        finished(islands, coord, timeout=300)
    finally:
        balancer.close()

    assert uploading.proc.poll() == -9 and "fault point upload.chunk_written" in uploading.log()
    assert assembling.proc.poll() == -9 and "fault point router.training" in assembling.log()
    assert survivor.proc.poll() is None, survivor.log()[-2000:]

    manifest = assert_intact(coord)
    ensembles = coord.db("SELECT id, state, reason, router_step FROM ensembles ORDER BY id")
    interrupted, final = ensembles[0], ensembles[-1]
    assert interrupted["state"] == "failed" and "process ended" in interrupted["reason"], ensembles
    assert final["state"] == "published" and manifest["ensemble_id"] == final["id"]
    assert f"published ensemble {final['id']}" in survivor.log()  # it took the orphaned assembly over
    signed = {e["checkpoint_sha256"] for e in coord.db("SELECT checkpoint_sha256 FROM experts")}
    kept = {sha256_of(path) for i in range(2) for path in (tmp_path / f"island-{i}" / "signed").glob("*.safetensors")}
    assert kept == signed  # each island kept exactly the file that was signed for it
    download(run, coord, balancer_free(survivor), tmp_path, manifest)


def balancer_free(served: Coordinator) -> str:
    """A reader goes straight to the process still serving (the balancer is closed)."""
    return served.address
