"""`ddm-coordinator revoke`, run beside a real `ddm-coordinator serve`, ends a training island's
access at once: the `ddm-client join` process is refused at its next call and exits with one
line; its expert is open again; the event log and status say what happened."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import wait_for
from .test_faults import island_id, join_args, while_alive


@pytest.mark.slow
def test_revoke_ends_a_training_islands_access_at_once(coordinator, spawn, run, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every child: this machine's cores are shared
    coord = coordinator(
        *("--experts", "2", "--preset", "tiny", "--clustering", "random", "--steps", "100000"),
        *("--router-steps", "5", "--heartbeat-seconds", "1"),
    )
    state = tmp_path / "island"
    args = [a for a in join_args(coord, state, "--token", coord.invite(), "--name", "laptop") if a != "--once"]
    island = spawn("ddm-client", *args, label="island")
    wait_for(
        while_alive(
            island, "the island", lambda: coord.db("SELECT state FROM experts WHERE id = 0")[0]["state"] == "training"
        ),
        timeout=120,
        what="the island to start training",
    )
    victim = island_id(state)

    revoked_at = time.monotonic()
    result = run("ddm-coordinator", "revoke", "--home", coord.home, victim, "--reason", "lost laptop")
    assert result.returncode == 0, result.stderr
    assert f"revoked island {victim} (lost laptop)" in result.stdout
    assert "(expert 0)" in result.stdout  # its lease ended

    assert island.wait(timeout=60) != 0
    assert time.monotonic() - revoked_at < 30
    last = island.stderr().strip().splitlines()[-1]
    assert last.startswith("error:") and "permission_denied" in last, island.stderr()[-2000:]
    assert "this island's access was revoked by the coordinator (lost laptop)" in last
    assert coord.db("SELECT state FROM experts WHERE id = 0")[0]["state"] == "open"
    assert coord.db("SELECT state FROM leases WHERE island_id = ?", victim) == [{"state": "revoked"}]

    events = run("ddm-coordinator", "events", "--home", coord.home, "--island", victim, "--json")
    assert events.returncode == 0, events.stderr
    kinds = [e["kind"] for e in json.loads(events.stdout)]
    assert kinds[:3] == ["enroll", "lease", "training"] and kinds[-2:] == ["revoked", "lease_revoked"]
    status = coord.status()
    assert next(i for i in status["islands"] if i["id"] == victim)["revoked_reason"] == "lost laptop"
    assert "events" not in status  # --json shows events only when asked
    table = run("ddm-coordinator", "status", "--home", coord.home, "--events", "3")
    assert table.returncode == 0 and "lease_revoked" in table.stdout and "revoked" in table.stdout

    again = run("ddm-coordinator", "revoke", "--home", coord.home, victim)
    assert again.returncode != 0
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "already revoked" in lines[0], again.stderr
    unknown = run("ddm-coordinator", "revoke", "--home", coord.home, "nosuchisland")
    assert unknown.returncode != 0 and "no island 'nosuchisland'" in unknown.stderr
