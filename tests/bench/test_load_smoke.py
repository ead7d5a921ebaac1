"""The load bench in its smoke size: twenty islands through a real coordinator process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_twenty_islands_enroll_lease_heartbeat_and_release(tmp_path):
    report, figures = tmp_path / "load.md", tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/load.py"), "--islands", "20", "--heartbeats", "2", "--timeout", "120",
         "--report", str(report), "--json", str(figures)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (scenario,) = json.loads(figures.read_text())["scenarios"]
    summary = scenario["summary"]
    assert summary["outcomes"] == {"finished": 20}
    assert summary["errors"] == 0 and not summary["timed_out"]
    expected = {"connect": 20, "Enroll": 20, "AcquireLease": 20, "Heartbeat": 40, "ReleaseLease": 20}
    assert {kind: summary["kinds"][kind]["count"] for kind in expected} == expected
    assert summary["leases"] == 20
    # The coordinator's own record agrees: every island enrolled, leased and released, and the
    # heartbeats it counted (flushed from memory when it stopped) are the ones sent.
    registry = scenario["registry"]
    assert registry["islands"] == registry["invites_used"] == registry["leases"] == registry["leases_released"] == 20
    assert registry["leases_active"] == 0 and registry["heartbeats_counted"] == 40
    assert scenario["coordinator"]["errors"] == 0 and scenario["coordinator"]["rss_peak"] > 0
    assert "| Heartbeat | 40 | 0 |" in report.read_text()
