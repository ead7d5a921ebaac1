"""A ddm ensemble trained over a real Flower federation on loopback: a SuperLink, two SuperNodes
(each with its own silo in --node-config), and `flwr run` of the app `ddm-coordinator
flower-app` writes; then a reader downloads the ensemble from `ddm-coordinator serve`, verifies
it and samples it. Siloed mode: no image of a silo ever reaches the coordinator's home.

One federation serves the module (starting one takes seconds): each test runs its own `flwr
run` on it, for a coordinator home of its own; the last one stops a SuperNode."""

from __future__ import annotations

import json
import shutil
import signal
import threading

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.e2e.test_siloed import fingerprints_of
from tests.flower import require_flower

require_flower()

from tests.e2e.conftest import free_port, wait_for  # noqa: E402
from tests.e2e.flower import Federation  # noqa: E402

STEPS = 30
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # every process of the federation: see tests/e2e/conftest.process_env


def silos(root) -> list:
    digits = load_digits()
    pixels = (digits.images / 16 * 255).round().astype(np.uint8)
    made = []
    for k in range(2):
        path = root / f"site-{k}" / "private" / "images.npz"
        path.parent.mkdir(parents=True)
        mine = digits.target % 2 == k  # even digits at one site, odd at the other
        np.savez(path, images=pixels[mine], labels=digits.target[mine])
        made.append((path, pixels[mine]))
    return made


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list:
    return silos(tmp_path_factory.mktemp("sites"))


@pytest.fixture(scope="module")
def shared_federation(sites):
    """A SuperLink and two SuperNodes, each with its own silo and state folder. When a run offers
    ddm's port, site 0 uploads through it and site 1 still answers with its checkpoint inside the
    Flower reply; a run that offers no port gets both checkpoints in the replies."""
    root = sites[0][0].parents[2]
    nodes = [{"data-dir": str(path), "state-dir": str(path.parent.parent / "state"), "threads": 1} for path, _ in sites]
    nodes[1]["upload"] = "reply"
    with Federation(root / "flower", nodes, env=ONE_THREAD) as started:
        yield started


@pytest.fixture
def federation(shared_federation):
    """The module's federation, its sites' state folders emptied between runs: a run finds no
    resume state or finished checkpoint of an earlier test's run (a node would resume an expert
    of the same model and data from it, or answer with it), as a federation of its own would."""
    for node in shared_federation.node_configs:
        shutil.rmtree(node["state-dir"], ignore_errors=True)
    return shared_federation


