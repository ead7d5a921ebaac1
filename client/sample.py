"""Sampling from a downloaded, verified ensemble: the routed experts, or the distilled student.

Routing defaults to ``ancestral``: one expert drawn per sample from the manifest's cluster
shares (from p(k | y) when sampling a class) and run alone for the whole trajectory, which
needs no router. For a class-conditional ensemble, ``class_label`` (``--class``) samples that
class, with classifier-free guidance of scale ``cfg`` (1.0: none); without it every sample is
drawn with the null label, unconditionally, so the samples follow the data's own class balance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddm_model.ensemble import ANCESTRAL, parse_routing
from ddm_model.errors import UsageError
from ddm_model.flow import SAMPLERS, guided
from ddm_model.fsutil import atomic_path
from ddm_model.grid import save_grid
from ddm_model.progress import progress_bar
from ddm_model.recipe import generate

from .ensemble import load_verified, load_verified_autoencoder, load_verified_student

GRID_MAX = 100  # the PNG shows at most this many samples
MODELS = ("ensemble", "student")


@dataclass
class SampleOptions:
    n: int = 64
    routing: str = ANCESTRAL
    steps: int = 20
    sampler: str = "euler"
    seed: int = 0
    device: str = "cpu"
    model: str = "ensemble"  # the routed ensemble, or the dense student distilled from it
    class_label: int | None = None  # every sample of this class (class-conditional models only)
    cfg: float = 1.0  # classifier-free guidance scale towards class_label; 1.0: none


def class_labels(opts: SampleOptions, num_classes: int) -> torch.Tensor | None:
    """The labels to sample: ``opts.class_label`` for every sample, or None (the null label)."""
    if not math.isfinite(opts.cfg) or opts.cfg < 0:
        raise UsageError(f"--cfg must be a finite number >= 0, got {opts.cfg}")
    if num_classes == 0:
        if opts.class_label is not None or opts.cfg != 1.0:
            raise UsageError("this model is unconditional: --class and --cfg need a class-conditional ensemble")
        return None
    if opts.class_label is None:
        if opts.cfg != 1.0:
            raise UsageError("--cfg guides the samples towards a class: give --class N too")
        return None
    if not 0 <= opts.class_label < num_classes:
        raise UsageError(f"--class {opts.class_label} is out of range: this model has classes 0 to {num_classes - 1}")
    return torch.full((opts.n,), opts.class_label, dtype=torch.int64)


def sample_images(folder: Path, trusted: set[str], opts: SampleOptions) -> torch.Tensor:
    """Samples in [-1, 1] from an ensemble folder signed by one of the trusted keys; a latent
    ensemble's are decoded by the autoencoder its manifest names."""
    if opts.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {opts.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if opts.model not in MODELS:
        raise UsageError(f"unknown model {opts.model!r}; use one of {', '.join(MODELS)}")
    if opts.model == "student":
        student, manifest = load_verified_student(folder, trusted, opts.device)
        config, what = manifest.student["config"], "student"
        num_classes = config.get("num_classes", 0)
        labels = class_labels(opts, num_classes)
        model = guided(student, opts.cfg, num_classes) if labels is not None else student
    else:
        ensemble, manifest = load_verified(folder, trusted, opts.device)
        parse_routing(opts.routing, len(ensemble))
        config, what = manifest.entries[0]["config"], opts.routing
        num_classes = config.get("num_classes", 0)
        labels = class_labels(opts, num_classes)
        if labels is not None and opts.cfg != 1.0:
            ensemble = ensemble.guided(opts.cfg, num_classes)
        model = ensemble.sampler(opts.routing)
    if labels is not None:
        what += f", class {opts.class_label}" + (f", cfg {opts.cfg:g}" if opts.cfg != 1.0 else "")
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    with progress_bar() as bar:
        task = bar.add_task(f"sampling ({what})", total=opts.n, info="")
        images = generate(
            model,
            opts.n,
            shape,
            opts.steps,
            opts.sampler,
            seed=opts.seed,
            device=opts.device,
            on_batch=lambda b: bar.advance(task, b),
            labels=labels,
        )
    autoencoder = load_verified_autoencoder(folder, manifest, opts.device)
    if autoencoder is not None:  # a latent ensemble: the samples are latents
        images = autoencoder.decode(images)
    return images.clamp(-1.0, 1.0)  # the ODE may overshoot the image range slightly


def sample_to_files(folder: Path, trusted: set[str], opts: SampleOptions, png: Path, npz: Path | None) -> Path:
    images = sample_images(folder, trusted, opts)
    if npz is not None:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images.numpy())
    return save_grid(images[:GRID_MAX], png)
