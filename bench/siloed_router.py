"""Data-free router (siloed mode) against a router trained on the real data, on the same silos.

Digits are split into K silos (two-stage k-means) and each silo into a training part and a
held-out part that no model trains on. One expert is trained per silo on its training part.
Two routers are then trained with the same settings: one on the real training images with
their silo labels (what a shared-dataset coordinator does), one on samples drawn from the
experts themselves (what a siloed coordinator, which holds no data, does). The script reports
each router's accuracy per t-bin on the held-out real images, and the Fréchet distance of the
ensemble under each router with top-1, top-2 and full routing. It prints a table and writes
a Markdown report; it asserts nothing.

    python bench/siloed_router.py          # about 7 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ddm_model.clustering import cluster_dataset
from ddm_model.data import ImageDataset, load_digits
from ddm_model.ensemble import RoutedEnsemble
from ddm_model.metrics import Evaluator
from ddm_model.progress import progress_bar
from ddm_model.recipe import Recipe, generate
from ddm_model.router import accuracy_by_time, expert_samples
from ddm_model.train import train_expert, train_router

console = Console(width=130)


def split(dataset: ImageDataset, assignment: np.ndarray, k: int, held_out: float, seed: int):
    """Per silo: (training ids, held-out ids)."""
    rng = np.random.default_rng(seed)
    parts = []
    for silo in range(k):
        ids = rng.permutation(dataset.ids.numpy()[assignment == silo])
        cut = int(len(ids) * (1 - held_out))
        parts.append((np.sort(ids[:cut]), np.sort(ids[cut:])))
    return parts


def labelled(dataset: ImageDataset, parts: list[np.ndarray]) -> tuple[ImageDataset, torch.Tensor]:
    ids = np.concatenate(parts)
    labels = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    order = np.argsort(ids)
    return dataset.subset(ids[order]), torch.from_numpy(labels[order])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1200, help="training steps per expert")
    parser.add_argument("--router-steps", type=int, default=2000)
    parser.add_argument("--router-samples", type=int, default=1024, help="samples drawn from each expert")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--samples", type=int, default=2000, help="samples per ensemble for the Fréchet distance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/siloed_router"))
    parser.add_argument("--report", type=Path, default=Path("bench/reports/siloed_router.md"))
    args = parser.parse_args()
    started = time.perf_counter()

    digits = load_digits()
    silos = cluster_dataset(digits, args.silos, seed=args.seed)
    parts = split(digits, silos.labels_for(digits.ids), args.silos, args.held_out, args.seed)
    recipe = Recipe(expert_steps=args.steps, router_steps=args.router_steps, seed=args.seed)
    work = args.out / f"k{args.silos}-s{args.steps}-r{args.router_steps}-seed{args.seed}"
    shape = (digits.channels, digits.image_size, digits.image_size)

    with progress_bar() as bar:
        experts = []
        for k, (train_ids, _) in enumerate(parts):
            silo = digits.subset(train_ids, name=f"silo {k}")
            result = train_expert(
                silo,
                recipe.expert_config(digits),
                recipe.train_config(args.steps, seed_offset=k),
                checkpoint_dir=work / f"expert-{k}",
                progress=bar,
                description=f"expert {k}",
            )
            experts.append(result.model)
        real, real_labels = labelled(digits, [train for train, _ in parts])
        router_cfg = recipe.router_config(digits, args.silos)
        router_train = recipe.train_config(args.router_steps, seed_offset=100, lr=recipe.router_lr)
        real_router = train_router(
            real,
            real_labels,
            router_cfg,
            router_train,
            checkpoint_dir=work / "router-real",
            progress=bar,
            description="router, real data",
        ).model
        images, labels, _ = expert_samples(experts, args.router_samples, shape, steps=20, seed=args.seed)
        synthetic = ImageDataset(images, torch.arange(len(images)), name="expert samples")
        free_router = train_router(
            synthetic,
            labels,
            router_cfg,
            router_train,
            checkpoint_dir=work / "router-free",
            progress=bar,
            description="router, expert samples",
        ).model

    held, held_labels = labelled(digits, [held for _, held in parts])
    routers = {"real data": real_router, "expert samples (data-free)": free_router}
    accuracy = {
        name: accuracy_by_time(r, held.images, held_labels, bins=5, seed=args.seed) for name, r in routers.items()
    }
    evaluator = Evaluator.build(digits, seed=args.seed)
    fd = {}
    for name, router in routers.items():
        ensemble = RoutedEnsemble(experts, router)
        for routing in ("top1", "top2", "full"):
            samples = generate(ensemble.as_velocity(routing), args.samples, shape, 20, seed=args.seed)
            fd[(name, routing)] = evaluator.frechet(samples)

    bins = [t for t, _ in next(iter(accuracy.values()))]
    acc_table = Table(title=f"router accuracy on held-out real images ({len(held)} images, {args.silos} silos)")
    acc_table.add_column("router trained on")
    for t in bins:
        acc_table.add_column(f"t={t:.1f}", justify="right")
    acc_lines = []
    for name, rows in accuracy.items():
        cells = [name] + [f"{a:.1%}" for _, a in rows]
        acc_table.add_row(*cells)
        acc_lines.append("| " + " | ".join(cells) + " |")
    fd_table = Table(title=f"ensemble Fréchet distance ({args.samples} samples, 20 Euler steps)")
    for col in ("router trained on", "top-1", "top-2", "full"):
        fd_table.add_column(col, justify="left" if col.startswith("router") else "right")
    fd_lines = []
    for name in routers:
        cells = [name] + [f"{fd[(name, r)]:.1f}" for r in ("top1", "top2", "full")]
        fd_table.add_row(*cells)
        fd_lines.append("| " + " | ".join(cells) + " |")
    floor = evaluator.real_vs_real(seed=args.seed)
    console.print(acc_table)
    console.print(fd_table)
    console.print(
        f"real-vs-real Fréchet floor {floor:.1f}; chance accuracy {np.bincount(held_labels).max() / len(held):.1%}"
    )

    args.report.parent.mkdir(parents=True, exist_ok=True)
    header = "| router trained on | " + " | ".join(f"t={t:.1f}" for t in bins) + " |\n"
    header += "|---" * (len(bins) + 1) + "|\n"
    args.report.write_text(
        "# Data-free router vs real-data router (digits)\n\n"
        f"Generated by `python bench/siloed_router.py --silos {args.silos} --steps {args.steps} --router-steps "
        f"{args.router_steps} --router-samples {args.router_samples} --held-out {args.held_out} --samples "
        f"{args.samples} --seed {args.seed}` in {time.perf_counter() - started:.0f} s.\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.\n\n"
        f"Digits split into {args.silos} silos by two-stage k-means; {args.held_out:.0%} of each silo held out. One "
        "`small` expert per silo on its training part. Both routers: `small` preset, the same steps, rate and "
        "time distribution; one sees the real training images with their silo labels, the other "
        f"{args.router_samples} samples drawn from each expert (20 Euler steps), as a siloed coordinator does.\n\n"
        f"Accuracy on the held-out real images (chance: {np.bincount(held_labels).max() / len(held):.1%}):\n\n"
        + header
        + "\n".join(acc_lines)
        + "\n\n"
        f"Fréchet distance of the ensemble (classifier features; real-vs-real floor {floor:.1f}):\n\n"
        "| router trained on | top-1 | top-2 | full |\n|---|---|---|---|\n" + "\n".join(fd_lines) + "\n"
    )
    console.print(f"report: {args.report}")


if __name__ == "__main__":
    main()