@pytest.mark.slow
def test_a_flower_federation_trains_a_ddm_ensemble_that_a_reader_verifies_and_samples(
    coordinator, run, tmp_path, sites, federation
):
    coord = coordinator(
        "--mode",
        "siloed",
        "--image-size",
        "8",
        "--channels",
        "1",
        "--experts",
        "2",
        "--preset",
        "tiny",
        "--steps",
        str(STEPS),
        "--router-steps",
        "30",
        "--router-samples",
        "128",
        serve=False,
    )
    app = tmp_path / "flower-app"
    made = run("ddm-coordinator", "flower-app", app, "--home", coord.home, "--wait-for-nodes-s", "60")
    assert made.returncode == 0, made.stderr

    # Site 0 uploads through ddm's port, which the ServerApp serves for this run (TLS, pinned
    # through the Flower message); site 1 answers with its checkpoint inside the Flower reply.
    result = federation.run(app, {"poll-s": 0.5, "listen": f"127.0.0.1:{free_port()}"}, timeout=300)
    peak = federation.superlink_peak_rss()
    print(f"flower run {result.seconds:.1f} s, SuperLink peak {peak >> 20} MiB")
    assert "published ensemble" in result.logs, result.logs[-3000:]

    status = coord.status()
    assert [e["state"] for e in status["experts"]] == ["signed", "signed"]
    assert status["ensemble"]["state"] == "published"
    islands = {i["name"]: i for i in status["islands"] if i["role"] == "island"}
    assert sorted(islands) == sorted(f"flower node {n}" for n in federation.node_ids)
    by_node = {n: islands[f"flower node {n}"] for n in federation.node_ids}
    through_port, in_reply = (by_node[n] for n in federation.node_ids)
    assert through_port["sent"]["checkpoint"]["bytes"] > 0  # ddm's upload carried it
    assert in_reply["sent"]["checkpoint"]["bytes"] == 0  # the Flower reply carried it

    # A reader downloads, verifies every signature against the pinned key, and samples.
    coord.start()
    ensemble = tmp_path / "ensemble"
    reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
    got = run(
        "ddm-client", "download", *coord.connect_args, "--out", ensemble, "--fingerprint", coord.fingerprint, *reader
    )
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert manifest["mode"] == "siloed" and len(manifest["experts"]) == 2
    npz = tmp_path / "samples.npz"
    sampled = run(
        "ddm-client", "sample", ensemble, "--n", "16", "--out", tmp_path / "s.png", "--npz", npz,
        "--state-dir", tmp_path / "reader",
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with np.load(npz) as saved:
        assert saved["images"].shape == (16, 1, 8, 8)

    # No image of either silo, and neither silo's path, is anywhere in the coordinator's home.
    blobs = [p.read_bytes() for p in coord.home.rglob("*") if p.is_file()]
    for path, images in sites:
        for pattern in fingerprints_of(images):
            assert not any(pattern in blob for blob in blobs)
        assert not any(str(path.parent).encode() in blob for blob in blobs)


@pytest.mark.slow
def test_a_site_that_stops_mid_training_loses_its_expert_to_the_other_site(coordinator, run, tmp_path, federation):
    """A SuperNode stopped while it trains: its lease is released (the SuperLink answers the
    node's message with Flower's "Node Unavailable", or the ServerApp finds the node gone past
    the home's lease time), and the site still there trains that expert too. (It stops site 1 of
    the module's federation: the module's last test.)"""
    coord = coordinator(
        "--mode", "siloed", "--image-size", "8", "--channels", "1", "--experts", "2", "--preset", "tiny",
        "--steps", "200", "--router-steps", "10", "--router-samples", "64",
        "--lease-seconds", "4", "--heartbeat-seconds", "1", serve=False,
    )  # fmt: skip
    app = tmp_path / "flower-app"
    made = run("ddm-coordinator", "flower-app", app, "--home", coord.home, "--wait-for-nodes-s", "60")
    assert made.returncode == 0, made.stderr
    # No `listen`: this run offers no port, so both sites answer inside the Flower reply.
    gone = federation.node_ids[1]

    def stop_a_site_once_both_train() -> None:
        wait_for(
            lambda: [r["state"] for r in coord.db("SELECT state FROM experts")] == ["leased"] * 2,
            120,
            "both experts to be leased",
            every=0.2,
        )
        federation.kill_node(1, signal.SIGTERM)

    stopper = threading.Thread(target=stop_a_site_once_both_train)
    stopper.start()
    result = federation.run(app, {"poll-s": 0.5}, timeout=300)
    stopper.join()
    assert "published ensemble" in result.logs, result.logs[-3000:]
    assert f"flower node {gone} gets no more work in this run" in result.logs
    status = coord.status()
    stayed = next(i["id"] for i in status["islands"] if i["name"] != f"flower node {gone}")
    assert [(e["state"], e["island_id"]) for e in status["experts"]] == [("signed", stayed)] * 2
    # Whichever the ServerApp sees first: the SuperLink's error reply for a node that stopped
    # (Flower's "Node Unavailable"), or the node missing from the federation past the lease time.
    (released,) = [
        json.loads(row["detail"]) for row in coord.db("SELECT detail FROM events WHERE kind = 'lease_released'")
    ]
    assert "Node Unavailable" in released["reason"] or "the node left the federation" in released["reason"]
