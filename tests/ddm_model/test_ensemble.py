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


# -- ancestral routing: one expert per sample, drawn from the shares ------------------------------


def ancestral_samples(mix, n, steps, seed, class_prior=None, y=None):
    ensemble = RoutedEnsemble(mix.experts(), None, prior=mix.weights * 1000, class_prior=class_prior)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    choice = ensemble.draw_experts(n, y, generator=torch.Generator().manual_seed(seed + 1))
    x = ensemble.sample(noise, steps, routing="ancestral", y=None, generator=torch.Generator().manual_seed(seed + 1))
    return ensemble, choice, x


def test_ancestral_matches_the_mixture_in_masses_and_moments():
    """With exact experts, drawing k ~ pi once and integrating expert k alone samples p exactly:
    each component's mass, mean and spread come out as the mixture's (Euler error only)."""
    mix = default_mixture()
    n = 40_000
    ensemble, choice, x = ancestral_samples(mix, n, steps=200, seed=3)
    masses = torch.bincount(choice, minlength=mix.k).double() / n
    se = (mix.weights * (1 - mix.weights) / n).sqrt()
    assert ((masses - mix.weights).abs() < 4 * se).all(), (masses, mix.weights)
    for k in range(mix.k):
        mine = x[choice == k]
        assert torch.allclose(mine.mean(0), mix.means[k], atol=0.05), (k, mine.mean(0))
        assert torch.allclose(mine.std(0), mix.stds[k].expand(2), rtol=0.05), (k, mine.std(0))
    want_mean = (mix.weights[:, None] * mix.means).sum(0)
    assert torch.allclose(x.mean(0), want_mean, atol=0.06)
    # one expert evaluation per sample per step: the dispatch is sparse
    assert sum(ensemble.expert_rows) == n * 200


def test_ancestral_mixture_global_second_moment_matches():
    mix = default_mixture()
    n = 40_000
    _, _, x = ancestral_samples(mix, n, steps=200, seed=5)
    second = (mix.weights[:, None] * (mix.means**2 + mix.stds[:, None] ** 2)).sum(0)
    assert torch.allclose((x**2).mean(0), second, rtol=0.03)


def test_ancestral_draws_are_seeded_and_follow_the_class_shares():
    mix = default_mixture()
    # class 0 lives in clusters 0 and 1 (3:1), class 1 only in cluster 3
    table = torch.tensor([[30.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    ensemble = RoutedEnsemble(mix.experts(), None, prior=[4, 3, 2, 1], class_prior=table)
    y = torch.tensor([0] * 20_000 + [1] * 100 + [7] * 4000)  # 7: no cluster holds it -> the prior
    choice = ensemble.draw_experts(len(y), y, torch.Generator().manual_seed(0))
    again = ensemble.draw_experts(len(y), y, torch.Generator().manual_seed(0))
    assert torch.equal(choice, again)
    zero = torch.bincount(choice[:20_000], minlength=4).double() / 20_000
    assert torch.allclose(zero, torch.tensor([0.75, 0.25, 0, 0], dtype=torch.float64), atol=0.015)
    assert (choice[20_000:20_100] == 3).all()
    unseen = torch.bincount(choice[20_100:], minlength=4).double() / 4000
    assert torch.allclose(unseen, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=0.03)


def test_ancestral_needs_no_router_but_per_step_routings_do():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), None)
    x, t = points(8)
    with pytest.raises(Exception, match="needs a router"):
        ensemble.velocity(x, t, routing="full")
    out = ensemble.sample(torch.zeros(8, 2, dtype=torch.float64), 4, "ancestral", generator=torch.Generator())
    assert out.shape == (8, 2)


def test_each_row_follows_its_drawn_expert_exactly_and_each_expert_runs_once_per_step():
    mix = default_mixture()
    ensemble = RoutedEnsemble(mix.experts(), None)
    x, t = points(64)
    calls = []
    experts = [lambda x, t, k=k, e=e: calls.append(k) or e(x, t) for k, e in enumerate(ensemble.experts)]
    ensemble.experts = experts
    choice = torch.tensor([0, 2, 2, 1, 3, 0, 1, 2] * 8)
    velocity = ensemble.with_experts(choice)
    got = velocity(x, t)
    want = torch.stack([mix.component_velocity(int(k), x[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(choice)])
    assert torch.equal(got, want)
    assert sorted(calls) == [0, 1, 2, 3] and ensemble.expert_rows == [16, 16, 24, 8]
    calls.clear()
    alone = ensemble.with_experts(torch.full((64,), 3))  # one expert holds every row: the batch itself
    assert torch.equal(alone(x, t), mix.component_velocity(3, x, t)) and calls == [3]
    with pytest.raises(Exception, match="8 experts drawn for a batch of 64"):
        ensemble.with_experts(choice[:8])(x, t)


@pytest.mark.parametrize("bad", [[1, -1, 0, 0], [0, 0, 0, 0], [1, float("nan"), 1, 1], [1, 2, 3]])
def test_bad_shares_are_refused(bad):
    mix = default_mixture()
    with pytest.raises(Exception, match="shares"):
        RoutedEnsemble(mix.experts(), None, prior=bad)


def test_generate_is_reproducible_and_runs_one_expert_per_sample():
    from ddm_model.recipe import generate

    mix = default_mixture()
    ensemble = RoutedEnsemble(
        [lambda x, t, k=k: torch.full_like(x, float(k)) for k in range(4)], mix.posterior_logits, prior=[1, 1, 1, 1]
    )
    a = generate(ensemble.sampler("ancestral"), 300, (1, 2, 2), steps=3, seed=1, batch_size=128)
    b = generate(ensemble.sampler("ancestral"), 300, (1, 2, 2), steps=3, seed=1, batch_size=128)
    assert torch.equal(a, b)
    # each sample moved by its own expert's constant velocity: a whole number, the same in every pixel
    noise = generate(lambda x, t: torch.zeros_like(x), 300, (1, 2, 2), steps=3, seed=1, batch_size=128)
    moved = (a - noise).flatten(1)
    assert torch.allclose(moved, moved[:, :1].expand_as(moved), atol=1e-5)
    assert set(moved[:, 0].round().long().tolist()) == {0, 1, 2, 3}
    assert sum(ensemble.expert_rows) == 2 * 300 * 3
