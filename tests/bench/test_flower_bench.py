"""The Flower bench in its smoke size: tiny experts trained three ways (a Flower federation with
checkpoints in the reply, the same through ddm's port, and ddm's own serve and join), each
published and verified by a reader's download, and the report written with one row per way."""

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
def test_the_three_ways_publish_and_the_report_has_a_row_each(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/flower.py"), "--quick", "--out", str(out), "--timeout", "300"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "flower.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| flower, ") or line.startswith("| ddm serve ")]
    assert len(rows) == 3, report
    assert not any("failed" in row for row in rows), report
    figures = json.loads((out / "flower.json").read_text())
    results = {r["way"]: r for r in figures["results"]}
    assert sorted(results) == ["ddm", "port", "reply"]
    for result in results.values():
        assert result["ensemble_state"] == "published" and result["experts_signed"] == 2
        assert result["verify"]["ok"] and result["coordinator_peak"] > 0
    # Where each checkpoint travelled, by the coordinator's own traffic counts.
    assert all(c["via_ddm_port_bytes"] == 0 for c in results["reply"]["carried"])
    assert all(c["via_ddm_port_bytes"] > 0 for c in results["port"]["carried"])
    assert all(c["via_ddm_port_bytes"] > 0 for c in results["ddm"]["carried"])
    assert results["reply"]["superlink_peak"] > 0
