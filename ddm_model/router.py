"""The router r(x_t, t) -> logits over the K clusters, i.e. p(cluster | x_t, t).

A few adaLN transformer blocks over patches (the DiT's own blocks, conditioned on t only)
with a mean-pooled linear head. It is trained with cross-entropy on clean samples of every
cluster noised by the experts' own path and time distribution (``flow.noised``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dit import Block, PatchEmbed, TimestepEmbedder, TrunkConfig, check_geometry, check_int
from .flow import TimeSampler, integrate, interpolate, noise_like, noised

MAX_CLUSTERS = 4096


@dataclass(frozen=True)
class RouterConfig(TrunkConfig):
    what: ClassVar[str] = "router"

    preset: str
    image_size: int
    in_channels: int
    num_clusters: int

    def __post_init__(self):
        check_geometry(self.preset, self.image_size, self.in_channels)
        check_int("num_clusters", self.num_clusters, 2, MAX_CLUSTERS)


class Router(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        trunk = config.trunk
        self.embed = PatchEmbed(config.image_size, config.in_channels, trunk.hidden, trunk.patch)
        self.t_embed = TimestepEmbedder(trunk.hidden)
        self.blocks = nn.ModuleList(Block(trunk.hidden, trunk.heads, trunk.mlp_ratio) for _ in range(trunk.depth))
        self.norm = nn.LayerNorm(trunk.hidden)
        self.head = nn.Linear(trunk.hidden, config.num_clusters)
        nn.init.zeros_(self.head.weight)  # starts at the uniform distribution over clusters
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.t_embed(t)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(self.norm(h).mean(dim=1))


def router_loss(
    router: nn.Module, x1: torch.Tensor, clusters: torch.Tensor, times: TimeSampler, generator: torch.Generator | None
) -> torch.Tensor:
    """Cross-entropy of the cluster a clean sample came from, seen through x_t."""
    xt, t, _ = noised(x1, times, generator)
    return F.cross_entropy(router(xt, t).float(), clusters)


@torch.no_grad()
def accuracy_by_time(
    router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    clusters: torch.Tensor,
    bins: int = 10,
    seed: int = 0,
    batch_size: int = 512,
) -> list[tuple[float, float]]:
    """Top-1 accuracy of the router at the centre of each of ``bins`` equal t-bins.

    Near t = 0 the input is almost pure noise and the accuracy should sit near the largest
    cluster's share (chance); near t = 1 it sees the clean image and should be high.
    """
    generator = torch.Generator(device=images.device).manual_seed(seed)
    was_training = isinstance(router, nn.Module) and router.training
    if was_training:
        router.eval()
    rows = []
    for b in range(bins):
        centre = (b + 0.5) / bins
        correct = 0
        for start in range(0, images.shape[0], batch_size):
            x1 = images[start : start + batch_size]
            t = torch.full((x1.shape[0],), centre, device=images.device)
            xt = interpolate(noise_like(x1, generator), x1, t)
            correct += (router(xt, t).argmax(dim=1) == clusters[start : start + batch_size]).sum().item()
        rows.append((centre, correct / images.shape[0]))
    if was_training:
        router.train()
    return rows


@torch.no_grad()
def expert_samples(
    experts: list[nn.Module],
    per_expert: int,
    shape: tuple[int, int, int],
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training data for a router when no real data may be seen: ``per_expert`` samples drawn
    from each expert alone (Euler, ``steps`` steps), labelled with that expert's index.

    The router trained on them learns p(k | x_t, t) under a uniform prior over experts; it
    is then noised with the same path and time distribution as real data would be.
    """
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k, expert in enumerate(experts):
        for start in range(0, per_expert, batch_size):
            n = min(batch_size, per_expert - start)
            noise = torch.randn((n, *shape), generator=generator).to(device)
            images.append(integrate(expert, noise, steps).clamp(-1, 1).cpu())
            labels.append(torch.full((n,), k, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)
