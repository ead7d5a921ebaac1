"""Fault points (coordinator/faults.py), the crash tests' hook: armed by DDM_FAULT, a point
SIGKILLs its own process at the named hit; unarmed, it does nothing."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from coordinator.faults import POINTS, parse

REPO = Path(__file__).resolve().parents[2]
THREE_HITS = (
    "from coordinator.faults import fault_point\n"
    "for i in range(3):\n"
    "    print(i, flush=True)\n"
    "    fault_point('complete.stored')\n"
    "print('done', flush=True)\n"
)


def run_with(fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DDM_FAULT"}
    env["PYTHONPATH"] = str(REPO)
    if fault is not None:
        env["DDM_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", THREE_HITS], capture_output=True, text=True, env=env, timeout=60)


def test_an_armed_point_kills_its_process_at_the_named_hit():
    second = run_with("complete.stored:2")
    assert second.returncode == -signal.SIGKILL
    assert second.stdout.split() == ["0", "1"]
    assert second.stderr == f"fault point complete.stored: killing process {second.stderr.split()[-1]}\n"
    first = run_with("router.stored,complete.stored")
    assert first.returncode == -signal.SIGKILL and first.stdout.split() == ["0"]


def test_unarmed_points_do_nothing():
    for fault in (None, "", "router.stored", "complete.stored:4"):
        result = run_with(fault)
        assert result.returncode == 0 and result.stdout.split() == ["0", "1", "2", "done"], fault


def test_a_malformed_spec_arms_nothing_and_says_so():
    result = run_with("complete.store,complete.stored:0,complete.stored:x")
    assert result.returncode == 0 and result.stdout.split()[-1] == "done"
    assert result.stderr.count("warning: DDM_FAULT item") == 3
    assert parse(" complete.signed:3 , router.training ") == {"complete.signed": 3, "router.training": 1}
    assert len(POINTS) == 7
