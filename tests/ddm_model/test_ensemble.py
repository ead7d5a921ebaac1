"""The routed ensemble against closed-form flows of a Gaussian mixture."""

import pytest
import torch

from ddm_model.ensemble import RoutedEnsemble, parse_routing
from tests.mixture import GaussianMixture, default_mixture


def points(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, t


def test_exact_pieces_reproduce_exact_global_velocity():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    x, t = points()
    got = ensemble.velocity(x, t, routing="full")
    want = mix.global_velocity(x, t)
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()


def test_wrong_router_does_not_reproduce_global_velocity():
    """The check above has teeth: a uniform router gives a different field."""
    mix = default_mixture()
    uniform = RoutedEnsemble(mix.experts(), lambda x, t: torch.zeros(x.shape[0], mix.k, dtype=x.dtype))
    x, t = points()
    assert (uniform.velocity(x, t, routing="full") - mix.global_velocity(x, t)).abs().max() > 0.5


def test_top1_is_the_most_probable_experts_velocity():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    x, t = points()
    got = ensemble.velocity(x, t, routing="top1")
    best = mix.posterior_logits(x, t).argmax(1)
    want = torch.stack([mix.component_velocity(int(k), x[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(best)])
    assert torch.equal(got, want)


def test_top2_is_renormalised_mixture_of_two_best():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    x, t = points(64)
    got = ensemble.velocity(x, t, routing="top2")
    probs = torch.softmax(mix.posterior_logits(x, t), 1)
    top, idx = probs.topk(2, dim=1)
    for i in range(x.shape[0]):
        w = top[i] / top[i].sum()
        want = sum(w[j] * mix.component_velocity(int(idx[i, j]), x[i : i + 1], t[i : i + 1])[0] for j in range(2))
        assert torch.allclose(got[i], want, atol=1e-12)


def test_topk_with_k_equal_to_all_is_full():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    x, t = points(64)
    assert torch.allclose(ensemble.velocity(x, t, routing="top4"), ensemble.velocity(x, t, routing="full"))


class Counting:
    """A velocity callable that records the rows it was called on."""

    def __init__(self, k):
        self.k = k
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(x.clone())
        return torch.full_like(x, float(self.k + 1))


def test_dispatch_is_sparse_and_batched():
    k, n = 4, 100
    experts = [Counting(i) for i in range(k)]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k, generator=g)

    def router(x, t):
        return logits

    ensemble = RoutedEnsemble(experts, router)
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    t = torch.full((n,), 0.5)
    out = ensemble.velocity(x, t, routing="top1")
    choice = logits.argmax(1)
    for i, e in enumerate(experts):
        assert len(e.calls) <= 1, "each expert runs at most once per call, batched"
        rows = torch.cat(e.calls)[:, 0].long() if e.calls else torch.zeros(0, dtype=torch.long)
        assert torch.equal(rows, (choice == i).nonzero().squeeze(1)), "an expert sees exactly its routed samples"
        assert torch.equal(out[choice == i], torch.full(((choice == i).sum(), 3), float(i + 1)))
    assert sum(ensemble.expert_rows) == n  # top-1 costs one expert evaluation per sample

    ensemble.reset_counts()
    ensemble.velocity(x, t, routing="top2")
    assert sum(ensemble.expert_rows) == 2 * n
    ensemble.reset_counts()
    ensemble.velocity(x, t, routing="full")
    assert sum(ensemble.expert_rows) == k * n


def test_routing_is_rechosen_every_step_and_per_sample():
    """Top-1 along a trajectory: the router is asked at every step and experts switch."""
    mix = default_mixture()
    seen_t = []

    def router(x, t):
        seen_t.append(float(t[0]))
        return mix.posterior_logits(x, t)

    ensemble = RoutedEnsemble(mix.experts(), router)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ensemble.sample(noise, steps=10, routing="top1")
    assert seen_t == pytest.approx([i / 10 for i in range(10)])
    assert all(rows > 0 for rows in ensemble.expert_rows)


def test_full_ensemble_of_exact_pieces_samples_the_mixture():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = ensemble.sample(noise, steps=100, routing="full", method="heun")
    nearest = torch.cdist(x, mix.means).argmin(1)
    share = torch.bincount(nearest, minlength=mix.k).double() / x.shape[0]
    assert torch.allclose(share, mix.weights, atol=0.03), share
    for k in range(mix.k):
        members = x[nearest == k]
        assert torch.allclose(members.mean(0), mix.means[k], atol=0.1)
        assert members.std(0).mean().item() == pytest.approx(mix.stds[k].item(), rel=0.15)


def test_single_component_top1_matches_its_expert():
    mix = GaussianMixture(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), torch.tensor([1.0]))
    ensemble = RoutedEnsemble(mix.experts(), mix.posterior_logits)
    x, t = points(32)
    assert torch.allclose(ensemble.velocity(x, t, routing="top1"), mix.global_velocity(x, t), atol=1e-9)


@pytest.mark.parametrize("bad", ["top0", "top5", "best", "topk", ""])
def test_bad_routing_is_refused(bad):
    with pytest.raises(ValueError):
        parse_routing(bad, 4)


def test_router_with_wrong_width_is_refused():
    ensemble = RoutedEnsemble([lambda x, t: x] * 3, lambda x, t: torch.zeros(x.shape[0], 2))
    with pytest.raises(ValueError, match="router returned shape"):
        ensemble.velocity(torch.zeros(4, 2), torch.zeros(4))


def test_conditioning_is_routed_with_its_rows():
    seen = {}

    def expert(k):
        def v(x, t, y):
            seen[k] = (x[:, 0].clone(), y.clone())
            return torch.zeros_like(x)

        return v

    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    ensemble = RoutedEnsemble([expert(0), expert(1)], lambda x, t: logits)
    x = torch.tensor([[10.0], [11.0], [12.0]])
    ensemble.velocity(x, torch.zeros(3), y=torch.tensor([7, 8, 9]), routing="top1")
    assert torch.equal(seen[0][0], torch.tensor([10.0, 12.0])) and torch.equal(seen[0][1], torch.tensor([7, 9]))
    assert torch.equal(seen[1][0], torch.tensor([11.0])) and torch.equal(seen[1][1], torch.tensor([8]))
