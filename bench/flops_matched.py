"""Monolith vs K-expert ensemble at equal training FLOPs on digits.

Trains K experts (each on its own cluster only) plus the router, counts their training FLOPs
(measured with FlopCounterMode), then trains one monolith of the same architecture on all
the data for the same number of FLOPs (router included on the ensemble's side). Samples
each with the same noise and reports, per routing strategy (full, top-2, top-1) and for the
monolith: Fréchet distance in the features of a classifier trained on digits, mode coverage,
expert evaluations per sample, and sampling wall time as a ratio to the monolith's, measured
side by side in this run. Prints a table and writes a Markdown report; asserts nothing.

    python bench/flops_matched.py                       # about 8 minutes on a 2-core CPU
    python bench/flops_matched.py --steps 300 --router-steps 300 --samples 500   # quick look
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ddm_model.checkpoint import load_checkpoint
from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_digits
from ddm_model.ensemble import RoutedEnsemble
from ddm_model.flow import integrate
from ddm_model.metrics import Evaluator
from ddm_model.progress import progress_bar
from ddm_model.recipe import Recipe, load_ensemble, step_flops, train_ensemble, train_monolith

console = Console(width=130)


def machine() -> str:
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        memory = ""
    cpu = platform.processor() or platform.machine()
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{cpu}, {torch.get_num_threads()} torch threads{memory}, {versions}"


def command_line(args: argparse.Namespace) -> str:
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items())


def training_set_posterior(images: torch.Tensor, clusters: torch.Tensor, k: int):
    """The exact p(cluster | x_t, t) of the training set's empirical distribution.

    x_t given data x_i is N(t x_i, (1 - t)^2 I), so p(k | x_t) is a softmax over the members of
    each cluster. A diagnostic only (it needs every training image): routing the trained
    experts with it separates router error from expert error.
    """
    data = images.flatten(1).double()
    members = torch.nn.functional.one_hot(clusters, k).double()

    def router(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, tt = x.flatten(1).double(), t.double()[:, None]
        sq = (x * x).sum(1, keepdim=True) - 2 * tt * (x @ data.T) + tt**2 * (data * data).sum(1)[None]
        log_w = -0.5 * sq / ((1 - tt) ** 2).clamp_min(1e-8)
        peak = log_w.max(1, keepdim=True).values
        return (torch.exp(log_w - peak) @ members).clamp_min(1e-300).log().float()

    return router


def sample_all(velocity, noises: list[torch.Tensor], steps: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    out = torch.cat([integrate(velocity, noise, steps) for noise in noises])
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per expert")
    parser.add_argument("--router-steps", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000, help="samples per sampling seed")
    parser.add_argument("--sampling-seeds", type=int, default=3, help="FD is reported as mean ± std over these")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--partition", choices=["kmeans2", "random"], default="kmeans2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/flops_matched"))
    parser.add_argument("--report", type=Path, default=Path("bench/reports/flops_matched.md"))
    args = parser.parse_args()

    dataset = load_digits()
    clustering = cluster_dataset(dataset, args.experts, method=args.partition, seed=args.seed)
    recipe = Recipe(expert_preset=args.preset, expert_steps=args.steps, router_steps=args.router_steps, seed=args.seed)
    work = args.out / f"{args.partition}-k{args.experts}-s{args.steps}-seed{args.seed}"

    with progress_bar() as bar:
        trained = train_ensemble(dataset, clustering, recipe, work, progress=bar)
        per_step = step_flops(dataset, recipe)
        monolith_steps = math.ceil(trained.training_flops / per_step)
        monolith_path, monolith_result = train_monolith(dataset, recipe, monolith_steps, work, progress=bar)
    ensemble = load_ensemble(trained.expert_paths, trained.router_path)
    monolith, _ = load_checkpoint(monolith_path, expect_kind="expert")
    evaluator = Evaluator.build(dataset, seed=args.seed)
    floor = evaluator.real_vs_real(seed=args.seed)

    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    noises = {
        s: [
            torch.randn((n, *shape), generator=torch.Generator().manual_seed(1000 + s))
            for n in [min(500, args.samples - i) for i in range(0, args.samples, 500)]
        ]
        for s in range(args.sampling_seeds)
    }
    clusters = torch.from_numpy(clustering.labels_for(dataset.ids))
    exact = RoutedEnsemble(ensemble.experts, training_set_posterior(dataset.images, clusters, clustering.k))
    contenders = {
        "monolith": (None, None),
        "ensemble full": (ensemble, "full"),
        "ensemble top-2": (ensemble, "top2"),
        "ensemble top-1": (ensemble, "top1"),
        "experts + exact posterior, full": (exact, "full"),
        "experts + exact posterior, top-2": (exact, "top2"),
    }
    rows = {}
    for name, (model, routing) in contenders.items():
        fds, hists, seconds, rows_per_sample = [], [], 0.0, 0.0
        for chunks in noises.values():
            if routing is None:
                images, took = sample_all(monolith, chunks, args.sampling_steps)
                evals = 1.0
            else:
                model.reset_counts()
                images, took = sample_all(model.as_velocity(routing), chunks, args.sampling_steps)
                evals = sum(model.expert_rows) / (args.samples * args.sampling_steps)
            fds.append(evaluator.frechet(images))
            hists.append(evaluator.class_histogram(images))
            seconds += took
            rows_per_sample = evals
        hist = np.mean(hists, axis=0)
        rows[name] = {
            "fd": float(np.mean(fds)),
            "fd_std": float(np.std(fds)),
            "coverage": int((hist > 0.02).sum()),
            "min_class": float(hist.min()),
            "evals": rows_per_sample,
            "seconds": seconds,
        }
    base = rows["monolith"]["seconds"]

    monolith_flops = monolith_result.flops
    table = Table(title=f"digits, {args.experts} experts ({args.partition}) vs monolith at equal training FLOPs")
    for col in ("model", "Fréchet distance", "classes > 2%", "rarest class", "expert evals / step", "sampling time"):
        table.add_column(col, justify="right" if col != "model" else "left")
    lines = []
    for name, r in rows.items():
        cells = [
            name,
            f"{r['fd']:.1f} ± {r['fd_std']:.1f}",
            f"{r['coverage']}/10",
            f"{r['min_class']:.1%}",
            f"{r['evals']:.2f}",
            f"{r['seconds'] / base:.2f}x",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    summary = (
        f"training FLOPs: ensemble {trained.training_flops / 1e12:.2f} TFLOP "
        f"({args.experts} x {args.steps} expert steps + {args.router_steps} router steps), "
        f"monolith {monolith_flops / 1e12:.2f} TFLOP ({monolith_steps} steps); real-vs-real Fréchet floor {floor:.1f}; "
        f"feature-net held-out accuracy {evaluator.held_out_accuracy:.1%}"
    )
    console.print(summary)

    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        "# Monolith vs ensemble at equal training FLOPs (digits)\n\n"
        f"Generated by `python bench/flops_matched.py {command_line(args)}`.\n\n"
        f"Machine: {machine()}.\n\n"
        f"{summary}.\n\n"
        f"Fréchet distance: mean ± std over {args.sampling_seeds} sampling seeds of {args.samples} samples, "
        f"{args.sampling_steps} Euler steps, same noise for every model. Expert evaluations per sample per step "
        "count rows dispatched to experts (the router runs once per step besides). Sampling time is the ratio to "
        "the monolith's, measured in the same run. The last two rows route the same trained experts with the exact "
        "posterior of the training set's empirical distribution instead of the trained router (a diagnostic: "
        "it separates router error from expert error; its sampling time includes that posterior).\n\n"
        "| model | Fréchet distance | classes > 2% | rarest class | expert evals / step | sampling time |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    console.print(f"report: {args.report}")


if __name__ == "__main__":
    main()
