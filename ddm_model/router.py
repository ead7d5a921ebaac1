"""The router r(x_t, t[, y]) -> logits over the K clusters, i.e. p(cluster | x_t, t[, y]).

The DiT's own adaLN blocks over patches, conditioned on t and, in a class-conditional
ensemble, on the class label exactly like the experts (with the same null label, learnt by
label dropout, so one router serves conditional and unconditional sampling). The paper's head:
a learned CLS token enters the blocks with the patches and its final state gives the logits
(``head="cls"``); routers made before it pooled the patches' mean (``head="mean"``), and still
load. It is trained with cross-entropy on clean samples of every cluster noised by the experts'
own path and time distribution (``flow.noised``).

Its quality is reported as calibration, not accuracy alone: near t = 0 no router can beat the
prior, so ``calibration_by_time`` gives, per t, the accuracy beside the mean KL divergence from
the exact posterior of the training set's empirical distribution (``empirical_posterior``) to
the router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dit import Block, Conditioned, ConfigError, PatchEmbed, TrunkConfig, check_classes, check_geometry, check_int
from .flow import ALL_ROWS, TimeSampler, integrate, interpolate, noise_like, noised

MAX_CLUSTERS = 4096
HEADS = ("cls", "mean")
# The paper's router costs about 4% of the ensemble's training FLOPs.
DEFAULT_ROUTER_SHARE = 0.04


@dataclass(frozen=True)
class RouterConfig(TrunkConfig):
    what: ClassVar[str] = "router"

    preset: str
    image_size: int
    in_channels: int
    num_clusters: int
    num_classes: int = 0  # 0: unconditional; else conditioned on the label like the experts
    class_dropout: float = 0.1
    head: str = "cls"

    def __post_init__(self):
        check_geometry(self.preset, self.image_size, self.in_channels)
        check_int("num_clusters", self.num_clusters, 2, MAX_CLUSTERS)
        check_classes(self.num_classes, self.class_dropout)
        if self.head not in HEADS:
            raise ConfigError(f"config field 'head' must be one of {', '.join(HEADS)}, got {self.head!r}")

    @classmethod
    def from_dict(cls, data: object):
        # Routers saved before the CLS head carry no 'head' field: they pooled the mean.
        if isinstance(data, dict) and "head" not in data:
            data = {**data, "head": "mean"}
        return super().from_dict(data)


class Router(Conditioned):
    """r(x_t, t[, y]) -> logits over the clusters (B, K), conditioned like the experts."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        trunk = config.trunk
        self.embed = PatchEmbed(config.image_size, config.in_channels, trunk.hidden, trunk.patch)
        self._conditioning(trunk.hidden, config.num_classes)
        if config.head == "cls":
            self.cls = nn.Parameter(torch.zeros(1, 1, trunk.hidden))
            nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(Block(trunk.hidden, trunk.heads, trunk.mlp_ratio) for _ in range(trunk.depth))
        self.norm = nn.LayerNorm(trunk.hidden)
        self.head = nn.Linear(trunk.hidden, config.num_clusters)
        nn.init.zeros_(self.head.weight)  # starts at the uniform distribution over clusters
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(t, y)  # (B, D)
        h = self.embed(x)  # (B, T, D)
        if self.config.head == "cls":
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)  # (B, 1 + T, D)
        for block in self.blocks:
            h = block(h, c)
        pooled = h[:, 0] if self.config.head == "cls" else h.mean(dim=1)  # (B, D)
        return self.head(self.norm(pooled))  # (B, K)


RouterFn = Callable[..., torch.Tensor]  # r(x, t) or r(x, t, y) -> logits (B, K)


