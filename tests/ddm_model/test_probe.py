"""The probe: held-out slices, a flow-matching loss at fixed noise and times, and the verdict."""

import math

import numpy as np
import pytest
import torch

from ddm_model.data import load_digits
from ddm_model.dit import DiTConfig
from ddm_model.probe import (
    PROBE_MAX,
    Probe,
    ProbeVerdict,
    hold_out,
    probe_loss,
    probe_seed,
    probe_size,
    untrained_loss,
    untrained_model,
)
from ddm_model.train import TrainConfig, train_expert

CFG = DiTConfig("tiny", 8, 1)


@pytest.fixture(scope="module")
def digits():
    return load_digits(labels=False)


@pytest.fixture(scope="module")
def split(digits):
    """One 'cluster' of 400 digits: its training part and its probe images."""
    train_ids, probe_ids = hold_out(np.arange(400), seed=0, cluster=0)
    return digits.subset(train_ids), digits.subset(probe_ids).images


def test_probe_size_rule():
    assert [probe_size(n) for n in (0, 1, 2, 10, 32, 100, 400, 1000, 4000, 10**6)] == [
        0,
        0,
        1,
        5,
        16,
        16,
        20,
        50,
        200,
        PROBE_MAX,
    ]


def test_hold_out_is_a_deterministic_disjoint_split():
    ids = np.random.default_rng(1).permutation(np.arange(1000, 1500))
    train, probe = hold_out(ids, seed=3, cluster=2)
    assert len(probe) == 25 and len(train) == 475
    assert np.array_equal(np.sort(np.concatenate([train, probe])), np.sort(ids))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(probe) > 0)
    again_train, again_probe = hold_out(ids[::-1], seed=3, cluster=2)  # the order given does not matter
    assert np.array_equal(train, again_train) and np.array_equal(probe, again_probe)
    assert not np.array_equal(probe, hold_out(ids, seed=4, cluster=2)[1])
    assert not np.array_equal(probe, hold_out(ids, seed=3, cluster=1)[1])


def test_probe_loss_is_fixed_by_its_seed_not_the_batch_size(split):
    _, images = split
    model = untrained_model(CFG, init_seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # a model whose output is not zero
    model.train()
    first = probe_loss(model, images, seed=7, draws=4)
    assert first == probe_loss(model, images, seed=7, draws=4)
    assert model.training  # left as it was found
    for batch_size in (3, 32):
        assert math.isclose(probe_loss(model, images, seed=7, draws=4, batch_size=batch_size), first, rel_tol=1e-5)
    assert probe_loss(model, images, seed=8, draws=4) != first
    assert probe_loss(model, images, seed=7, draws=3) != first


def test_untrained_loss_is_that_of_a_fresh_model(split):
    _, images = split
    baseline = untrained_loss(CFG, images, seed=5)
    assert baseline == untrained_loss(CFG.to_dict(), images, seed=5)
    assert baseline == probe_loss(untrained_model(CFG), images, seed=5)
    # An untrained expert predicts zero velocity, so its loss is E|x1 - x0|^2: about 1 + E[x1^2].
    assert 1.0 + float((images**2).mean()) == pytest.approx(baseline, rel=0.1)


def test_a_trained_expert_passes_and_garbage_does_not(split):
    train, images = split
    probe = Probe.build(CFG, images, probe_seed(0, 0))
    trained = train_expert(train, CFG, TrainConfig(steps=30, batch_size=64, lr=3e-3), progress=False).model
    verdict = probe.judge(trained, margin=0.05)
    assert verdict.passed, verdict.reason
    assert verdict.loss < 0.95 * verdict.baseline and verdict.images == len(images)
    assert "below an untrained model's" in verdict.reason

    untrained = probe.judge(untrained_model(CFG, init_seed=9), margin=0.05)
    assert not untrained.passed and untrained.loss == pytest.approx(untrained.baseline)
    for std in (1.0, 0.02):
        noise = untrained_model(CFG)
        with torch.no_grad():
            for p in noise.parameters():
                p.normal_(0, std)
        verdict = probe.judge(noise, margin=0.05)
        assert not verdict.passed, (std, verdict)
        assert "is not at least 5% below an untrained model's" in verdict.reason


def test_a_verdict_on_a_non_finite_loss_fails():
    assert not ProbeVerdict(float("nan"), 1.7, 0.05, 20).passed
    assert not ProbeVerdict(float("inf"), 1.7, 0.05, 20).passed
    verdict = ProbeVerdict(1.73, 1.74, 0.05, 20)
    assert not verdict.passed
    assert verdict.reason == (
        "on its cluster's held-out probe slice (20 images) its loss 1.73 is not at least 5% below"
        " an untrained model's 1.74"
    )
    assert ProbeVerdict(1.6, 1.74, 0.05, 20).passed
    assert verdict.to_dict() == {"loss": 1.73, "untrained_loss": 1.74, "margin": 0.05, "images": 20}
