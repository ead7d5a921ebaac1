"""``ddm-coordinator demo`` as a user runs it: a real process, real files."""

import re

import pytest
import torch
from PIL import Image

from ddm_model.checkpoint import load_checkpoint
from ddm_model.clustering import Clustering

QUICK = ["--steps", "100", "--router-steps", "100", "--samples", "200", "--sampling-steps", "8"]


def frechet(stdout: str) -> float:
    match = re.search(r"Fréchet distance \(top2, 200 samples, 8 euler steps\): ([0-9.]+)", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.mark.slow
def test_demo_trains_samples_and_resumes(run, tmp_path):
    out = tmp_path / "demo"
    first = run("ddm-coordinator", "demo", "--out", out, *QUICK)
    assert first.returncode == 0, first.stderr[-2000:]
    fd = frechet(first.stdout)
    assert 0 < fd < float("inf")
    assert f"samples: {out / 'samples.png'}" in first.stdout
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.size == (10 * 33 + 1, 10 * 33 + 1)

    clustering = Clustering.load(out / "clustering.safetensors")
    assert clustering.k == 4 and clustering.sizes.sum() == 1797
    for k in range(4):
        expert, info = load_checkpoint(out / f"expert-{k}.safetensors", expect_kind="expert")
        assert info.cluster_id == k and info.steps == 100 and info.flops > 0
        assert info.data_fingerprint and info.metrics["final_loss"] > 0
    _, info = load_checkpoint(out / "router.safetensors", expect_kind="router")
    assert len(info.metrics["accuracy_by_t"]) == 5

    # A second run finds every model finished and reproduces the same samples.
    weights = {name: t.clone() for name, t in expert.state_dict().items()}
    again = run("ddm-coordinator", "demo", "--out", out, *QUICK)
    assert again.returncode == 0, again.stderr[-2000:]
    assert frechet(again.stdout) == fd
    expert_again, _ = load_checkpoint(out / "expert-3.safetensors")
    assert all(torch.equal(weights[n], t) for n, t in expert_again.state_dict().items())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--routing", "top9"], "asks for 9 experts"),
        (["--routing", "best"], "unknown routing"),
        (["--preset", "huge"], "unknown model preset"),
        (["--sampler", "rk4"], "unknown sampler"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_demo_refuses_bad_options_in_one_line_and_writes_nothing(run, tmp_path, args, message):
    out = tmp_path / "demo"
    result = run("ddm-coordinator", "demo", "--out", out, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_command_lines_show_help(run):
    for name in ("ddm-coordinator", "ddm-client"):
        result = run(name, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout and "version" in result.stdout
    assert "demo" in run("ddm-coordinator", "--help").stdout
