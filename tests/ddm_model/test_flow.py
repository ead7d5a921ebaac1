"""The probability path, the time distribution, the loss and the ODE samplers."""

import itertools

import pytest
import torch

from ddm_model.flow import (
    TimeSampler,
    flow_matching_loss,
    guided,
    integrate,
    interpolate,
    noised,
    target_velocity,
)
from tests.mixture import GaussianMixture


def test_interpolant_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    assert torch.equal(interpolate(x0, x1, torch.zeros(8)), x0)
    assert torch.equal(interpolate(x0, x1, torch.ones(8)), x1)
    t = torch.rand(8, generator=g)
    xt = interpolate(x0, x1, t)
    assert torch.allclose(xt, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1)
    # d/dt of the straight path is the target velocity
    eps = 1e-3
    fd = (interpolate(x0, x1, t + eps) - interpolate(x0, x1, t - eps)) / (2 * eps)
    assert torch.allclose(fd, target_velocity(x0, x1), atol=1e-3)


def test_logit_normal_and_uniform_times():
    g = torch.Generator().manual_seed(0)
    t = TimeSampler("logit_normal", 0.0, 1.0)(100_000, g)
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    shifted = TimeSampler("logit_normal", 1.0, 0.5)(100_000, g)
    assert torch.log(shifted / (1 - shifted)).mean().item() == pytest.approx(1.0, abs=0.02)
    u = TimeSampler("uniform")(100_000, g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, abs=0.002)
    with pytest.raises(ValueError):
        TimeSampler("cosine")
    with pytest.raises(ValueError):
        TimeSampler(std=0)


def test_noised_draws_consistent_triples():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(16, 3, 4, 4, generator=g)
    xt, t, target = noised(x1, TimeSampler(), g)
    x0 = x1 - target
    assert torch.allclose(xt, interpolate(x0, x1, t), atol=1e-6)


def test_exact_velocity_minimises_the_loss():
    """The conditional flow-matching loss is smallest at the exact marginal velocity."""
    mix = GaussianMixture(torch.tensor([[2.0, -1.0]]), torch.tensor([0.5]), torch.tensor([1.0]))
    x1, _ = mix.sample(20_000, torch.Generator().manual_seed(0))

    def exact(x, t):
        return mix.component_velocity(0, x, t)

    def losses(model):
        return flow_matching_loss(model, x1, TimeSampler("uniform"), torch.Generator().manual_seed(1)).item()

    best = losses(exact)
    assert best < losses(lambda x, t: exact(x, t) * 1.1)
    assert best < losses(lambda x, t: exact(x, t) + 0.1)
    assert best < losses(lambda x, t: x1.mean(0) - x * 0)


def gaussian_case():
    """Data N(mu, s^2 I): the flow maps noise x0 to exactly mu + s x0."""
    mix = GaussianMixture(torch.tensor([[1.5, -2.0, 0.5]]), torch.tensor([0.3]), torch.tensor([1.0]))
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mix.means[0] + mix.stds[0] * noise
    return (lambda x, t: mix.component_velocity(0, x, t)), noise, exact


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_sampler_converges_at_its_order(method, order):
    velocity, noise, exact = gaussian_case()
    errors = [(integrate(velocity, noise, steps, method) - exact).abs().max().item() for steps in (8, 16, 32)]
    for coarse, fine in itertools.pairwise(errors):
        assert coarse / fine == pytest.approx(2**order, rel=0.2), errors


def test_heun_beats_euler_at_equal_evaluations():
    velocity, noise, exact = gaussian_case()
    heun = (integrate(velocity, noise, 25, "heun") - exact).abs().max().item()  # 50 evaluations
    euler = (integrate(velocity, noise, 50, "euler") - exact).abs().max().item()  # 50 evaluations
    assert heun < euler / 10
    assert (integrate(velocity, noise, 100, "heun") - exact).abs().max() < 2e-4


def test_sampler_counts_evaluations_and_reports_progress():
    calls, steps_seen = [], []

    def velocity(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    integrate(velocity, torch.zeros(2, 1), 5, "euler", on_step=steps_seen.append)
    assert len(calls) == 5 and steps_seen == [1, 2, 3, 4, 5]
    calls.clear()
    integrate(velocity, torch.zeros(2, 1), 5, "heun")
    assert len(calls) == 10


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler"):
        integrate(lambda x, t: x, torch.zeros(1, 1), 4, "rk4")
    with pytest.raises(ValueError, match="at least one step"):
        integrate(lambda x, t: x, torch.zeros(1, 1), 0)


def test_classifier_free_guidance_combines_both_branches():
    null = 10

    def model(x, t, y):
        return x + y.view(-1, 1).float()  # "velocity" that reveals the label it saw

    x = torch.zeros(3, 1)
    y = torch.tensor([1, 2, 3])
    g = guided(model, 3.0, null)(x, torch.zeros(3), y)
    uncond, cond = torch.full((3, 1), 10.0), y.view(-1, 1).float()
    assert torch.equal(g, uncond + 3.0 * (cond - uncond))
    assert guided(model, 1.0, null) is model
