"""The router learns p(cluster | x_t, t): near chance on noise, accurate on clean images."""

import numpy as np
import pytest
import torch

from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_digits
from ddm_model.router import (
    Router,
    RouterConfig,
    accuracy_by_time,
    calibration_by_time,
    empirical_posterior,
    router_steps_for,
)
from ddm_model.train import TrainConfig, TrainError, train_router


@pytest.fixture(scope="module")
def trained():
    digits = load_digits()
    clustering = cluster_dataset(digits, 4, seed=0)
    clusters = torch.from_numpy(clustering.labels_for(digits.ids))
    cfg = TrainConfig(steps=800, batch_size=64, lr=3e-3, warmup=50, checkpoint_every=0)
    result = train_router(digits, clusters, RouterConfig("tiny", 8, 1, 4), cfg, progress=False)
    return digits, clusters, result


def test_accuracy_rises_with_t_from_chance_to_high(trained):
    digits, clusters, result = trained
    rows = accuracy_by_time(result.model, digits.images, clusters, bins=10)
    accuracy = [a for _, a in rows]
    chance = np.bincount(clusters.numpy()).max() / len(clusters)  # always guess the largest cluster
    assert [t for t, _ in rows] == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    assert accuracy[0] < chance + 0.1, accuracy
    assert accuracy[-1] > 0.85, accuracy
    assert accuracy[-1] > accuracy[len(accuracy) // 2] > accuracy[0]


def test_untrained_router_is_uniform():
    router = Router(RouterConfig("tiny", 8, 1, 4))
    logits = router(torch.randn(3, 1, 8, 8), torch.rand(3))
    assert logits.shape == (3, 4) and torch.equal(logits, torch.zeros(3, 4))


def test_bad_cluster_labels_are_refused():
    digits = load_digits()
    cfg = TrainConfig(steps=1)
    with pytest.raises(TrainError, match="cluster labels"):
        train_router(digits, torch.full((len(digits),), 4), RouterConfig("tiny", 8, 1, 4), cfg, progress=False)
    with pytest.raises(TrainError, match="samples but"):
        train_router(digits, torch.zeros(3, dtype=torch.long), RouterConfig("tiny", 8, 1, 4), cfg, progress=False)


def test_cls_head_is_default_and_a_legacy_config_loads_as_mean():
    cfg = RouterConfig("tiny", 8, 1, 4)
    assert cfg.head == "cls" and "cls" in dict(Router(cfg).named_parameters())
    legacy = {k: v for k, v in cfg.to_dict().items() if k not in ("head", "num_classes", "class_dropout")}
    assert RouterConfig.from_dict(legacy).head == "mean"
    with pytest.raises(Exception, match="head"):
        RouterConfig("tiny", 8, 1, 4, head="max")


def test_class_conditional_router_uses_the_label():
    """Two clusters that differ only in label: only a router that sees y can tell them apart."""
    digits = load_digits()
    clusters = (digits.labels % 2).long()  # even digits vs odd digits
    cfg = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup=20, checkpoint_every=0)
    result = train_router(digits, clusters, RouterConfig("tiny", 8, 1, 2, num_classes=10), cfg, progress=False)
    t = torch.full((len(digits),), 0.02)
    noise = torch.randn(digits.images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        given = result.model(noise, t, digits.labels).argmax(1)
        null = result.model(noise, t).softmax(1)
    assert (given == clusters).float().mean() > 0.95  # from pure noise, by the label alone
    assert (null.max(1).values < 0.75).all()  # without the label, near the prior


def test_calibration_reports_kl_to_the_exact_posterior(trained):
    digits, clusters, result = trained
    exact = empirical_posterior(digits.images, clusters, 4)
    rows = calibration_by_time(result.model, digits.images[:400], clusters[:400], exact, bins=5)
    again = calibration_by_time(exact, digits.images[:400], clusters[:400], exact, bins=5)
    assert all(r["kl"] >= 0 for r in rows) and max(r["kl"] for r in again) < 1e-6  # KL(p || p) = 0
    assert sum(r["kl"] for r in rows) > 0.01  # a trained router is not the exact posterior
    assert rows[-1]["exact_accuracy"] == 1.0  # at t = 0.9 the empirical posterior knows the point
    assert [r["accuracy"] for r in rows] == [
        a for _, a in accuracy_by_time(result.model, digits.images[:400], clusters[:400], bins=5)
    ]


def test_empirical_posterior_given_a_label_counts_only_its_class():
    digits = load_digits()
    clusters = (digits.labels >= 5).long()
    exact = empirical_posterior(digits.images, clusters, 2, labels=digits.labels)
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 0.1)
    p = exact(x, t, torch.tensor([0, 1, 2, 7, 8, 9])).exp()
    assert torch.allclose(p, torch.tensor([[1.0, 0]] * 3 + [[0, 1.0]] * 3), atol=1e-6)


def test_router_steps_follow_a_share_of_the_experts_flops():
    assert router_steps_for(0.04, 1000 * 50, 50) == 40
    assert router_steps_for(0.04, 10, 50) == 1
    with pytest.raises(Exception, match="share"):
        router_steps_for(1.5, 10, 50)


def test_router_metrics_report_calibration_on_a_bounded_sample(trained):
    from ddm_model.router import router_metrics

    digits, clusters, result = trained
    metrics = router_metrics(result.model, digits.images, clusters, seed=0, limit=300)
    assert metrics["calibration_images"] == 300
    assert [t for t, _ in metrics["kl_by_t"]] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert all(kl >= 0 for _, kl in metrics["kl_by_t"])
    assert metrics["exact_accuracy_by_t"][-1][1] == 1.0
    acc = [a for _, a in metrics["accuracy_by_t"]]
    assert acc[-1] > acc[0]
