"""Closed-form flows for data drawn from a mixture of isotropic Gaussians.

With x_t = (1 - t) x_0 + t x_1, x_0 ~ N(0, I) and x_1 ~ sum_k pi_k N(mu_k, s_k^2 I):

- given component k, x_t ~ N(t mu_k, var_k(t) I) with var_k(t) = (1 - t)^2 + t^2 s_k^2;
- the component velocity is E[x_1 - x_0 | x_t, k] = mu_k + (t s_k^2 - (1 - t)) / var_k(t) (x_t - t mu_k);
- the posterior is p(k | x_t) ∝ pi_k N(x_t; t mu_k, var_k(t) I);
- the global velocity follows independently from the score of the marginal density:
  v(x, t) = (x + (1 - t) grad log p_t(x)) / t, computed here by autograd.
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        self.means = means.double()  # (K, D)
        self.stds = stds.double()  # (K,)
        self.weights = weights.double() / weights.sum()  # (K,)

    @property
    def k(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * noise, comp

    def _var(self, k: int, t: torch.Tensor) -> torch.Tensor:
        return (1 - t) ** 2 + t**2 * self.stds[k] ** 2

    def component_velocity(self, k: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double()[:, None]
        mu, s2 = self.means[k], self.stds[k] ** 2
        return mu + (t * s2 - (1 - t)) / self._var(k, t) * (x - t * mu)

    def component_log_density(self, k: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        var = self._var(k, t)
        d = x.shape[1]
        sq = ((x - t[:, None] * self.means[k]) ** 2).sum(1)
        return -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def posterior_logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x; t mu_k, var_k I): logits of the exact router."""
        return torch.stack([self.weights[k].log() + self.component_log_density(k, x, t) for k in range(self.k)], dim=1)

    def global_velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact marginal velocity from the score of p_t, by autograd (independent of the above)."""
        x = x.double().detach().requires_grad_(True)
        log_p = torch.logsumexp(self.posterior_logits(x, t), dim=1).sum()
        (score,) = torch.autograd.grad(log_p, x)
        tt = t.double()[:, None]
        return ((x + (1 - tt) * score) / tt).detach()

    def experts(self):
        return [lambda x, t, k=k: self.component_velocity(k, x, t) for k in range(self.k)]


def default_mixture() -> GaussianMixture:
    return GaussianMixture(
        means=torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0], [1.0, -3.0]]),
        stds=torch.tensor([0.5, 0.8, 0.3, 0.6]),
        weights=torch.tensor([0.4, 0.3, 0.2, 0.1]),
    )
