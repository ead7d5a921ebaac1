"""Class conditioning end to end: `init --class-conditional` on labelled data, islands that
train class-conditional experts, a class-conditional router, cluster shares in the signed
manifest, and `ddm-client sample --class N --cfg S`."""

import json

import numpy as np
import pytest
import torch

from ddm_model.clustering import Clustering
from ddm_model.data import load_digits
from ddm_model.router import DEFAULT_ROUTER_SHARE, router_steps_for
from tests.e2e.conftest import wait_for


def one_line_error(result, *words):
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.slow
def test_a_class_conditional_ensemble_samples_the_class_asked_for(coordinator, spawn, run, tmp_path):
    coord = coordinator(
        *("--experts", "2", "--preset", "tiny", "--steps", "30", "--class-conditional"),
        *("--heartbeat-seconds", "1", "--lease-seconds", "30"),
    )
    islands = [
        spawn(
            "ddm-client",
            "join",
            *coord.connect_args,
            *("--token", coord.invite(), "--state-dir", tmp_path / f"island-{k}", "--once", "--threads", "1"),
            label=f"island-{k}",
        )
        for k in range(2)
    ]
    for island in islands:
        assert island.wait(timeout=240) == 0, island.stderr()[-2000:]
    wait_for(lambda: coord.status()["ensemble"]["state"] == "published", 180, "the ensemble to be published")

    ensemble, reader = tmp_path / "ensemble", tmp_path / "reader"
    got = run(
        "ddm-client",
        "download",
        *coord.connect_args,
        *("--out", ensemble, "--fingerprint", coord.fingerprint),
        *("--token", coord.invite("reader"), "--state-dir", reader),
    )
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = json.loads((ensemble / "manifest.json").read_text())
    router = manifest["router"]
    assert router["config"]["num_classes"] == 10 and router["config"]["preset"] == "tiny"  # the experts' preset
    for item in manifest["experts"]:
        entry = item["entry"]
        assert entry["config"]["num_classes"] == 10
        assert entry["probe"]["loss"] <= 0.95 * entry["probe"]["untrained_loss"]  # scored with the null label

    # The router's steps cost the default share of the signed experts' training FLOPs.
    budget = router["budget"]
    expert_flops = sum(item["entry"]["flops"] for item in manifest["experts"])
    assert budget["rule"] == "share" and budget["share"] == DEFAULT_ROUTER_SHARE
    assert budget["expert_flops"] == expert_flops and budget["step_flops"] > 0
    assert router["steps"] == router_steps_for(DEFAULT_ROUTER_SHARE, expert_flops, budget["step_flops"])
    assert router["flops"] == router["steps"] * budget["step_flops"]
    status = coord.status()["router"]
    assert status["step"] == status["steps"] == router["steps"]

    # The shares are the clusters' sizes and their digits' classes, in the manifest's order.
    clustering = Clustering.load(coord.home / "clustering.safetensors")
    digits = load_digits()
    shares = manifest["shares"]
    assert shares["source"] == "clusters"
    assert shares["clusters"] == [int(clustering.sizes[c]) for c in router["clusters"]]
    for c, row in zip(router["clusters"], shares["classes"], strict=True):
        labels = digits.labels[digits.positions(clustering.members(c))]
        assert row == torch.bincount(labels, minlength=10).tolist()

    def sample(*args):
        return run("ddm-client", "sample", ensemble, "--state-dir", reader, "--out", tmp_path / "s.png", *args)

    npz = tmp_path / "threes.npz"
    threes = sample("--n", "8", "--class", "3", "--cfg", "2", "--npz", npz)
    assert threes.returncode == 0, threes.stderr[-2000:]
    with np.load(npz) as saved:
        assert saved["images"].shape == (8, 1, 8, 8) and np.isfinite(saved["images"]).all()
    routed = sample("--n", "4", "--class", "3", "--routing", "top2")  # the router sees the class too
    assert routed.returncode == 0, routed.stderr[-2000:]
    one_line_error(sample("--class", "10"), "--class 10 is out of range", "0 to 9")
    one_line_error(sample("--cfg", "2"), "give --class")


@pytest.mark.slow
def test_class_conditioning_needs_labelled_data(run, tmp_path):
    data = tmp_path / "unlabelled.npz"
    np.savez(data, images=np.zeros((40, 8, 8), dtype=np.uint8))
    home = tmp_path / "home"
    result = run("ddm-coordinator", "init", "--home", home, "--dataset", data, "--class-conditional", "--experts", "2")
    one_line_error(result, "--class-conditional needs labelled data")
    assert not home.exists()
    siloed = ["--mode", "siloed", "--image-size", "8", "--channels", "1", "--class-conditional"]
    one_line_error(run("ddm-coordinator", "init", "--home", home, *siloed), "needs --classes N")
    one_line_error(run("ddm-coordinator", "init", "--home", home, "--classes", "3"), "--classes goes with")


def test_ancestral_routing_is_the_default():
    import inspect

    from client.cli import sample
    from client.sample import SampleOptions
    from coordinator.demo import DemoSettings

    assert inspect.signature(sample).parameters["routing"].default.default == "ancestral"
    assert SampleOptions().routing == "ancestral" and DemoSettings(out=None).routing == "ancestral"
