"""Chaos: a whole small run, three experts trained by three `ddm-client join` processes against
`ddm-coordinator serve`, while a seeded random schedule SIGKILLs the coordinator or an island
at random moments and restarts it at once. The run must still end with a published ensemble
that a reader downloads and verifies, and with every finished artifact intact.

The schedule draws, from the seed, whether each kill hits the coordinator or an island (which
island is drawn among those still running) and how long it waits once the run has moved on
since the last kill (an expert's state or step, or the router's). Waiting for progress keeps
a slow machine from being killed into a standstill. DDM_CHAOS_SEED=N replays a seed; on
failure the seed and what each kill hit are printed.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from coordinator.registry import Registry

from .conftest import sha256_of
from .intact import assert_intact

KILLS = 5
PAUSE_S = (0.2, 2.0)  # after progress, before each kill, drawn uniformly
BUDGET_S = 240.0  # a bound for a loaded machine; about 60 s on an idle 2-core one
INIT = [
    "--experts", "3", "--preset", "tiny", "--steps", "200", "--router-preset", "tiny", "--router-steps", "60",
    "--heartbeat-seconds", "1", "--lease-seconds", "15",
]  # fmt: skip
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the router trains inside serve; see test_crash.serve


def invite(coord, role: str = "island") -> str:
    """An invite made in this process (`ddm-coordinator invite` does the same, at a process each)."""
    registry = Registry(f"sqlite:///{coord.home / 'ddm.db'}")
    try:
        return registry.create_invite(role, 3600)
    finally:
        registry.close()


@pytest.mark.slow
def test_a_run_survives_random_kills(coordinator, spawn, run, tmp_path):
    seed = int(os.environ.get("DDM_CHAOS_SEED", "5"))
    rng = random.Random(seed)
    targets = rng.sample(["coordinator", "island"], 2)
    targets += [rng.choice(["coordinator", "island", "island"]) for _ in range(KILLS - 2)]
    pauses = [rng.uniform(*PAUSE_S) for _ in range(KILLS)]
    happened: list[str] = []
    started = time.monotonic()  # reset once the coordinator serves

    def note(what: str) -> None:
        happened.append(f"{time.monotonic() - started:6.1f} s  {what}")

    coord = coordinator(*INIT, serve=False)
    coord.start(env=ONE_THREAD)
    started = time.monotonic()  # the budget counts from here; init is not part of the run
    states = [tmp_path / f"island-{i}" for i in range(3)]

    def island(i: int):
        """Start (or restart) island i; one killed before it saved its identity gets a new invite."""
        token = [] if (states[i] / "identity.json").exists() else ["--token", invite(coord)]
        args = ["join", *coord.connect_args, "--state-dir", states[i], "--threads", "1", "--name", f"island-{i}"]
        return spawn("ddm-client", *args, *token, label=f"island-{i}-{len(happened)}")

    islands = {i: island(i) for i in range(3)}
    note("coordinator and 3 islands started")

    def published() -> bool:
        return bool(coord.db("SELECT id FROM ensembles WHERE state = 'published'"))

    def doing() -> str:
        experts = [(e["state"], e["step"]) for e in coord.db("SELECT state, step FROM experts ORDER BY id")]
        ensembles = [(e["state"], e["router_step"]) for e in coord.db("SELECT * FROM ensembles ORDER BY id")]
        return f"experts {experts}, ensembles {ensembles}"

    def within_budget() -> None:
        assert time.monotonic() - started < BUDGET_S, f"no published ensemble in {BUDGET_S:.0f} s ({doing()})"

    def restart_exited() -> None:
        for i, child in islands.items():
            code = child.poll()
            if code not in (None, 0):
                note(f"island {i} exited with {code}; restarted: {child.stderr().strip().splitlines()[-1:]}")
                islands[i] = island(i)

    try:
        last = doing()
        for target, pause in zip(targets, pauses, strict=True):
            while doing() == last:  # the run moves on after each kill before the next
                restart_exited()
                within_budget()
                time.sleep(0.05)
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                restart_exited()
                time.sleep(0.05)
            if published():
                note(f"ensemble published; {target} kill not needed")
                break
            running = sorted(i for i, child in islands.items() if child.poll() is None)
            if target == "island" and running:
                i = rng.choice(running)
                note(f"SIGKILL island {i} ({doing()})")
                islands[i].kill()
                islands[i] = island(i)
            else:
                note(f"SIGKILL coordinator ({doing()})")
                coord.kill()
                coord.start(env=ONE_THREAD, same_port=True)
            last = doing()

        while True:
            restart_exited()
            if published() and all(child.poll() == 0 for child in islands.values()):
                break
            within_budget()
            time.sleep(0.2)
        note(f"published ({doing()})")

        manifest = assert_intact(coord)
        experts = coord.db("SELECT id, island_id, checkpoint_sha256 FROM experts ORDER BY id")
        assert len(manifest["experts"]) == 3
        for e in experts:  # the island that trained each expert kept exactly the signed file
            [state] = [s for s in states if e["island_id"] in (s / "identity.json").read_text()]
            assert sha256_of(state / "signed" / f"expert-{e['id']}.safetensors") == e["checkpoint_sha256"]
        reader = ["--token", invite(coord, "reader"), "--state-dir", tmp_path / "reader"]
        out = tmp_path / "ensemble"
        pin = ["--fingerprint", coord.fingerprint]
        got = run("ddm-client", "download", *coord.connect_args, "--out", out, *pin, *reader)
        assert got.returncode == 0, got.stderr[-3000:]
        assert sha256_of(out / "router.safetensors") == manifest["router"]["sha256"]
    except BaseException:
        planned = [f"{target} after {pause:.1f} s" for target, pause in zip(targets, pauses, strict=True)]
        print(f"chaos seed {seed} (replay with DDM_CHAOS_SEED={seed}); planned kills: {planned}")
        print("\n".join(happened))
        print(coord.log()[-3000:])
        raise
    print(f"chaos seed {seed}:\n" + "\n".join(happened))
    assert sum("SIGKILL" in line for line in happened) >= 2, happened
