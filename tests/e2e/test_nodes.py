"""Islands that train with several processes (`ddm-client join --nproc-per-node 2`, gloo on the
CPU), as real processes against a real `ddm-coordinator serve` on loopback: the expert is
signed; a lost lease stops every rank; a batch that does not split is refused in one line and
the lease given back."""

from __future__ import annotations

import pytest
import torch

from .conftest import sha256_of, wait_for
from .test_faults import island_id, join_args, while_alive

TWO = ("--nproc-per-node", "2")


@pytest.mark.slow
def test_a_two_process_island_gets_its_expert_signed(coordinator, spawn, run, tmp_path):
    coord = coordinator("--experts", "2", "--preset", "tiny", "--steps", "30", "--batch-size", "16")
    state = tmp_path / "island"
    joined = run("ddm-client", *join_args(coord, state, "--token", coord.invite(), *TWO), timeout=180)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "2 processes" in joined.stderr  # the bar's description: the workers trained it
    expert = next(e for e in coord.status()["experts"] if e["state"] == "signed")
    assert expert["step"] == expert["steps"] == 30 and expert["island_id"] == island_id(state)
    signed = state / "signed" / f"expert-{expert['id']}.safetensors"
    assert sha256_of(signed) == expert["checkpoint_sha256"]
    assert not (state / "work" / f"expert-{expert['id']}").exists()  # the shared files went with it


@pytest.mark.slow
def test_a_lost_lease_stops_every_rank(coordinator, spawn, run, tmp_path):
    import psutil

    coord = coordinator("--experts", "2", "--preset", "tiny", "--steps", "100000", "--heartbeat-seconds", "1")
    state = tmp_path / "island"
    island = spawn("ddm-client", *join_args(coord, state, "--token", coord.invite(), *TWO), label="island")
    progress = "SELECT id, step, loss FROM experts WHERE state = 'training' AND step > 0"
    heard = wait_for(
        while_alive(island, "the island", lambda: coord.db(progress)),
        timeout=120,
        what="a heartbeat with rank 0's progress",
    )[0]
    assert heard["loss"] > 0
    workers = psutil.Process(island.pid).children(recursive=True)
    assert len(workers) == 2
    result = run("ddm-coordinator", "revoke", "--home", coord.home, island_id(state), "--reason", "test")
    assert result.returncode == 0, result.stderr

    assert island.wait(timeout=60) == 1, island.stderr()[-3000:]  # --once: the lease is lost
    assert "was lost" in island.stderr() and "training stopped" in island.stderr()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    # Both ranks stopped at the end of one log window (10 steps), and rank 0 saved it.
    saved = torch.load(state / "work" / f"expert-{heard['id']}" / "resume.pt", weights_only=True)["step"]
    assert saved >= heard["step"] and saved % 10 == 0
    assert not list(state.glob("outbox/*.safetensors"))


@pytest.mark.slow
def test_a_batch_that_does_not_split_is_refused_and_the_lease_given_back(coordinator, run, tmp_path):
    coord = coordinator("--experts", "2", "--preset", "tiny", "--steps", "30", "--batch-size", "15")
    state = tmp_path / "island"
    joined = run("ddm-client", *join_args(coord, state, "--token", coord.invite(), *TWO), timeout=120)
    assert joined.returncode == 2, joined.stderr[-3000:]
    assert joined.stderr.strip().splitlines()[-1] == (
        "error: the lease's batch of 15 does not split evenly over --nproc-per-node 2 (each process takes"
        " batch/N samples); use a number of processes that divides it"
    )
    assert [lease["state"] for lease in coord.status()["leases"]] == ["released"]
    assert all(e["state"] == "open" for e in coord.status()["experts"])
    assert not (state / "work").exists() and not (state / "shards").exists()
