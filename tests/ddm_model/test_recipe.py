"""The one-process recipe: class-conditional experts and router, and the clusters' shares."""

import numpy as np
import pytest
import torch

from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_digits
from ddm_model.recipe import Recipe, cluster_shares, generate, load_ensemble, train_ensemble


def test_cluster_shares_count_each_class_in_each_cluster():
    digits = load_digits()
    clustering = cluster_dataset(digits, 3, seed=0)
    sizes, table = cluster_shares(digits, clustering)
    assert sizes == clustering.sizes.tolist() and sum(sizes) == len(digits)
    table = np.array(table)
    assert table.shape == (10, 3)
    assert table.sum(axis=0).tolist() == sizes  # every image counted once, in its cluster
    assert table.sum(axis=1).tolist() == np.bincount(digits.labels.numpy()).tolist()
    assert cluster_shares(digits.without_labels(), clustering)[1] is None


def test_a_class_conditional_recipe_needs_labels():
    with pytest.raises(ValueError, match="needs labels"):
        Recipe(class_conditional=True).expert_config(load_digits().without_labels())


def test_class_conditional_ensemble_trains_and_samples_each_class(tmp_path):
    digits = load_digits()
    clustering = cluster_dataset(digits, 2, seed=0)
    recipe = Recipe("tiny", "tiny", expert_steps=3, router_steps=3, class_conditional=True)
    trained = train_ensemble(digits, clustering, recipe, tmp_path, progress=False)
    sizes, table = cluster_shares(digits, clustering)
    ensemble = load_ensemble(trained.expert_paths, trained.router_path, prior=sizes, class_prior=table)
    assert ensemble.router.num_classes == 10 and all(e.num_classes == 10 for e in ensemble.experts)
    labels = torch.tensor([3] * 40 + [7] * 40)
    for routing in ("ancestral", "full", "top1"):
        out = generate(ensemble.sampler(routing), 80, (1, 8, 8), steps=2, seed=0, labels=labels)
        assert out.shape == (80, 1, 8, 8) and torch.isfinite(out).all()
    # ancestral draws each class's expert from p(k | y): a class that lives in one cluster only
    # is always given that cluster's expert
    only = [c for c in range(10) if (np.array(table[c]) > 0).sum() == 1]
    assert only == [0, 6]  # digits 0 and 6 each fall in one of the two clusters
    for c in only:
        home = int(np.argmax(table[c]))
        choice = ensemble.draw_experts(200, torch.full((200,), c), torch.Generator().manual_seed(0))
        assert (choice == home).all()


def test_a_longer_run_resumes_its_router_with_the_warmup_fixed_by_the_recipe(tmp_path):
    """paper_claims trains F/3 and then resumes to F: the router's warmup must not change."""
    import dataclasses

    digits = load_digits()
    clustering = cluster_dataset(digits, 2, seed=0)
    recipe = Recipe("tiny", "tiny", expert_steps=2, router_steps=20, router_warmup=5)
    train_ensemble(digits, clustering, recipe, tmp_path, progress=False)
    longer = train_ensemble(
        digits, clustering, dataclasses.replace(recipe, expert_steps=3, router_steps=60), tmp_path, progress=False
    )
    assert longer.router_result.resumed_from == 20 and longer.router_result.steps == 60
