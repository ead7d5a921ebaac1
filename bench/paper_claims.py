"""The paper's claims, measured on ddm itself.

McAllister et al. (2025) report, on ImageNet with DiT-XL/2 and 8 experts: an ensemble of
isolated experts beats a monolith trained with the same FLOPs (FID 9.84 against 12.81); top-1
routing is as good as or better than the full ensemble at a fraction of the sampling cost (top-1
9.84 at 334 GFLOPs, top-2 10.31 at 642, full 10.52 at 2490); feature clustering beats a random
partition; 8 experts beat 4 (and 16); and the ensemble distils into one dense model that matches
a monolith trained from scratch at a third of the FLOPs.

This script checks each claim at a stated scale, on one dataset, with one model size and one
set of optimizer settings for every model:

- a monolith trained for F FLOPs (and the same run stopped at F/3);
- for K in 2, 4, 8: a DDM whose K experts and router together cost F (router FLOPs counted),
  on two-stage k-means clusters, and the same on a random partition; the k-means ones also
  stopped at F/3;
- a student distilled from one k-means DDM for F/3 FLOPs, its teachers' forward passes counted.

Every model is sampled with the same noise (same seeds, same Euler steps), the ensembles with
full, top-2 and top-1 routing, and scored by Fréchet distance in the features of a classifier
trained on the dataset, class coverage, training FLOPs and measured sampling FLOPs per image.
The report (Markdown, PNG figures) states each claim, whether it holds here, and the evidence
the script computed; it asserts nothing. Training resumes from bench/out, so an interrupted run
continues where it stopped.

    python bench/paper_claims.py --scale smoke   # the pipeline in a few minutes; report under bench/out
    python bench/paper_claims.py --scale cpu     # about half an hour on 2 CPU cores
    python bench/paper_claims.py --scale gpu     # a CUDA machine
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from rich.console import Console

from ddm_model.checkpoint import load_checkpoint, read_checkpoint_header
from ddm_model.clustering import Clustering, cluster_dataset
from ddm_model.data import ImageDataset, load_dataset
from ddm_model.distill import DEFAULT_DATA_WEIGHT, teacher_gap, train_student
from ddm_model.ensemble import RoutedEnsemble, Sampler
from ddm_model.errors import DDMError
from ddm_model.flops import count_flops
from ddm_model.flow import TimeSampler, integrate
from ddm_model.fsutil import atomic_path
from ddm_model.grid import save_grid
from ddm_model.metrics import Evaluator
from ddm_model.progress import progress_bar
from ddm_model.recipe import (
    Recipe,
    cluster_shares,
    generate,
    load_ensemble,
    step_flops,
    train_ensemble,
    train_monolith,
)
from ddm_model.router import calibration_by_time, empirical_posterior, router_warmup
from ddm_model.train import router_step_flops

console = Console(width=130)
ROUTINGS = ("ancestral", "full", "top2", "top1")
STAGES = {"F3": "F/3", "F": "F"}
DATASETS = ("digits", "fashion-mnist")
CALIBRATION_IMAGES = 500  # noised training images on which each router's calibration is measured


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of a run."""

    image_size: int | None  # images resized to this side (None: native)
    preset: str  # experts, monolith and student alike
    router_preset: str  # smaller than the experts', as the paper's DiT-B/2 router beside DiT-XL/2 experts
    batch_size: int
    lr: float
    monolith_steps: int  # sets the budget F
    router_share: float  # share of each DDM's budget spent on its router (the paper: about 4%)
    ks: tuple[int, ...]  # k-means DDMs, unconditional
    random_ks: tuple[int, ...]  # random partitions, unconditional
    conditional_ks: tuple[int, ...]  # k-means DDMs, class-conditional (beside a class-conditional monolith)
    exact_ks: tuple[int, ...]  # k-means DDMs also sampled with the training set's exact posterior
    distill_k: int  # the unconditional k-means DDM the student learns from
    samples: int  # per sampling seed
    seeds: int
    sampling_steps: int
    device: str
    limit: int | None = None  # the first images of the training set only (smoke runs)
    prefix_ddms: bool = True  # also sample the k-means DDMs at F/3 (the prefix of their F runs)
    routings: tuple[str, ...] = ROUTINGS  # routings sampled for each k-means DDM


SCALES = {
    "digits": {
        "smoke": Scale(None, "tiny", "tiny", 64, 3e-3, 150, 0.04, (2, 4), (4,), (4,), (4,), 4, 200, 2, 5, "cpu"),
        "cpu": Scale(
            None,
            "small",
            "tiny",
            64,
            3e-3,
            5000,
            0.04,
            (2, 4, 8),
            (2, 4, 8),
            (2, 4, 8),
            (2, 4, 8),
            4,
            1500,
            2,
            20,
            "cpu",
        ),
        "gpu": Scale(
            16, "S/2", "small", 256, 1e-3, 8000, 0.04, (2, 4, 8), (2, 4, 8), (2, 4, 8), (4,), 4, 5000, 3, 20, "cuda"
        ),
    },
    "fashion-mnist": {
        "smoke": Scale(None, "tiny", "tiny", 64, 3e-3, 100, 0.04, (4,), (4,), (4,), (), 4, 200, 2, 5, "cpu", 3000),
        "cpu": Scale(
            None,
            "small/4",
            "tiny",
            64,
            3e-3,
            2500,
            0.04,
            (2, 4, 8),
            (4,),
            (4,),
            (),
            4,
            1000,
            2,
            20,
            "cpu",
            prefix_ddms=False,
            routings=("ancestral", "full", "top1"),
        ),
        "gpu": Scale(32, "S/2", "S/4", 256, 1e-3, 20000, 0.04, (2, 4, 8), (4, 8), (4, 8), (), 4, 5000, 3, 20, "cuda"),
    },
}


