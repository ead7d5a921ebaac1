"""The load bench in its smoke size: twenty islands through a real coordinator process, and
through two serve processes sharing one PostgreSQL registry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import postgres

REPO = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    report, figures = tmp_path / "load.md", tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/load.py"), *args, "--timeout", "120", "--report", str(report),
         "--json", str(figures)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(figures.read_text()), report.read_text()


@pytest.mark.slow
def test_twenty_islands_enroll_lease_heartbeat_and_release(tmp_path):
    figures, report = run_bench(tmp_path, "--islands", "20", "--heartbeats", "2")
    (scenario,) = figures["scenarios"]
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
    assert "| Heartbeat | 40 | 0 |" in report


@pytest.mark.slow
def test_two_serve_processes_on_one_postgresql_registry(tmp_path):
    """Islands spread round robin over two serve processes of one home on one fresh PostgreSQL
    database (dropped afterwards); every call answered, and the figures of each side reported."""
    postgres.require()
    figures, report = run_bench(
        tmp_path, "--backend", "postgresql", "--processes", "2", "--islands", "20", "--heartbeats", "3",
        "--interval", "0.2", "--pg-host", postgres.HOST,
    )  # fmt: skip
    (scenario,) = figures["scenarios"]
    summary = scenario["summary"]
    assert scenario["deployment"] == {"backend": "postgresql", "processes": 2, "name": "postgresql×2"}
    assert summary["outcomes"] == {"finished": 20}
    assert summary["errors"] == 0 and not summary["timed_out"]
    expected = {"connect": 20, "Enroll": 20, "AcquireLease": 20, "Heartbeat": 60, "ReleaseLease": 20}
    assert {kind: summary["kinds"][kind]["count"] for kind in expected} == expected
    # Both processes served (ten islands each) and each side's CPU was counted.
    assert len(scenario["addresses"]) == 2 and len(scenario["coordinators"]) == 2
    assert all(p["cpu_s"] > 0 and p["rss_peak"] > 0 and p["exit"] == 0 for p in scenario["coordinators"])
    assert scenario["postgres"]["cpu_s"] > 0 and scenario["postgres"]["backends_peak"] >= 2
    assert summary["generator_cpu_s"] > 0 and scenario["machine_busy_cpu_s"] > 0
    registry = scenario["registry"]
    assert registry["islands"] == registry["invites_used"] == registry["leases"] == registry["leases_released"] == 20
    assert registry["leases_active"] == 0
    assert "| 20 islands, 3 heartbeats every 0.2 s, plaintext | postgresql×2 | 20 / 20 | 0 |" in report
    assert "| Heartbeat, steady |" in report and "## Where the CPU went" in report
    # The scenario's database was dropped.
    with postgres.connect() as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (scenario["database"],)).fetchall()
    assert scenario["database"].startswith("ddm_load_") and found == []
