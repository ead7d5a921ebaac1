"""Scoring an expert on a held-out probe slice of its cluster, before it is trusted.

A probe slice is a few samples of a cluster that no island trains on (``hold_out`` picks them,
deterministically from a seed). ``probe_loss`` is the flow-matching loss on those images at
noise and times fixed by a seed: every image is scored at ``draws`` times, one in each of
``draws`` equal strata of (0, 1), with its own noise, so the value depends on the images, the
seed and the model alone (not on the batch size, up to float rounding). ``untrained_loss``
scores a freshly initialised model of the same config the same way: an expert that does not
beat it by a margin has learned nothing worth signing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .dit import DiT, DiTConfig
from .flow import interpolate, target_velocity
from .train import seeded

PROBE_FRACTION = 0.05
PROBE_MIN = 16
PROBE_MAX = 256
PROBE_EVALUATIONS = 512  # (image, noise, time) triples scored per probe, at least 2 per image
_STREAM = 0x9B0BE  # keeps the hold-out draw apart from every other use of the same seed


def probe_size(n: int) -> int:
    """Samples held out of a cluster of n: 5% (at least 16, at most 256), never over half."""
    return min(PROBE_MAX, max(PROBE_MIN, math.ceil(PROBE_FRACTION * n)), n // 2)


def hold_out(ids: np.ndarray, seed: int, cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a cluster's sample ids into (training ids, probe ids), both sorted; the draw
    depends on the seed, the cluster and the ids alone."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    rng = np.random.default_rng([_STREAM, seed, cluster])
    probe = np.zeros(ids.shape[0], dtype=bool)
    probe[rng.choice(ids.shape[0], size=probe_size(ids.shape[0]), replace=False)] = True
    return ids[~probe], ids[probe]


def probe_seed(seed: int, cluster: int) -> int:
    """The noise-and-time seed of a cluster's probe, apart from every training stream."""
    return int(np.random.SeedSequence([_STREAM, seed, cluster]).generate_state(1)[0])


def probe_draws(n: int) -> int:
    """How many (noise, time) draws each of n probe images gets: about PROBE_EVALUATIONS in all."""
    return max(2, math.ceil(PROBE_EVALUATIONS / max(n, 1)))


@torch.no_grad()
def probe_loss(
    model: nn.Module, images: torch.Tensor, seed: int, draws: int | None = None, batch_size: int = 256
) -> float:
    """Mean squared velocity error over every image at ``draws`` fixed (noise, time) pairs,
    evaluated in float32 in batches of ``batch_size``."""
    n = images.shape[0]
    if n == 0:
        raise ValueError("a probe needs at least one image")
    draws = probe_draws(n) if draws is None else draws
    generator = torch.Generator().manual_seed(seed)
    x1 = images.detach().to("cpu", torch.float32).repeat_interleave(draws, dim=0)
    strata = torch.arange(draws, dtype=torch.float32).repeat(n)
    t = (strata + torch.rand(n * draws, generator=generator)) / draws
    x0 = torch.randn(x1.shape, generator=generator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, n * draws, batch_size):
            part = slice(start, start + batch_size)
            a, b, tt = x0[part].to(device), x1[part].to(device), t[part].to(device)
            pred = model(interpolate(a, b, tt), tt).float()
            total += float(((pred - target_velocity(a, b)) ** 2).sum(dtype=torch.float64))
    finally:
        model.train(was_training)
    return total / x1.numel()


def untrained_model(config: DiTConfig | dict, init_seed: int = 0) -> DiT:
    cfg = config if isinstance(config, DiTConfig) else DiTConfig.from_dict(config)
    return seeded(DiT, cfg, init_seed)


def untrained_loss(config: DiTConfig | dict, images: torch.Tensor, seed: int, init_seed: int = 0, **kwargs) -> float:
    """The probe loss of a freshly initialised expert of this config (weights fixed by init_seed)."""
    return probe_loss(untrained_model(config, init_seed), images, seed, **kwargs)


@dataclass(frozen=True)
class ProbeVerdict:
    """An expert's probe loss against an untrained model's: it passes when at least ``margin``
    (a fraction) below it."""

    loss: float
    baseline: float
    margin: float
    images: int

    @property
    def passed(self) -> bool:
        return math.isfinite(self.loss) and self.loss <= (1.0 - self.margin) * self.baseline

    @property
    def reason(self) -> str:
        untrained = f"an untrained model's {self.baseline:.4g}"
        if self.passed:
            below = 1.0 - self.loss / self.baseline
            return f"on its cluster's held-out probe slice its loss {self.loss:.4g} is {below:.0%} below {untrained}"
        return (
            f"on its cluster's held-out probe slice ({self.images} images) its loss {self.loss:.4g} is not at least"
            f" {self.margin * 100:g}% below {untrained}"
        )

    def to_dict(self) -> dict:
        return {
            "loss": round(self.loss, 6),
            "untrained_loss": round(self.baseline, 6),
            "margin": self.margin,
            "images": self.images,
        }


@dataclass(frozen=True)
class Probe:
    """One cluster's probe images and seed, with the untrained model's loss on them."""

    images: torch.Tensor
    seed: int
    baseline: float

    @classmethod
    def build(cls, config: DiTConfig | dict, images: torch.Tensor, seed: int) -> Probe:
        return cls(images, seed, untrained_loss(config, images, seed))

    def judge(self, model: nn.Module, margin: float) -> ProbeVerdict:
        return ProbeVerdict(probe_loss(model, self.images, self.seed), self.baseline, margin, self.images.shape[0])