def machine() -> str:
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        memory = ""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{cpu}, {torch.get_num_threads()} torch threads{memory}{gpu}, {versions}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Trained:
    """One DDM at one budget: its partition, its steps and what it cost."""

    name: str
    partition: str
    k: int
    conditional: bool
    clustering: Clustering
    expert_steps: int
    router_steps: int
    flops: int
    router_flops: int
    ensemble: RoutedEnsemble
    calibration: list
    expert_paths: list[Path]


def snapshot(files: list[Path], folder: Path) -> None:
    """Copy finished checkpoints aside (the last one marks the snapshot complete)."""
    for path in files:
        with atomic_path(folder / path.name) as tmp:
            shutil.copyfile(path, tmp)


def load_data(name: str, scale: Scale) -> tuple[ImageDataset, ImageDataset | None]:
    """The training set and, where the dataset has one, its held-out test set."""
    train = load_dataset(name, image_size=scale.image_size)
    if scale.limit is not None:
        train = train.subset(train.ids[: scale.limit], name=train.name)
    test = load_dataset(f"{name}-test", image_size=scale.image_size) if name == "fashion-mnist" else None
    return train, test


class Bench:
    def __init__(self, dataset: str, scale_name: str, scale: Scale, out: Path, seed: int):
        self.dataset_name, self.scale_name, self.scale, self.out, self.seed = dataset, scale_name, scale, out, seed
        self.dataset, self.test = load_data(dataset, scale)
        self.shape = (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)
        self.recipe = Recipe(
            expert_preset=scale.preset,
            router_preset=scale.router_preset,
            batch_size=scale.batch_size,
            lr=scale.lr,
            router_lr=min(scale.lr, 1e-3),
            seed=seed,
            device=scale.device,
        )
        self.results: dict[str, dict] = {}
        self.grids: dict[str, Path] = {}
        self.cache = out / "results.json"
        self.cached = json.loads(self.cache.read_text()) if self.cache.exists() else {}
        self.reused = 0  # evaluations and trainings taken from an earlier invocation
        self.training_seconds = 0.0
        # Labels to sample class-conditional models with: the training set's own class mix.
        self.class_freq = torch.bincount(self.dataset.labels, minlength=self.dataset.num_classes).double()
        # Images (and their labels) on which the routers' calibration is measured.
        pick = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
        self.calib_rows = pick

    def recipe_for(self, conditional: bool) -> Recipe:
        return dataclasses.replace(self.recipe, class_conditional=conditional)

    # -- training --------------------------------------------------------------------------

    def budget(self) -> tuple[int, int, int]:
        """(F, expert step FLOPs, router step FLOPs), all measured (unconditional models)."""
        per_step = step_flops(self.dataset, self.recipe)
        router_step = router_step_flops(self.dataset, self.recipe.router_config(self.dataset, 2), self.scale.batch_size)
        return self.scale.monolith_steps * per_step, per_step, router_step

    def monolith(self, stage: str, steps: int, conditional: bool, bar) -> tuple[torch.nn.Module, dict]:
        """The monolith stopped after ``steps`` (runs with a constant rate: F/3 is F's prefix)."""
        tag = "-cc" if conditional else ""
        path = self.out / f"monolith{tag}-{stage}.safetensors"
        if path.exists():
            self.reused += 1
        else:
            started = time.perf_counter()
            work = self.out / f"monolith{tag}"
            trained, _ = train_monolith(self.dataset, self.recipe_for(conditional), steps, work, progress=bar)
            self.training_seconds += time.perf_counter() - started
            with atomic_path(path) as tmp:
                shutil.copyfile(trained, tmp)
        model, info = load_checkpoint(path, device=self.scale.device)
        return model, {"kind": "monolith", "flops": info.flops, "steps": info.steps, "conditional": conditional}

    def ddm(self, partition: str, k: int, stage: str, budget: int, conditional: bool, bar) -> Trained:
        """K experts plus a router for ``budget`` FLOPs; the router takes its share first. The
        F/3 stage of a partition is the prefix of its F run (same folder, resumed)."""
        recipe = self.recipe_for(conditional)
        per_step = step_flops(self.dataset, recipe)
        router_step = router_step_flops(self.dataset, recipe.router_config(self.dataset, k), self.scale.batch_size)
        clustering = cluster_dataset(self.dataset, k, method=partition, seed=self.seed)
        tag = "-cc" if conditional else ""
        folder = self.out / f"{partition}-k{k}{tag}"
        stage_dir = folder / stage
        names = [f"expert-{i}.safetensors" for i in range(k)] + ["router.safetensors"]
        if (stage_dir / names[-1]).exists():
            self.reused += 1
        else:
            router_steps = max(1, int(self.scale.router_share * budget / router_step))
            expert_steps = (budget - router_steps * router_step) // (k * per_step)
            # F/3 is the prefix of the F run: both warm the router up as the F run does.
            final_steps = max(1, int(self.scale.router_share * self.budget_f / router_step))
            recipe = dataclasses.replace(
                recipe, expert_steps=expert_steps, router_steps=router_steps, router_warmup=router_warmup(final_steps)
            )
            started = time.perf_counter()
            trained = train_ensemble(self.dataset, clustering, recipe, folder, progress=bar)
            self.training_seconds += time.perf_counter() - started
            snapshot([*trained.expert_paths, trained.router_path], stage_dir)
        paths = [stage_dir / name for name in names]
        prior, class_prior = cluster_shares(self.dataset, clustering)
        ensemble = load_ensemble(paths[:-1], paths[-1], self.scale.device, prior, class_prior)
        infos = [read_checkpoint_header(p)[0] for p in paths]
        name = f"{partition} K={k}{' cc' if conditional else ''}"
        return Trained(
            name,
            partition,
            k,
            conditional,
            clustering,
            infos[0].steps,
            infos[-1].steps,
            sum(i.flops for i in infos),
            infos[-1].flops,
            ensemble,
            self.calibration(ensemble.router, clustering, conditional) if stage == "F" else [],
            paths[:-1],
        )

    def calibration(self, router, clustering: Clustering, conditional: bool) -> list[dict]:
        """Accuracy and KL(exact || router) by t on a fixed sample of training images."""
        d, rows = self.dataset, self.calib_rows
        clusters = torch.from_numpy(clustering.labels_for(d.ids))
        labels = d.labels if conditional else None
        exact = empirical_posterior(d.images, clusters, clustering.k, labels)
        return calibration_by_time(
            router,
            d.images[rows],
            clusters[rows],
            exact,
            labels=None if labels is None else labels[rows],
            bins=5,
            seed=self.seed,
        )

    def student(self, teacher: Trained, budget: int, bar) -> tuple[torch.nn.Module, dict]:
        """A student of ``teacher`` for ``budget`` FLOPs of distillation, teacher passes included."""
        s = self.scale
        paths = [
            self.out / f"{teacher.partition}-k{teacher.k}" / "F" / f"expert-{i}.safetensors" for i in range(teacher.k)
        ]
        teacher_of = torch.from_numpy(teacher.clustering.labels_for(self.dataset.ids))
        ids = [sha256_of(p) for p in paths]

        def run(steps: int, folder: Path | None):
            return train_student(
                self.dataset,
                teacher_of,
                teacher.ensemble.experts,
                ids,
                self.recipe.expert_config(self.dataset),
                self.recipe.train_config(steps, seed_offset=2000),
                DEFAULT_DATA_WEIGHT,
                checkpoint_dir=folder,
                progress=bar if steps else False,
                description=f"student of {teacher.name}",
            )

        steps = max(1, budget // run(0, None).flops_per_step)
        started = time.perf_counter()
        result = run(steps, self.out / "work" / f"student-{teacher.partition}-k{teacher.k}")
        self.training_seconds += time.perf_counter() - started
        self.reused += result.resumed_from == steps
        images = self.dataset.images[:1024].to(s.device)
        gap = teacher_gap(result.model, teacher.ensemble.experts, images, teacher_of[:1024], TimeSampler(), self.seed)
        info = {
            "kind": "student",
            "k": teacher.k,
            "flops": result.flops,
            "steps": steps,
            "teacher_flops": teacher.flops,
            "teacher_mse": gap,
            "conditional": False,
        }
        return result.model.to(s.device), info

    # -- sampling and scoring --------------------------------------------------------------

    def noise(self, seed: int, n: int) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(10_000 + seed))

    def labels(self, seed: int, n: int) -> torch.Tensor:
        """Classes to sample a class-conditional model with: drawn from the data's class mix."""
        generator = torch.Generator().manual_seed(20_000 + seed)
        return torch.multinomial(self.class_freq, n, replacement=True, generator=generator)

    def evaluate(self, name: str, model, info: dict, ensemble: RoutedEnsemble | None = None) -> dict:
        """Fréchet distance, coverage and sampling cost of one model under every sampling seed."""
        key = json.dumps({"name": name, **info}, sort_keys=True)
        grid = self.out / "grids" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.png"
        if key in self.cached and grid.exists():
            row = self.cached[key]
            self.reused += 1
        else:
            s = self.scale
            fds, histograms, started = [], [], time.perf_counter()
            if ensemble is not None:
                ensemble.reset_counts()
            for seed in range(s.seeds):
                labels = self.labels(seed, s.samples) if info.get("conditional") else None
                images = generate(
                    model, s.samples, self.shape, s.sampling_steps, seed=10_000 + seed, device=s.device, labels=labels
                )
                fds.append(self.evaluator.frechet(images))
                histograms.append(self.evaluator.class_histogram(images))
                if seed == 0:
                    save_grid(images[:64].clamp(-1, 1), grid, columns=8)
            seconds = time.perf_counter() - started
            evals = sum(ensemble.expert_rows) / (s.samples * s.seeds * s.sampling_steps) if ensemble else 1.0
            probe = self.noise(99, 64).to(s.device)
            probe_labels = self.labels(99, 64) if info.get("conditional") else None
            sampler = model if isinstance(model, Sampler) else None
            with torch.no_grad():
                velocity = sampler(64, probe_labels, torch.Generator().manual_seed(0)) if sampler else model
                flops = count_flops(lambda: integrate(velocity, probe, s.sampling_steps, y=probe_labels)) / 64
            share = np.mean(histograms, axis=0)
            real = self.evaluator.real_histogram
            row = {
                **info,
                "fd": float(np.mean(fds)),
                "fd_std": float(np.std(fds)),
                "covered": int((share >= 0.5 * real).sum()),
                "rarest": float(share.min()),
                "evals": evals,
                "sampling_flops": flops,
                "seconds": seconds,
            }
            self.cached[key] = row
            with atomic_path(self.cache) as tmp:
                tmp.write_text(json.dumps(self.cached, indent=1))
        self.results[name] = row
        self.grids[name] = grid
        console.print(f"{name}: Fréchet distance {row['fd']:.1f} ± {row['fd_std']:.1f}")
        return row

    def evaluate_ddm(self, trained: Trained, routings=ROUTINGS, suffix: str = "") -> None:
        for routing in routings:
            if routing == "top2" and trained.k == 2:
                continue  # top-2 of two experts is the full ensemble
            info = {
                "kind": "ddm",
                "partition": trained.partition,
                "k": trained.k,
                "conditional": trained.conditional,
                "routing": routing,
                "flops": trained.flops,
                "expert_steps": trained.expert_steps,
                "router_steps": trained.router_steps,
            }
            name = f"{trained.name} {routing}{suffix}"
            self.evaluate(name, trained.ensemble.sampler(routing), info, trained.ensemble)

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> dict:
        s = self.scale
        self.out.mkdir(parents=True, exist_ok=True)
        self.evaluator = Evaluator.build(self.dataset, seed=self.seed, test=self.test)
        budget, per_step, router_step = self.budget()
        self.budget_f = budget
        third = budget // 3
        evidence: dict = {"budget": budget, "per_step": per_step, "router_step": router_step, "ddms": {}}
        trained: dict[tuple[str, int, bool], Trained] = {}
        with progress_bar() as bar:
            for conditional in (False, True):
                stages = (
                    (("F3", s.monolith_steps // 3), ("F", s.monolith_steps))
                    if not conditional
                    else (("F", s.monolith_steps),)
                )
                for stage, steps in stages:
                    model, info = self.monolith(stage, steps, conditional, bar)
                    self.evaluate(f"monolith{' cc' if conditional else ''} ({STAGES[stage]})", model, info)
            for k in s.ks if s.prefix_ddms else ():  # k-means DDMs at F/3 (the prefix of their F runs)
                t = self.ddm("kmeans2", k, "F3", third, False, bar)
                self.evaluate_ddm(t, ("ancestral", "top1"), " (F/3)")
            plan = [("kmeans2", k, False) for k in s.ks] + [("random", k, False) for k in s.random_ks]
            plan += [("kmeans2", k, True) for k in s.conditional_ks]
            for partition, k, conditional in plan:
                t = trained[partition, k, conditional] = self.ddm(partition, k, "F", budget, conditional, bar)
                routings = s.routings if partition == "kmeans2" else ("ancestral", "full", "top1")
                self.evaluate_ddm(t, routings)
            for k in s.exact_ks:  # the k-means experts routed by the training set's exact posterior
                for conditional in (False, True):
                    if ("kmeans2", k, conditional) not in trained:
                        continue
                    t = trained["kmeans2", k, conditional]
                    clusters = torch.from_numpy(t.clustering.labels_for(self.dataset.ids))
                    labels = self.dataset.labels if conditional else None
                    exact = RoutedEnsemble(
                        t.ensemble.experts,
                        empirical_posterior(self.dataset.images, clusters, k, labels),
                        t.ensemble.prior,
                        t.ensemble.class_prior,
                        router_takes_labels=conditional,
                    )
                    for routing in ("full", "top1"):
                        info = {"kind": "exact", "partition": "kmeans2", "k": k, "routing": routing}
                        info.update(flops=t.flops, conditional=conditional)
                        name = f"{t.name} {routing}, exact posterior"
                        self.evaluate(name, exact.sampler(routing), info, exact)
            teacher = trained["kmeans2", s.distill_k, False]
            model, info = self.student(teacher, third, bar)
            self.evaluate(f"student of kmeans2 K={teacher.k} (F/3)", model, info)
        for t in trained.values():
            sizes = t.clustering.sizes
            evidence["ddms"][t.name] = {
                "sizes": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
                "expert_steps": t.expert_steps,
                "router_steps": t.router_steps,
                "epochs": [t.expert_steps * s.batch_size / int(n) for n in (sizes.max(), sizes.min())],
                "router_flops_share": t.router_flops / t.flops,
                "flops": t.flops,
                "calibration": t.calibration,
                "chance": float(sizes.max() / sizes.sum()),
            }
        evidence["n"] = len(self.dataset)
        evidence["monolith_epochs"] = s.monolith_steps * s.batch_size / len(self.dataset)
        evidence["floor"] = self.evaluator.real_vs_real(seed=self.seed)
        evidence["feature_accuracy"] = self.evaluator.held_out_accuracy
        evidence["feature_accuracy_on"] = "the 10,000-image test set" if self.test is not None else "a held-out 15%"
        return evidence


# -- the report ----------------------------------------------------------------------------------


def compare(a: dict, b: dict) -> str:
    """'better', 'worse' or 'tied' for a against b (lower Fréchet distance is better), beyond
    the seed-to-seed noise: the larger of the two standard deviations."""
    gap = b["fd"] - a["fd"]
    margin = max(a["fd_std"], b["fd_std"])
    return "better" if gap > margin else "worse" if -gap > margin else "tied"


def fd(row: dict) -> str:
    return f"{row['fd']:.1f} ± {row['fd_std']:.1f}"


def accuracy(d: dict) -> str:
    cells = ", ".join(f"t={c['t']:.1f} {c['accuracy']:.0%}" for c in d["calibration"])
    return f"{cells} (chance {d['chance']:.0%})"


def kl(d: dict) -> str:
    return ", ".join(f"t={c['t']:.1f} {c['kl']:.2f}" for c in d["calibration"])


def per_k(outcomes: dict, good=("better",), bad=("worse",)) -> str:
    if all(o in good for o in outcomes.values()):
        return "**holds**"
    if all(o in bad for o in outcomes.values()):
        return "**does not hold**"
    held = [f"K={k}" for k, o in outcomes.items() if o in good]
    failed = [f"K={k}" for k, o in outcomes.items() if o in bad]
    parts = [f"holds at {', '.join(held)}"] if held else []
    parts += [f"does not hold at {', '.join(failed)}"] if failed else []
    if not parts:
        return "**not settled** (within seed noise)"
    rest = " (the rest within seed noise)" if len(held) + len(failed) < len(outcomes) else ""
    return "**" + "; ".join(parts) + "**" + rest


def claims(r: dict, ev: dict, scale: Scale) -> tuple[list[str], list[str]]:
    """Each claim with its verdict and evidence; then, for those that do not hold, the most
    likely reason, chosen by the evidence."""
    mono, ks = r["monolith (F)"], scale.ks
    lines, notes = [], []

    def best(name: str) -> tuple[str, dict]:
        rows = [(ro, r[f"{name} {ro}"]) for ro in ROUTINGS if f"{name} {ro}" in r]
        return min(rows, key=lambda x: x[1]["fd"])

    def cost(row: dict) -> str:
        return f"{row['sampling_flops'] / 1e9:.3f} GFLOP/image"

    # 1. The best DDM against the monolith at equal FLOPs, unconditional and class-conditional.
    outcomes = {k: compare(best(f"kmeans2 K={k}")[1], mono) for k in ks}
    cells = [f"K={k} {best(f'kmeans2 K={k}')[0]} {fd(best(f'kmeans2 K={k}')[1])} ({o})" for k, o in outcomes.items()]
    text = (
        "1. **A DDM beats a monolith trained with the same FLOPs** (paper: top-1 FID 9.84 against 12.81). "
        f"Unconditional: {per_k(outcomes)}. Monolith at F: {fd(mono)}; the best routing of each k-means DDM at "
        f"F, router included: {'; '.join(cells)}."
    )
    cc_outcomes = {}
    if scale.conditional_ks:
        mono_cc = r["monolith cc (F)"]
        cc_outcomes = {k: compare(best(f"kmeans2 K={k} cc")[1], mono_cc) for k in scale.conditional_ks}
        cc_cells = [
            f"K={k} {best(f'kmeans2 K={k} cc')[0]} {fd(best(f'kmeans2 K={k} cc')[1])} ({o})"
            for k, o in cc_outcomes.items()
        ]
        text += (
            f" Class-conditional (experts and router see the label, sampled at the data's class mix, no guidance): "
            f"{per_k(cc_outcomes)}. Class-conditional monolith at F: {fd(mono_cc)}; {'; '.join(cc_cells)}."
        )
    lines.append(text)
    if "better" not in outcomes.values():
        k = min(ks, key=lambda k: best(f"kmeans2 K={k}")[1]["fd"])
        d = ev["ddms"][f"kmeans2 K={k}"]
        routing, row = best(f"kmeans2 K={k}")
        evidence = (
            f"at K={k} (the best DDM here, {routing}) each expert trains {d['expert_steps']} steps on "
            f"{d['sizes'][0]}-{d['sizes'][2]} images ({d['epochs'][0]:.1f}-{d['epochs'][1]:.1f} passes over its "
            f"cluster, against {ev['monolith_epochs']:.1f} passes over all {ev['n']} images for the monolith), at "
            f"the monolith's batch of {scale.batch_size} and size; the router takes {d['router_flops_share']:.1%} "
            f"of the budget"
        )
        exact_key = f"kmeans2 K={k} full, exact posterior"
        if exact_key in r:
            evidence += f"; mixed by the training set's exact posterior the same experts score {fd(r[exact_key])}"
        anc = r.get(f"kmeans2 K={k} ancestral")
        if routing == "ancestral" or (anc is not None and compare(anc, row) != "worse"):
            reason = (
                "the experts themselves: ancestral routing is exact in distribution for exact experts and needs "
                "no router, so what is left of the gap is each expert's own error on its cluster, trained with "
                "1/K of the FLOPs on 1/K of the data by a model of the monolith's size"
            )
        else:
            reason = "the routing: the experts' best use here is not the router-free one"
        notes.append(f"Claim 1, most likely {reason}. Evidence: {evidence}.")

    # 2. Top-1 against the full ensemble (the paper's routing).
    outcomes = {k: compare(r[f"kmeans2 K={k} top1"], r[f"kmeans2 K={k} full"]) for k in ks}
    cells = [
        f"K={k}: top-1 {fd(r[f'kmeans2 K={k} top1'])} at {cost(r[f'kmeans2 K={k} top1'])}, full "
        f"{fd(r[f'kmeans2 K={k} full'])} at {cost(r[f'kmeans2 K={k} full'])} ({o})"
        for k, o in outcomes.items()
    ]
    lines.append(
        "2. **Per-step top-1 routing is as good as the full ensemble, at a fraction of the sampling cost** "
        "(paper: top-1 9.84 at 334 GFLOPs, top-2 10.31 at 642, full 10.52 at 2490). Unconditional: "
        f"{per_k(outcomes, good=('better', 'tied'))}. " + "; ".join(cells) + "."
    )
    if "worse" in outcomes.values():
        k = next(k for k, o in outcomes.items() if o == "worse")
        d = ev["ddms"][f"kmeans2 K={k}"]
        exact, exact_full = r.get(f"kmeans2 K={k} top1, exact posterior"), r.get(f"kmeans2 K={k} full, exact posterior")
        evidence = f"router accuracy {accuracy(d)}; KL(exact posterior || router) in nats {kl(d)}"
        if exact is not None and compare(exact, exact_full) == "worse":
            reason = (
                "switching experts along a trajectory: with the exact posterior too, top-1 loses to the full "
                "mixture. At t near 0 the posterior is the prior, so every sample goes to the largest cluster "
                "and is handed to other experts later, in states they never saw"
            )
            evidence = f"with the exact posterior top-1 {fd(exact)} and full {fd(exact_full)}; " + evidence
        else:
            reason = "the router's mistakes"
        notes.append(f"Claim 2 at K={k}, most likely {reason}. Evidence: {evidence}.")

    # 3. Ancestral routing: one expert per sample, drawn from the cluster shares.
    outcomes = {k: compare(r[f"kmeans2 K={k} ancestral"], r[f"kmeans2 K={k} full"]) for k in ks}
    cells = [
        f"K={k}: ancestral {fd(r[f'kmeans2 K={k} ancestral'])} at {cost(r[f'kmeans2 K={k} ancestral'])}, full "
        f"{fd(r[f'kmeans2 K={k} full'])} at {cost(r[f'kmeans2 K={k} full'])} ({o})"
        for k, o in outcomes.items()
    ]
    for k in scale.conditional_ks:
        a, f_ = r[f"kmeans2 K={k} cc ancestral"], r[f"kmeans2 K={k} cc full"]
        cells.append(f"class-conditional K={k}: ancestral from p(k | y) {fd(a)}, full {fd(f_)} ({compare(a, f_)})")
    lines.append(
        "3. **Ancestral routing (the expert drawn once per sample from the cluster shares, run alone, no router) "
        "is within the seed noise of full routing or better, at about 1/K of its cost** (the paper's Oracle row: "
        f"10.46 against full 10.52). {per_k(outcomes, good=('better', 'tied'))}. " + "; ".join(cells) + "."
    )

    # 4. Feature clustering against a random partition.
    rks = [k for k in scale.random_ks if k in ks]
    outcomes = {k: compare(best(f"kmeans2 K={k}")[1], best(f"random K={k}")[1]) for k in rks}
    cells = [
        f"K={k}: k-means {fd(best(f'kmeans2 K={k}')[1])} ({best(f'kmeans2 K={k}')[0]}), random "
        f"{fd(best(f'random K={k}')[1])} ({best(f'random K={k}')[0]}) ({o})"
        for k, o in outcomes.items()
    ]
    lines.append(
        "4. **Feature clustering beats a random partition** (best routing of each). "
        f"{per_k(outcomes)}. " + "; ".join(cells) + "."
    )
    if rks and "better" not in outcomes.values():
        k = max(rks)
        km, rnd = ev["ddms"][f"kmeans2 K={k}"], ev["ddms"][f"random K={k}"]
        notes.append(
            "Claim 4, most likely the size of the data: a random partition gives each expert an unbiased sample "
            "of the whole distribution, so each random expert is a small monolith, while k-means experts "
            "specialise on clusters too small to gain from it. Evidence: at K="
            f"{k} the k-means router is right at {accuracy(km)}, the random one at {accuracy(rnd)}; k-means "
            f"clusters hold {km['sizes'][0]}-{km['sizes'][2]} images."
        )

    # 5. More experts: 8 against 4.
    if len(ks) > 1:
        big, mid = max(ks), sorted(ks)[-2]
        outcome = compare(best(f"kmeans2 K={big}")[1], best(f"kmeans2 K={mid}")[1])
        cells = [f"K={k}: {fd(best(f'kmeans2 K={k}')[1])} ({best(f'kmeans2 K={k}')[0]})" for k in ks]
        lines.append(
            f"5. **{big} experts beat {mid}** (paper: 8 beat 4 and 16; K=16 is not run here, its clusters would "
            f"hold about {ev['n'] // 16} images). {per_k({big: outcome})}. The best routing of each k-means DDM "
            "at F: " + "; ".join(cells) + "."
        )
        if outcome != "better":
            d_big, d_mid = ev["ddms"][f"kmeans2 K={big}"], ev["ddms"][f"kmeans2 K={mid}"]
            notes.append(
                f"Claim 5, most likely too few steps per expert at equal FLOPs: each of {big} experts trains "
                f"{d_big['expert_steps']} steps on {d_big['sizes'][0]}-{d_big['sizes'][2]} images, against "
                f"{d_mid['expert_steps']} steps on {d_mid['sizes'][0]}-{d_mid['sizes'][2]} for K={mid}, at the "
                f"same per-expert batch of {scale.batch_size} and the same model size."
            )

    # 6. Class-conditional routing: does per-step top-1 stop collapsing?
    if scale.conditional_ks:
        outcomes = {k: compare(r[f"kmeans2 K={k} cc top1"], r[f"kmeans2 K={k} cc full"]) for k in scale.conditional_ks}
        cells = []
        for k in scale.conditional_ks:
            d = ev["ddms"][f"kmeans2 K={k} cc"]
            cells.append(
                f"K={k}: top-1 {fd(r[f'kmeans2 K={k} cc top1'])}, full {fd(r[f'kmeans2 K={k} cc full'])}, "
                f"ancestral {fd(r[f'kmeans2 K={k} cc ancestral'])} (unconditional top-1 "
                f"{fd(r[f'kmeans2 K={k} top1']) if f'kmeans2 K={k} top1' in r else '-'}); router accuracy "
                f"{accuracy(d)}"
            )
        lines.append(
            "6. **With a class-conditional router (the paper's setting) per-step top-1 stops collapsing** (top-1 "
            f"within noise of full, or better). {per_k(outcomes, good=('better', 'tied'))}. " + "; ".join(cells) + "."
        )
        if "worse" in outcomes.values():
            k = next(k for k, o in outcomes.items() if o == "worse")
            exact = r.get(f"kmeans2 K={k} cc top1, exact posterior")
            extra = f" With the exact class-conditional posterior top-1 scores {fd(exact)}." if exact else ""
            notes.append(
                f"Claim 6 at K={k}, most likely the label does not name the cluster: k-means clusters cut across "
                f"classes, so p(k | y, x_t) near t = 0 is still spread over several experts and top-1 still hands "
                f"samples between them.{extra} Its KL to the exact posterior by t: "
                f"{kl(ev['ddms'][f'kmeans2 K={k} cc'])} nats."
            )

    # 7. Distillation.
    name = next(n for n, v in r.items() if v["kind"] == "student")
    student, small = r[name], r["monolith (F/3)"]
    teacher_name, teacher = best(f"kmeans2 K={student['k']}")
    outcome = compare(student, mono)
    lines.append(
        "7. **A student distilled from the DDM matches a monolith trained from scratch, at a third of the FLOPs.** "
        f"{per_k({student['k']: outcome}, good=('better', 'tied'))}. The student of the K={student['k']} k-means "
        f"DDM, {student['flops'] / 1e12:.3f} TFLOP of distillation (teacher passes included; its teachers cost "
        f"{student['teacher_flops'] / 1e12:.3f}): {fd(student)}; the monolith at F ({mono['flops'] / 1e12:.3f} "
        f"TFLOP): {fd(mono)}; at F/3: {fd(small)}; the teacher ensemble ({teacher_name}): {fd(teacher)}."
    )
    if outcome == "worse":
        if compare(teacher, mono) == "worse":
            reason = "its teachers: the student learns the ensemble, and the ensemble itself loses to the monolith"
        else:
            reason = "too short a distillation: the student does not yet follow teachers that are good enough"
        notes.append(
            f"Claim 7, most likely {reason}. Evidence: teacher ensemble {fd(teacher)} against the monolith's "
            f"{fd(mono)}; student {fd(student)}, with a mean squared velocity gap to its teachers of "
            f"{student['teacher_mse']:.3f} after {student['steps']} steps."
        )
    return lines, notes


def plots(r: dict, grids: dict, report: Path, title: str) -> dict[str, Path]:
    stem = report.with_suffix("")
    paths = {k: Path(f"{stem}-{k}.png") for k in ("fd_vs_flops", "fd_by_routing", "samples")}
    ks = sorted({v["k"] for v in r.values() if v["kind"] == "ddm"})

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mono = sorted((v for v in r.values() if v["kind"] == "monolith" and not v["conditional"]), key=lambda v: v["flops"])
    ax.errorbar(
        [v["flops"] / 1e12 for v in mono],
        [v["fd"] for v in mono],
        [v["fd_std"] for v in mono],
        fmt="k-o",
        label="monolith",
    )
    for k in ks:
        pts = [
            v
            for v in r.values()
            if v["kind"] == "ddm" and v["k"] == k and v["routing"] == "ancestral" and not v["conditional"]
        ]
        km = sorted((v for v in pts if v["partition"] == "kmeans2"), key=lambda v: v["flops"])
        ax.errorbar(
            [v["flops"] / 1e12 for v in km],
            [v["fd"] for v in km],
            [v["fd_std"] for v in km],
            fmt="-s",
            label=f"DDM K={k}, k-means, ancestral",
        )
        rnd = [v for v in pts if v["partition"] == "random"]
        ax.scatter(
            [v["flops"] / 1e12 for v in rnd], [v["fd"] for v in rnd], marker="x", label=f"K={k}, random, ancestral"
        )
    for v in r.values():
        if v["kind"] == "student":
            ax.scatter([v["flops"] / 1e12], [v["fd"]], marker="*", s=150, c="red", label="student (its own FLOPs)")
    ax.set_xlabel("training FLOPs (TFLOP)")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["fd_vs_flops"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(ROUTINGS)
    groups = sorted(
        {(v["partition"], v["k"], v["conditional"]) for v in r.values() if v["kind"] == "ddm" and "F/3" not in str(v)},
        key=lambda g: (g[2], g[0], g[1]),
    )
    groups = [g for g in groups if any(f"{g[0]} K={g[1]}{' cc' if g[2] else ''} {ro}" in r for ro in ROUTINGS)]
    for i, routing in enumerate(ROUTINGS):
        rows = [(j, r.get(f"{p} K={k}{' cc' if c else ''} {routing}")) for j, (p, k, c) in enumerate(groups)]
        rows = [(j, row) for j, row in rows if row is not None]
        ax.bar(
            [j + (i - 1.5) * width for j, _ in rows],
            [row["fd"] for _, row in rows],
            width,
            yerr=[row["fd_std"] for _, row in rows],
            label=routing,
        )
    ax.axhline(r["monolith (F)"]["fd"], color="k", linestyle="--", label="monolith (F)")
    if "monolith cc (F)" in r:
        ax.axhline(r["monolith cc (F)"]["fd"], color="grey", linestyle=":", label="monolith cc (F)")
    labels = [f"{'k-means' if p == 'kmeans2' else 'random'}\nK={k}{' cc' if c else ''}" for p, k, c in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Fréchet distance by routing, every DDM at budget F (cc: class-conditional)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["fd_by_routing"], dpi=120)
    plt.close(fig)

    shown = ["monolith (F)", *(f"kmeans2 K={k} ancestral" for k in ks), f"kmeans2 K={ks[-1]} top1"]
    shown += [n for n in ("monolith cc (F)",) if n in r]
    shown += [n for n, v in r.items() if v["kind"] == "student"]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 2.9))
    for ax, name in zip(np.atleast_1d(axes), shown, strict=True):
        with Image.open(grids[name]) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_title(f"{name}\nFD {r[name]['fd']:.1f}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(paths["samples"], dpi=120)
    plt.close(fig)
    return paths


DESCRIPTIONS = {
    "digits": "scikit-learn's {n} handwritten digits",
    "fashion-mnist": "Fashion-MNIST's {n} training photographs (Zalando, 10 classes of clothing)",
}


def write_report(args, bench: Bench, evidence: dict, seconds: float, report: Path) -> None:
    s, r = bench.scale, bench.results
    shape = f"{bench.shape[1]}x{bench.shape[2]}"
    title = f"{bench.dataset_name} {shape}, {s.preset} DiT, budget F = {evidence['budget'] / 1e12:.2f} TFLOP"
    figures = plots(r, bench.grids, report, title)
    lines, notes = claims(r, evidence, s)

    table = [
        "| model | K | cc | routing | training TFLOP | sampling GFLOP / image | expert evals / step |"
        " Fréchet distance | classes covered | rarest class |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r.items():
        table.append(
            f"| {name} | {v.get('k', '-')} | {'yes' if v.get('conditional') else 'no'} | {v.get('routing', '-')} | "
            f"{v['flops'] / 1e12:.3f} | {v['sampling_flops'] / 1e9:.3f} | {v['evals']:.2f} | {fd(v)} | "
            f"{v['covered']}/10 | {v['rarest']:.1%} |"
        )
    ddm = [
        "| DDM at F | cluster sizes (min / median / max) | steps per expert | passes over its cluster | router steps |"
        " router share of FLOPs | router accuracy by t | KL(exact ‖ router) by t, nats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in evidence["ddms"].items():
        ddm.append(
            f"| {name} | {' / '.join(map(str, d['sizes']))} | {d['expert_steps']} | "
            f"{d['epochs'][0]:.1f}-{d['epochs'][1]:.1f} | {d['router_steps']} | {d['router_flops_share']:.1%} | "
            f"{accuracy(d)} | {kl(d)} |"
        )
    resumed = (
        f"; {bench.reused} trainings or evaluations were reused from an earlier invocation in `{bench.out}`, so "
        "this is not the time of a full run"
        if bench.reused
        else f", {bench.training_seconds / 60:.1f} of them training"
    )
    data = DESCRIPTIONS[bench.dataset_name].format(n=evidence["n"])
    text = [
        f"# The paper's claims, measured on ddm ({bench.dataset_name}, {bench.scale_name} scale)",
        "",
        f"Generated by `python bench/paper_claims.py --dataset {bench.dataset_name} --scale {bench.scale_name} "
        f"--seed {args.seed}` in {seconds / 60:.1f} minutes of wall time{resumed}.",
        "",
        f"Machine: {machine()}.",
        "",
        "## Setup",
        "",
        f"{data} at {shape}. Every model (experts, monolith, student) is the `{s.preset}` DiT with batch "
        f"{s.batch_size} and AdamW at {s.lr:g}, the same warmup and EMA; routers are the smaller `{s.router_preset}` "
        f"(as the paper's DiT-B/2 router beside DiT-XL/2 experts) at {bench.recipe.router_lr:g}, with a CLS-token "
        "head, conditioned on the label in class-conditional ensembles, warmed up over a tenth of their steps. "
        "The budget F is "
        f"{s.monolith_steps} monolith steps = {evidence['budget'] / 1e12:.3f} TFLOP (measured with "
        f"FlopCounterMode: {evidence['per_step'] / 1e9:.3f} GFLOP per DiT step, {evidence['router_step'] / 1e9:.3f} "
        f"per router step). Each DDM spends {s.router_share:.0%} of its budget on the router (the paper: about "
        "4%) and splits the rest evenly over its K experts, each trained on its own cluster only; the F/3 points "
        "are the first third of the same runs (constant learning rate after warmup). Class-conditional (cc) "
        "models train with 10% label dropout and are sampled at the data's class mix without guidance, the "
        "unconditional ones without labels. Routings: ancestral (one expert per sample drawn from the cluster "
        "shares, or from p(k | y) given the class, run alone), full, top-2 and top-1 (re-chosen at every step by "
        f"the router). The student learns from the K={s.distill_k} k-means DDM for F/3, its teachers' forward "
        f"passes counted, with data weight {DEFAULT_DATA_WEIGHT}. Sampling: {s.seeds} seeds of {s.samples} "
        f"images, {s.sampling_steps} Euler steps, the same noise for every model. Fréchet distance is measured "
        "in the features of a classifier trained on the training set (accuracy "
        f"{evidence['feature_accuracy']:.1%} on {evidence['feature_accuracy_on']}); real against real: "
        f"{evidence['floor']:.1f}. A class counts as covered when its share of the samples is at least half its "
        "share of the data. A model is better or worse than another only by more than the larger of their "
        "seed-to-seed standard deviations; otherwise they are tied. Router calibration: on "
        f"{CALIBRATION_IMAGES} training images noised at each t, the router's accuracy and the mean KL "
        "divergence from the exact posterior of the training set's empirical distribution to the router.",
        "",
        "## The claims",
        "",
        *lines,
        "",
    ]
    if notes:
        text += ["### Where a claim does not hold, or is not settled", "", *[f"- {n}" for n in notes], ""]
    text += [
        "## Every model",
        "",
        *table,
        "",
        "Sampling FLOPs are measured over a whole sampling run of 64 images, router included; expert evals per "
        "step count the rows dispatched to experts. The exact-posterior rows route the trained experts with "
        "the training set's exact p(cluster | x_t[, y]) instead of the trained router: a diagnostic that "
        "separates router error from expert error.",
        "",
        "## The DDMs",
        "",
        *ddm,
        "",
        "## Figures",
        "",
        *[f"![{k}]({p.name})" for k, p in figures.items()],
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(text))
    console.print(f"report: {report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--scale", choices=("smoke", "cpu", "gpu"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default bench/out/paper_claims/...)")
    parser.add_argument("--report", type=Path, default=None, help="default bench/reports/paper_claims-DATASET-SCALE.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.dataset][args.scale]
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --scale {args.scale} needs a CUDA device; use --scale cpu here")
    out = args.out or Path("bench/out/paper_claims") / f"{args.dataset}-{args.scale}-seed{args.seed}"
    # A smoke run checks the pipeline only: its report stays with its work files.
    default = (
        out / "report.md"
        if args.scale == "smoke"
        else Path(f"bench/reports/paper_claims-{args.dataset}-{args.scale}.md")
    )
    report = args.report or default
    started = time.perf_counter()
    try:
        bench = Bench(args.dataset, args.scale, scale, out, args.seed)
    except DDMError as exc:
        raise SystemExit(f"error: {exc}") from None
    evidence = bench.run()
    write_report(args, bench, evidence, time.perf_counter() - started, report)


if __name__ == "__main__":
    main()
