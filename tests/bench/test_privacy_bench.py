"""The membership-inference bench in its smoke size: every expert's row (no DP and each epsilon)
is in the report and the JSON with its guarantee, both attacks' figures and an FD, and the plot
is written. No figure's value is asserted beyond what must hold by construction."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess training three tiny experts: about 10 s
def test_the_bench_reports_each_expert_with_its_guarantee_and_both_attacks(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "bench/privacy.py"), "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((out / "privacy-quick.json").read_text())
    report = (out / "privacy-quick.md").read_text()
    assert (out / "privacy-quick.png").stat().st_size > 0

    no_dp, private = figures["rows"]
    assert no_dp["epsilon"] is None and "tpr_bound" not in no_dp
    assert 7.5 < private["epsilon"] <= 8 and private["noise_multiplier"] > 0
    assert private["sample_rate"] == figures["train"]["batch_size"] / figures["members"]
    for row in figures["rows"]:
        for attack in ("loss_attack", "calibrated_attack"):
            a = row[attack]
            assert 0 <= a["auc_low"] <= a["auc"] <= a["auc_high"] <= 1 and 0 <= a["tpr_at_1pct_fpr"] <= 1
        assert row["fd"] > 0
        assert f"| {row['setting']} |" in report
    assert "| epsilon 8 | 7.9" in report and "Quality cost at epsilon 8" in report
