"""The Flower bench in its smoke size, one way (a Flower federation with the checkpoints through
ddm's port; the reply path and `join` run end to end in tests/e2e): tiny experts published and
verified by a reader's download, and the report written with its row. The full bench runs all
three ways side by side; the suite runs one to keep within its time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flower import require_flower

require_flower()

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_bench_publishes_verifies_and_reports(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "bench/flower.py"), "--quick", "--ways", "port", "--out", str(out)]
    # One torch thread in every process it starts (unless OMP_NUM_THREADS says otherwise): the
    # ServerApp trains the router beside the nodes, and extra threads on a busy small machine
    # slow the run several times over (see tests/e2e/conftest.process_env).
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([*command, "--timeout", "300"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "flower.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| flower, ") or line.startswith("| ddm serve ")]
    assert len(rows) == 1 and rows[0].startswith("| flower, ddm port"), report
    figures = json.loads((out / "flower.json").read_text())
    (result,) = figures["results"]
    assert result["way"] == "port"
    assert result["ensemble_state"] == "published" and result["experts_signed"] == 2
    assert result["verify"]["ok"] and result["coordinator_peak"] > 0 and result["superlink_peak"] > 0
    # Both checkpoints came through ddm's port, by the coordinator's own traffic counts.
    assert all(c["via_ddm_port_bytes"] > 0 for c in result["carried"])
