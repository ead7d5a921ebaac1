"""The router learns p(cluster | x_t, t): near chance on noise, accurate on clean images."""

import numpy as np
import pytest
import torch

from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_digits
from ddm_model.router import Router, RouterConfig, accuracy_by_time
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
