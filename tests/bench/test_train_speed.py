"""The training-speed bench in its smoke size: ddm's loop and diffusers' DiT side by side, and
the routed sampling rows, in the report and the JSON. No timing is asserted, only that every row
is there with a positive speed and that the two models are the same size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.diffusers_support import require_diffusers

require_diffusers()

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess running both sides and every routing: about 7 s
def test_the_bench_reports_both_sides_and_the_routings(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "bench/train_speed.py"), "--quick", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((out / "train_speed-cpu.json").read_text())
    report = (out / "train_speed-cpu.md").read_text()

    modes = [m["name"] for m in figures["settings"]["modes"]]
    (preset,) = figures["settings"]["presets"]
    for mode in modes:
        rows = {r["side"]: r for r in figures["training"] if r["preset"] == preset and r["mode"] == mode}
        assert set(rows) == {"ddm", "diffusers"}
        assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in rows.values())
        assert f"| {mode} | ddm |" in report and f"| {mode} | diffusers |" in report

    # diffusers' DiT gives every block its own t and class embedders where ddm's (like the DiT
    # paper's) has one pair for all blocks: the totals differ by those copies, the rest is equal.
    params = figures["parameters"][preset]
    assert params["ddm"]["trunk"] == params["diffusers"]["trunk"] > 0
    assert params["diffusers"]["total"] > params["ddm"]["total"]
    # The same network, so the same work per image, within the embedders' small share.
    flops = figures["flops_gflop_per_image"][preset]
    assert abs(flops["ddm"] - flops["diffusers"]) < 0.05 * flops["diffusers"]

    routings = {(r["precision"], r["routing"]): r for r in figures["sampling"]}
    for mode in {m.removesuffix("-compile") for m in modes}:
        for routing in ("one expert", "full", "top1", "ancestral"):
            assert routings[(mode, routing)]["images_per_s"] > 0
            assert f"| {mode} | {routing} |" in report
    assert routings[(modes[0], "full")]["expert_evaluations_per_image_step"] == figures["settings"]["experts"]
    assert routings[(modes[0], "top1")]["expert_evaluations_per_image_step"] == 1
    assert routings[(modes[0], "ancestral")]["expert_evaluations_per_image_step"] == 1
    assert [a["aim"] for a in figures["aims"]] and all(isinstance(a["met"], bool) for a in figures["aims"])
