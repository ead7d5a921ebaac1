"""``ddm-coordinator demo`` as a user runs it: a real process, real files."""

import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from ddm_model.checkpoint import load_checkpoint
from protocol.trust import sha256_file

from .conftest import free_port

QUICK = ["--experts", "2", "--preset", "tiny", "--steps", "30", "--router-steps", "30"]
QUICK += ["--samples", "200", "--sampling-steps", "8"]


def manifest_key(out) -> str:
    from protocol.trust import key_fingerprint

    return key_fingerprint((out / "ensemble" / "coordinator.pub").read_bytes())


def frechet(stdout: str) -> float:
    match = re.search(r"Fréchet distance \(ancestral, 200 samples, 8 euler steps\): ([0-9.]+)", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.mark.slow
def test_demo_runs_the_whole_system_and_resumes(run, tmp_path):
    out = tmp_path / "demo"
    first = run("ddm-coordinator", "demo", "--out", out, *QUICK)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    fd = frechet(first.stdout)
    assert 0 < fd < float("inf")
    assert f"samples: {out / 'samples.png'}" in first.stdout
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.size == (10 * 33 + 1, 10 * 33 + 1)

    status = run("ddm-coordinator", "status", "--home", out / "coordinator", "--json")
    report = json.loads(status.stdout)
    assert [e["state"] for e in report["experts"]] == ["signed"] * 2
    assert report["ensemble"]["state"] == "published" and report["router"]["state"] == "trained"
    assert len([i for i in report["islands"] if i["role"] == "island"]) == 2
    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    for item in manifest["experts"]:
        path = out / "ensemble" / f"expert-{item['entry']['cluster_id']}.safetensors"
        _, info = load_checkpoint(path, expect_kind="expert")
        assert info.steps == 30 and sha256_file(path) == item["entry"]["sha256"]
    for k in range(2):
        assert "signed by the coordinator" in (out / "logs" / f"island-{k}.log").read_text()
    # The manifest carries the cluster sizes, for ancestral routing; the router's steps were fixed.
    sizes = json.loads((out / "coordinator" / "config.json").read_text())["clustering"]["sizes"]
    assert manifest["shares"]["source"] == "clusters"
    assert manifest["shares"]["clusters"] == [sizes[c] for c in manifest["router"]["clusters"]]
    assert manifest["router"]["budget"]["rule"] == "fixed" and manifest["router"]["steps"] == 30
    # An unconditional ensemble has no class to sample: one line, no traceback.
    sample = ["sample", out / "ensemble", "--state-dir", tmp_path / "reader", "--fingerprint", manifest_key(out)]
    unconditional = run("ddm-client", *sample, "--class", "3", "--out", tmp_path / "c.png")
    assert unconditional.returncode == 2 and "this model is unconditional" in unconditional.stderr
    assert len(unconditional.stderr.strip().splitlines()) == 1, unconditional.stderr

    # Run again: the processes find their state, nothing is trained twice, same samples.
    # This time with the dashboard, which the demo's `serve` starts on loopback.
    board = f"127.0.0.1:{free_port()}"
    again = run("ddm-coordinator", "demo", "--out", out, *QUICK, "--dashboard", board)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming the coordinator" in again.stdout
    assert f"dashboard at http://{board}/" in again.stdout
    assert f"dashboard at http://{board}/" in (out / "logs" / "coordinator.log").read_text()  # serve served it
    assert frechet(again.stdout) == fd
    assert "every expert is trained and signed" in (out / "logs" / "island-0.log").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--routing", "top9"], "asks for 9 experts"),
        (["--routing", "best"], "unknown routing"),
        (["--preset", "huge"], "unknown model preset"),
        (["--dashboard", "0.0.0.0:8080"], "loopback only"),
        (["--dashboard", "localhost"], "is not HOST:PORT"),
    ],
)
def test_demo_refuses_bad_options_in_one_line_and_writes_nothing(tmp_path, args, message):
    # In this process (the command's own code, as its console script runs it): a process per
    # case would spend seconds importing torch for a refusal that comes before anything runs.
    out = tmp_path / "demo"
    result = CliRunner().invoke(coordinator_app, ["demo", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_command_lines_show_help(run):
    for name in ("ddm-coordinator", "ddm-client"):
        result = run(name, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout and "version" in result.stdout
    assert "demo" in run("ddm-coordinator", "--help").stdout