def call_router(router: RouterFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return router(x, t) if y is None else router(x, t, y)


def router_loss(
    router: nn.Module,
    x1: torch.Tensor,
    clusters: torch.Tensor,
    times: TimeSampler,
    generator: torch.Generator | None,
    y: torch.Tensor | None = None,
    rows: slice = ALL_ROWS,
) -> torch.Tensor:
    """Cross-entropy of the cluster a clean sample came from, seen through x_t (and its label),
    over ``rows`` of the batch (``flow.noised``); ``clusters`` and ``y`` cover the whole batch."""
    xt, t, _ = noised(x1, times, generator, rows)
    y = None if y is None else y[rows]
    return F.cross_entropy(call_router(router, xt, t, y).float(), clusters[rows])


def router_steps_for(share: float, expert_flops: int, router_step_flops: int) -> int:
    """Router steps that cost ``share`` of the experts' training FLOPs (at least one)."""
    if not 0 < share < 1:
        raise ConfigError(f"the router's share of the training FLOPs must lie in (0, 1), got {share}")
    if router_step_flops <= 0:
        raise ConfigError("a router step must cost some FLOPs")
    return max(1, round(share * expert_flops / router_step_flops))


def router_warmup(steps: int, default: int = 100) -> int:
    """A router budgeted as a share of the experts' FLOPs may run only a few hundred steps:
    its warmup is a tenth of them, at most ``default`` (the training loop's)."""
    return max(1, min(default, steps // 10))


# ---------------------------------------------------------------------------------------------
# Calibration


def empirical_posterior(
    images: torch.Tensor, clusters: torch.Tensor, k: int, labels: torch.Tensor | None = None, chunk: int = 256
) -> RouterFn:
    """The exact p(cluster | x_t, t[, y]) of the empirical distribution of ``images``.

    x_t given a data point x_i is N(t x_i, (1 - t)^2 I), so p(k | x_t) is a softmax over every
    point's log-likelihood, summed per cluster; given a label y, only the points of class y
    count. It needs every image (a diagnostic and a calibration reference, not a router one
    can ship). Returns log-probabilities (a valid logits tensor).
    """
    data = images.flatten(1).double()
    norms = (data * data).sum(1)
    members = F.one_hot(clusters.to(data.device), k).double()

    def posterior(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = []
        for start in range(0, x.shape[0], chunk):
            xb, tt = x[start : start + chunk].flatten(1).double(), t[start : start + chunk].double()[:, None]
            sq = (xb * xb).sum(1, keepdim=True) - 2 * tt * (xb @ data.T) + tt**2 * norms[None]
            log_w = -0.5 * sq / ((1 - tt) ** 2).clamp_min(1e-8)
            if y is not None and labels is not None:
                yb = y[start : start + chunk]
                keep = labels.to(x.device)[None, :] == yb[:, None]
                keep |= ~keep.any(1, keepdim=True)  # a null or unseen label: every point counts
                log_w = log_w.masked_fill(~keep, float("-inf"))
            log_w = log_w - log_w.max(1, keepdim=True).values
            out.append((torch.exp(log_w) @ members).clamp_min(1e-300).log())
        logp = torch.cat(out)
        return (logp - torch.logsumexp(logp, dim=1, keepdim=True)).float()

    return posterior


@torch.no_grad()
def calibration_by_time(
    router: RouterFn,
    images: torch.Tensor,
    clusters: torch.Tensor,
    reference: RouterFn | None = None,
    labels: torch.Tensor | None = None,
    bins: int = 10,
    seed: int = 0,
    batch_size: int = 512,
) -> list[dict]:
    """Per t (the centre of each of ``bins`` equal bins): the router's top-1 accuracy on the
    cluster each image came from, and, given the exact posterior ``reference``, the mean
    KL(reference || router) in nats and the reference's own accuracy (the best any router can
    reach). With ``labels`` both the router and the reference see each image's class.
    """
    generator = torch.Generator(device=images.device).manual_seed(seed)
    was_training = isinstance(router, nn.Module) and router.training
    if was_training:
        router.eval()
    rows = []
    for b in range(bins):
        centre = (b + 0.5) / bins
        correct = best = 0
        kl = 0.0
        for start in range(0, images.shape[0], batch_size):
            x1 = images[start : start + batch_size]
            y = None if labels is None else labels[start : start + batch_size]
            truth = clusters[start : start + batch_size]
            t = torch.full((x1.shape[0],), centre, device=images.device)
            xt = interpolate(noise_like(x1, generator), x1, t)
            logits = call_router(router, xt, t, y).float()
            correct += (logits.argmax(dim=1) == truth).sum().item()
            if reference is not None:
                exact = call_router(reference, xt, t, y).float()
                p = exact.softmax(dim=1)
                kl += (p * (exact.log_softmax(dim=1) - logits.log_softmax(dim=1))).sum(dim=1).clamp_min(0).sum().item()
                best += (exact.argmax(dim=1) == truth).sum().item()
        n = images.shape[0]
        row = {"t": round(centre, 3), "accuracy": correct / n}
        if reference is not None:
            row.update(kl=kl / n, exact_accuracy=best / n)
        rows.append(row)
    if was_training:
        router.train()
    return rows


def router_metrics(
    router: RouterFn,
    images: torch.Tensor,
    clusters: torch.Tensor,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    bins: int = 5,
    limit: int = 2048,
) -> dict:
    """What a published router says of itself: accuracy and KL(exact || router) by t, on at
    most ``limit`` of its training images (drawn by ``seed``), against the exact posterior of
    all of them (given the label, for a class-conditional router)."""
    k = int(clusters.max()) + 1
    exact = empirical_posterior(images, clusters, k, labels)
    rows = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    table = calibration_by_time(
        router, images[rows], clusters[rows], exact, None if labels is None else labels[rows], bins, seed
    )
    return {
        "accuracy_by_t": [[row["t"], round(row["accuracy"], 4)] for row in table],
        "kl_by_t": [[row["t"], round(row["kl"], 4)] for row in table],
        "exact_accuracy_by_t": [[row["t"], round(row["exact_accuracy"], 4)] for row in table],
        "calibration_images": int(rows.numel()),
    }


def accuracy_by_time(
    router: RouterFn,
    images: torch.Tensor,
    clusters: torch.Tensor,
    bins: int = 10,
    seed: int = 0,
    batch_size: int = 512,
    labels: torch.Tensor | None = None,
) -> list[tuple[float, float]]:
    """Top-1 accuracy of the router at the centre of each of ``bins`` equal t-bins.

    Near t = 0 the input is almost pure noise and the accuracy should sit near the largest
    cluster's share (chance); near t = 1 it sees the clean image and should be high.
    """
    rows = calibration_by_time(router, images, clusters, None, labels, bins, seed, batch_size)
    return [(row["t"], row["accuracy"]) for row in rows]


@torch.no_grad()
def expert_samples(
    experts: list[nn.Module],
    per_expert: int | list[int],
    shape: tuple[int, int, int],
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_classes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Training data for a router when no real data may be seen: samples drawn from each
    expert alone (Euler, ``steps`` steps), labelled with that expert's index.

    ``per_expert`` is one count for every expert (a uniform prior) or one count each (the
    experts' shares, where islands reported them). For class-conditional experts each sample
    is drawn for a class chosen uniformly at random, returned as the third value (else None).
    The router trained on them learns p(k | x_t, t[, y]); it is then noised with the same path
    and time distribution as real data would be.
    """
    counts = [per_expert] * len(experts) if isinstance(per_expert, int) else list(per_expert)
    if len(counts) != len(experts):
        raise ConfigError(f"{len(counts)} sample counts for {len(experts)} experts")
    generator = torch.Generator().manual_seed(seed)
    images, labels, classes = [], [], []
    for k, expert in enumerate(experts):
        for start in range(0, counts[k], batch_size):
            n = min(batch_size, counts[k] - start)
            noise = torch.randn((n, *shape), generator=generator).to(device)
            y = None
            if num_classes:
                y = torch.randint(0, num_classes, (n,), generator=generator)
                classes.append(y)
                y = y.to(device)
            images.append(integrate(expert, noise, steps, y=y).clamp(-1, 1).cpu())
            labels.append(torch.full((n,), k, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels), torch.cat(classes) if num_classes else None
