"""The flow-matching probability path, written once for the whole project.

Convention: x_t = (1 - t) x_0 + t x_1 with x_0 ~ N(0, I) noise and x_1 data, t in [0, 1].
The model is trained to predict the velocity v = x_1 - x_0, and sampling integrates dx/dt = v
from t = 0 (noise) to t = 1 (data). Experts and the router both draw their training times
from one ``TimeSampler`` and noise their inputs with ``interpolate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import UsageError

Velocity = Callable[..., torch.Tensor]  # v(x, t) or v(x, t, y): x (B, ...), t (B,)
ALL_ROWS = slice(None)  # the whole batch (see ``noised``)


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape t (B,) so that it broadcasts against x (B, ...)."""
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t on the straight path from noise x0 (t = 0) to data x1 (t = 1)."""
    tt = expand_time(t, x1)
    return (1 - tt) * x0 + tt * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


@dataclass(frozen=True)
class TimeSampler:
    """Training-time distribution: logit-normal(mean, std) (SD3's choice) or uniform."""

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in ("logit_normal", "uniform"):
            raise UsageError(f"unknown time distribution {self.kind!r}; use 'logit_normal' or 'uniform'")
        if self.std <= 0:
            raise UsageError(f"time distribution std must be positive, got {self.std}")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        if self.kind == "uniform":
            return torch.rand(n, generator=generator, device=device)
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * normal)

    def to_dict(self) -> dict:
        return asdict(self)


def noise_like(x1: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)


def noised(
    x1: torch.Tensor, times: TimeSampler, generator: torch.Generator | None, rows: slice = ALL_ROWS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw (x_t, t, v_target) for a batch of data, as every training objective needs.

    ``rows`` keeps only those rows of the batch, yet the times and noise are drawn for all of
    it: processes that split one batch between them (``distributed``) each draw exactly what
    a single process would and keep their own part.
    """
    t = times(x1.shape[0], generator, x1.device)
    x0 = noise_like(x1, generator)
    x0, x1, t = x0[rows], x1[rows], t[rows]
    return interpolate(x0, x1, t), t, target_velocity(x0, x1)


def flow_matching_loss(
    model: Velocity,
    x1: torch.Tensor,
    times: TimeSampler,
    generator: torch.Generator | None,
    y: torch.Tensor | None = None,
    rows: slice = ALL_ROWS,
) -> torch.Tensor:
    """Mean squared error between the predicted and the conditional target velocity, over
    ``rows`` of the batch (``noised``); ``y`` is the whole batch's labels."""
    xt, t, target = noised(x1, times, generator, rows)
    pred = model(xt, t) if y is None else model(xt, t, y[rows])
    return F.mse_loss(pred.float(), target.float())


def drop_labels(y: torch.Tensor, rate: float, null_label: int, generator: torch.Generator | None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes the null label with
    probability ``rate``."""
    drop = torch.rand(y.shape[0], generator=generator, device=y.device) < rate
    return torch.where(drop, torch.full_like(y, null_label), y)


# ---------------------------------------------------------------------------------------------
# ODE samplers


def call_velocity(velocity: Velocity, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return velocity(x, t) if y is None else velocity(x, t, y)


def guided(model: Velocity, scale: float, null_label: int) -> Velocity:
    """Classifier-free guidance: v_null + scale (v_y - v_null), both halves in one batch."""
    if scale == 1.0:
        return model

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            return model(x, t)
        null = torch.full_like(y, null_label)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return velocity


SAMPLERS = ("euler", "heun")


@torch.no_grad()
def integrate(
    velocity: Velocity,
    noise: torch.Tensor,
    steps: int,
    method: str = "euler",
    y: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (noise) to t = 1 on a uniform grid.

    Euler is first order (``steps`` velocity evaluations); Heun is second order
    (2 * ``steps`` evaluations: a predictor and a corrector per step).
    """
    if method not in SAMPLERS:
        raise UsageError(f"unknown sampler {method!r}; use one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UsageError(f"sampling needs at least one step, got {steps}")
    x = noise
    grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
    batch = noise.shape[0]
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t
        v = call_velocity(velocity, x, t.expand(batch), y)
        if method == "euler":
            x = x + dt * v
        else:
            x_pred = x + dt * v
            v_next = call_velocity(velocity, x_pred, t_next.expand(batch), y)
            x = x + dt * 0.5 * (v + v_next)
        if on_step is not None:
            on_step(i + 1)
    return x
