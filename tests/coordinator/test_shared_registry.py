"""What lets several processes share one registry, on SQLite and PostgreSQL alike: lease grants
that stay race-free when real processes ask at once, named locks that hold across processes and
die with their holder, and buffered heartbeats that keep the revocation guarantee."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coordinator.clock import ManualClock
from coordinator.registry import Registry, RegistryError, Revoked

REPO = Path(__file__).resolve().parents[2]
SHARD = "ab" * 32
EXPERTS = 6
PROCESSES = 3
ISLANDS_EACH = 4


def python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.fixture
def shared(database_url):
    reg = Registry(database_url, lease_seconds=60, clock=ManualClock())
    reg.create()
    reg.add_experts([(k, SHARD, f"f{k}") for k in range(EXPERTS)])
    yield reg
    reg.close()


def enroll(registry: Registry, name: str) -> str:
    island, _ = registry.redeem_invite(registry.create_invite("island", 60), name)
    return island.id


GRANTS = """
    import json, sys, time
    from pathlib import Path
    from coordinator.registry import Grant, Registry
    url, go, islands = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    registry = Registry(url, lease_seconds=60)
    registry.experts()  # connected before the start
    while not go.exists():
        time.sleep(0.001)
    out = {}
    for island in islands:
        grant = registry.acquire_lease(island)
        out[island] = grant.expert_id if isinstance(grant, Grant) else None
    print(json.dumps(out))
"""


def test_lease_grants_are_race_free_across_processes(shared, database_url, tmp_path):
    islands = [[enroll(shared, f"p{p}-i{i}") for i in range(ISLANDS_EACH)] for p in range(PROCESSES)]
    go = tmp_path / "go"
    procs = [python(GRANTS, database_url, str(go), *ids) for ids in islands]
    time.sleep(1.0)  # every process has imported and connected
    go.touch()
    grants: dict[str, int | None] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        grants.update(json.loads(out))
    granted = [expert for expert in grants.values() if expert is not None]
    assert sorted(granted) == list(range(EXPERTS))  # each expert to exactly one island
    assert len(grants) - len(granted) == PROCESSES * ISLANDS_EACH - EXPERTS  # the rest got no work
    active = [row for row in shared.snapshot()["leases"] if row["state"] == "active"]
    assert sorted(row["expert_id"] for row in active) == list(range(EXPERTS))
    for row in active:
        assert grants[row["island_id"]] == row["expert_id"]


HOLD = """
    import sys, time
    from coordinator.registry import Registry
    registry = Registry(sys.argv[1])
    with registry.exclusive("assembly") as held:
        print("held" if held else "busy", flush=True)
        time.sleep(600)
"""


def test_a_named_lock_holds_across_processes_and_dies_with_its_holder(shared, database_url):
    holder = python(HOLD, database_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        with shared.exclusive("assembly", wait=False) as held:
            assert held is False
        with shared.exclusive("complete", wait=False) as held:  # another name is another lock
            assert held is True
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10  # PostgreSQL ends the session once it sees the socket close
        while True:
            with shared.exclusive("assembly", wait=False) as held:
                if held:
                    break
            assert time.monotonic() < deadline, "the lock outlived its SIGKILLed holder"
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("islands", [1, 3])  # one row, and several in one executemany
def test_buffered_heartbeats_are_written_by_the_flush(shared, islands):
    ids = [enroll(shared, f"i{n}") for n in range(islands)]
    grants = [shared.acquire_lease(island) for island in ids]
    for island, grant in zip(ids, grants, strict=True):
        shared.heartbeat(island, grant.lease_id, 1, 0.9, 10.0)  # the first training step: written at once
        assert shared.expert(grant.expert_id).state == "training"
    shared.clock.advance(5)
    for n, (island, grant) in enumerate(zip(ids, grants, strict=True)):
        deadline = shared.buffered_heartbeat(island, grant.lease_id, 7 + n, 0.5, 20.0)
        assert deadline == shared.clock.now() + 60
        assert shared.expert(grant.expert_id).step == 1  # buffered, not yet written
    assert shared.flush_heartbeats() == islands
    for n, grant in enumerate(grants):
        expert, lease = shared.expert(grant.expert_id), shared.lease(grant.lease_id)
        assert (expert.step, expert.loss, expert.images_per_second) == (7 + n, 0.5, 20.0)
        assert lease.deadline_at == deadline and lease.last_heartbeat_at == shared.clock.now()
    assert shared.flush_heartbeats() == 0


def test_a_buffered_heartbeat_of_a_revoked_island_is_refused_at_once(shared):
    island = enroll(shared, "a")
    grant = shared.acquire_lease(island)
    shared.buffered_heartbeat(island, grant.lease_id, 0, float("nan"), 0.0)
    shared.revoke(island, "compromised")
    with pytest.raises(Revoked):
        shared.buffered_heartbeat(island, grant.lease_id, 0, float("nan"), 0.0)
    shared.flush_heartbeats()  # what was buffered before the revocation changes nothing now
    assert shared.lease(grant.lease_id).state == "revoked"
    assert shared.expert(grant.expert_id).state == "open"


def test_a_beat_buffered_before_its_lease_ended_changes_nothing(shared):
    island = enroll(shared, "a")
    grant = shared.acquire_lease(island)
    shared.heartbeat(island, grant.lease_id, 3, 0.8, 1.0)
    shared.buffered_heartbeat(island, grant.lease_id, 9, 0.1, 1.0)
    shared.release_lease(island, grant.lease_id, "stopping")
    shared.flush_heartbeats()
    lease, expert = shared.lease(grant.lease_id), shared.expert(grant.expert_id)
    assert lease.state == "released" and expert.state == "open" and expert.step == 3
    with pytest.raises(RegistryError, match="released"):
        shared.buffered_heartbeat(island, grant.lease_id, 10, 0.1, 1.0)


def test_a_buffered_beat_past_its_deadline_expires_the_lease(shared):
    island = enroll(shared, "a")
    grant = shared.acquire_lease(island)
    shared.heartbeat(island, grant.lease_id, 2, 0.8, 1.0)
    shared.clock.advance(61)
    with pytest.raises(RegistryError, match="expired"):
        shared.buffered_heartbeat(island, grant.lease_id, 3, 0.7, 1.0)
    assert shared.expire_leases() == 1  # the reaper ends it, and its expert opens again
    assert shared.expert(grant.expert_id).state == "open"
