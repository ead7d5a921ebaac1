"""``ddm-coordinator demo``: the whole recipe on the built-in digits, in one process.

Cluster -> one expert per cluster, each trained on its own cluster only -> router -> routed
ensemble loaded back from its checkpoint files -> samples, a PNG grid and the Fréchet
distance. Everything lands in one folder; re-running resumes from the state kept there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ddm_model.checkpoint import read_checkpoint_header
from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_digits
from ddm_model.dit import trunk_for
from ddm_model.ensemble import parse_routing
from ddm_model.errors import UsageError
from ddm_model.flow import SAMPLERS
from ddm_model.grid import save_grid
from ddm_model.metrics import Evaluator
from ddm_model.progress import progress_bar
from ddm_model.recipe import Recipe, describe_clusters, generate, load_ensemble, train_ensemble


@dataclass
class DemoSettings:
    out: Path
    experts: int = 4
    preset: str = "small"
    steps: int = 1200
    router_preset: str = "small"
    router_steps: int = 2000
    routing: str = "top2"
    samples: int = 1000
    sampling_steps: int = 20
    sampler: str = "euler"
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        """Refuse bad settings before any work starts."""
        parse_routing(self.routing, self.experts)
        trunk_for(self.preset)
        trunk_for(self.router_preset)
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"unknown device {self.device!r}; use cpu or cuda")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda was asked for but this PyTorch sees no CUDA GPU")


console = Console()  # results on stdout; progress bars go to stderr


def run_demo(s: DemoSettings) -> dict:
    s.check()
    started = time.perf_counter()
    dataset = load_digits()
    console.print(
        f"[bold]ddm demo[/bold]: {s.experts} experts on digits ({len(dataset)} images, "
        f"{dataset.channels}x{dataset.image_size}x{dataset.image_size}), device {s.device}, output {s.out}/"
    )

    clustering = cluster_dataset(dataset, s.experts, seed=s.seed)
    clustering.save(s.out / "clustering.safetensors")
    table = Table(title="clusters (two-stage k-means on pixel features)", title_justify="left")
    table.add_column("cluster", justify="right")
    table.add_column("images", justify="right")
    table.add_column("digits it holds, most frequent first")
    for k, size, hist in describe_clusters(dataset, clustering):
        top = [f"{d}:{hist[d]}" for d in np.argsort(-hist, kind="stable")[:5] if hist[d]]
        table.add_row(str(k), str(size), "  ".join(top))
    console.print(table)

    recipe = Recipe(
        expert_preset=s.preset,
        router_preset=s.router_preset,
        expert_steps=s.steps,
        router_steps=s.router_steps,
        seed=s.seed,
        device=s.device,
    )
    with progress_bar() as bar:
        trained = train_ensemble(dataset, clustering, recipe, s.out, progress=bar)

    router_info, _ = read_checkpoint_header(trained.router_path)
    acc = Table(title="router accuracy by t", title_justify="left")
    for t, _ in router_info.metrics["accuracy_by_t"]:
        acc.add_column(f"t={t:.1f}", justify="right")
    acc.add_row(*[f"{a:.0%}" for _, a in router_info.metrics["accuracy_by_t"]])
    console.print(acc)

    ensemble = load_ensemble(trained.expert_paths, trained.router_path, device=s.device)
    evaluator = Evaluator.build(dataset, seed=s.seed)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    with progress_bar() as bar:
        task = bar.add_task(f"sampling ({s.routing})", total=s.samples, info="")
        images = generate(
            ensemble.as_velocity(s.routing),
            s.samples,
            shape,
            s.sampling_steps,
            s.sampler,
            seed=s.seed,
            device=s.device,
            on_batch=lambda n: bar.advance(task, n),
        )
    grid = save_grid(images[:100], s.out / "samples.png", columns=10)
    fd = evaluator.frechet(images)
    floor = evaluator.real_vs_real(seed=s.seed)
    hist = evaluator.class_histogram(images)

    console.print(
        f"training: {trained.training_flops / 1e12:.2f} TFLOP in total "
        f"({len(trained.expert_paths)} experts x {s.steps} steps + router {s.router_steps} steps)"
    )
    console.print("generated digits by class: " + "  ".join(f"{d}:{share:.0%}" for d, share in enumerate(hist)))
    console.print(
        f"Fréchet distance ({s.routing}, {s.samples} samples, {s.sampling_steps} {s.sampler} steps): "
        f"[bold]{fd:.1f}[/bold]  (real vs real: {floor:.1f}; feature-net accuracy {evaluator.held_out_accuracy:.1%})"
    )
    console.print(f"samples: [bold]{grid}[/bold]  ({time.perf_counter() - started:.0f} s)")
    return {"grid": str(grid), "frechet": fd, "real_vs_real": floor, "class_histogram": hist.tolist()}
