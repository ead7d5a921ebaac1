"""The whole DDM recipe on one machine: cluster, train K isolated experts, train the router,
assemble the routed ensemble, sample and score it.

The coordinator and the islands run the same steps over a network; this module runs them in
one process for the demo and the benchmarks, and is the reference for what each step does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from .checkpoint import load_checkpoint
from .clustering import Clustering
from .data import ImageDataset
from .dit import DiTConfig
from .ensemble import RoutedEnsemble, Sampler, fixed
from .flow import Velocity, integrate
from .router import RouterConfig, accuracy_by_time, router_warmup
from .train import TrainConfig, TrainResult, train_expert, train_router


@dataclass
class Recipe:
    expert_preset: str = "small"
    router_preset: str = "small"
    expert_steps: int = 1200
    router_steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    router_lr: float = 1e-3  # the router loses its low-t signal at higher rates
    seed: int = 0
    device: str = "cpu"
    class_conditional: bool = False  # experts and router conditioned on the class label
    router_warmup: int | None = None  # default: router_warmup(router_steps)

    def train_config(
        self, steps: int, seed_offset: int = 0, lr: float | None = None, warmup: int | None = None
    ) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=self.batch_size,
            lr=self.lr if lr is None else lr,
            seed=self.seed + seed_offset,
            device=self.device,
            checkpoint_every=max(steps // 4, 1),
            **({} if warmup is None else {"warmup": warmup}),
        )

    def num_classes(self, dataset: ImageDataset) -> int:
        if self.class_conditional and not dataset.num_classes:
            raise ValueError(f"a class-conditional recipe needs labels; {dataset.name} has none")
        return dataset.num_classes if self.class_conditional else 0

    def expert_config(self, dataset: ImageDataset) -> DiTConfig:
        classes = self.num_classes(dataset)
        return DiTConfig(self.expert_preset, dataset.image_size, dataset.channels, num_classes=classes)

    def router_config(self, dataset: ImageDataset, k: int) -> RouterConfig:
        return RouterConfig(
            self.router_preset, dataset.image_size, dataset.channels, k, num_classes=self.num_classes(dataset)
        )


ACCURACY_IMAGES = 2048  # the router's accuracy by t is measured on this many images at most


@dataclass
class TrainedEnsemble:
    expert_paths: list[Path]
    router_path: Path
    expert_results: list[TrainResult]
    router_result: TrainResult

    @property
    def training_flops(self) -> int:
        return sum(r.flops for r in self.expert_results) + self.router_result.flops


def train_ensemble(
    dataset: ImageDataset,
    clustering: Clustering,
    recipe: Recipe,
    out_dir: str | Path,
    progress: Progress | bool = True,
) -> TrainedEnsemble:
    """Train one expert per cluster, each on a copy of its own cluster only, then the router.

    Checkpoints land in ``out_dir`` (``expert-K.safetensors``, ``router.safetensors``); resume
    state in ``out_dir/work``, so an interrupted call continues where it stopped.
    """
    out_dir = Path(out_dir)
    expert_paths, results = [], []
    for k in range(clustering.k):
        shard = dataset.subset(clustering.members(k), name=f"{dataset.name}[cluster {k}]")
        result = train_expert(
            shard,
            recipe.expert_config(dataset),
            recipe.train_config(recipe.expert_steps, seed_offset=k),
            checkpoint_dir=out_dir / "work" / f"expert-{k}",
            progress=progress,
            description=f"expert {k} ({len(shard)} imgs)",
        )
        path = out_dir / f"expert-{k}.safetensors"
        result.export(path, shard.fingerprint(), cluster_id=k)
        expert_paths.append(path)
        results.append(result)

    clusters = torch.from_numpy(clustering.labels_for(dataset.ids))
    router_result = train_router(
        dataset,
        clusters,
        recipe.router_config(dataset, clustering.k),
        recipe.train_config(
            recipe.router_steps,
            seed_offset=clustering.k,
            lr=recipe.router_lr,
            warmup=recipe.router_warmup or router_warmup(recipe.router_steps),
        ),
        checkpoint_dir=out_dir / "work" / "router",
        progress=progress,
        description="router",
    )
    # Accuracy on at most ACCURACY_IMAGES of the images (all of a small set), fixed by the seed.
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(recipe.seed))[:ACCURACY_IMAGES]
    rows = rows.sort().values
    labels = dataset.labels[rows] if recipe.class_conditional else None
    accuracy = accuracy_by_time(
        router_result.model, dataset.images[rows], clusters[rows], bins=5, seed=recipe.seed, labels=labels
    )
    router_path = out_dir / "router.safetensors"
    router_result.export(
        router_path, dataset.fingerprint(), metrics={"accuracy_by_t": [[round(t, 3), round(a, 4)] for t, a in accuracy]}
    )
    return TrainedEnsemble(expert_paths, router_path, results, router_result)


def train_monolith(
    dataset: ImageDataset, recipe: Recipe, steps: int, out_dir: str | Path, progress: Progress | bool = True
) -> tuple[Path, TrainResult]:
    """One model on all the data: the baseline the ensemble is compared with."""
    out_dir = Path(out_dir)
    result = train_expert(
        dataset,
        recipe.expert_config(dataset),
        recipe.train_config(steps, seed_offset=1000),
        checkpoint_dir=out_dir / "work" / "monolith",
        progress=progress,
        description="monolith",
    )
    path = out_dir / "monolith.safetensors"
    result.export(path, dataset.fingerprint())
    return path, result


def step_flops(dataset: ImageDataset, recipe: Recipe) -> int:
    """Training FLOPs of one expert (or monolith) step under this recipe, measured."""
    return train_expert(dataset, recipe.expert_config(dataset), recipe.train_config(0), progress=False).flops_per_step


def cluster_shares(dataset: ImageDataset, clustering: Clustering) -> tuple[list[int], list[list[int]] | None]:
    """What a manifest's shares hold: each cluster's size and, where the data has labels, the
    (classes, clusters) table of counts that gives p(k | y)."""
    sizes = [int(n) for n in clustering.sizes]
    if dataset.labels is None:
        return sizes, None
    clusters = clustering.labels_for(dataset.ids)
    table = np.zeros((dataset.num_classes, clustering.k), dtype=np.int64)
    np.add.at(table, (dataset.labels.numpy(), clusters), 1)
    return sizes, table.tolist()


def load_ensemble(
    expert_paths: list[Path],
    router_path: Path,
    device: str = "cpu",
    prior: list[int] | None = None,
    class_prior: list[list[int]] | None = None,
) -> RoutedEnsemble:
    """Rebuild a routed ensemble from verified checkpoint files, experts ordered by cluster id,
    with the clusters' shares (``cluster_shares``) for ancestral routing."""
    experts = {}
    for path in expert_paths:
        model, info = load_checkpoint(path, expect_kind="expert", device=device)
        experts[info.cluster_id] = model
    router, info = load_checkpoint(router_path, expect_kind="router", device=device)
    k = info.model["num_clusters"]
    if sorted(experts) != list(range(k)):
        raise ValueError(f"the router routes over {k} clusters but the experts cover clusters {sorted(experts)}")
    return RoutedEnsemble([experts[i] for i in range(k)], router, prior, class_prior)


DRAW_STREAM = 1 << 40  # offset of the per-sample draws' seed from the noise's


def generate(
    model: Velocity | Sampler,
    n: int,
    shape: tuple[int, int, int],
    steps: int = 20,
    method: str = "euler",
    seed: int = 0,
    batch_size: int = 500,
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n samples from noise drawn under ``seed``, in batches, for ``labels`` (n,) if given.

    ``model`` is a velocity, or a ``Sampler`` (``RoutedEnsemble.sampler``) whose per-sample
    draws (ancestral routing's experts) come from a second stream of the same seed: the same
    seed gives the same samples, and the same noise whatever the routing."""
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{n} samples but {tuple(labels.shape)} labels")
    sampler = model if isinstance(model, Sampler) else fixed(model)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + DRAW_STREAM)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = torch.randn((b, *shape), generator=generator).to(device)
        y = None if labels is None else labels[start : start + b].to(device)
        velocity = sampler(b, y, draws)
        out.append(integrate(velocity, noise, steps, method, y).cpu())
        if on_batch is not None:
            on_batch(b)
    return torch.cat(out)
