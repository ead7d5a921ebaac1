"""Sampling from a downloaded, verified ensemble: the routed experts, or the distilled student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddm_model.ensemble import parse_routing
from ddm_model.errors import UsageError
from ddm_model.flow import SAMPLERS
from ddm_model.fsutil import atomic_path
from ddm_model.grid import save_grid
from ddm_model.progress import progress_bar
from ddm_model.recipe import generate

from .ensemble import load_verified, load_verified_student

GRID_MAX = 100  # the PNG shows at most this many samples
MODELS = ("ensemble", "student")


@dataclass
class SampleOptions:
    n: int = 64
    routing: str = "top2"
    steps: int = 20
    sampler: str = "euler"
    seed: int = 0
    device: str = "cpu"
    model: str = "ensemble"  # the routed ensemble, or the dense student distilled from it


def sample_images(folder: Path, trusted: set[str], opts: SampleOptions) -> torch.Tensor:
    """Samples in [-1, 1] from an ensemble folder signed by one of the trusted keys."""
    if opts.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {opts.sampler!r}; use one of {', '.join(SAMPLERS)}")
    if opts.model not in MODELS:
        raise UsageError(f"unknown model {opts.model!r}; use one of {', '.join(MODELS)}")
    if opts.model == "student":
        velocity, manifest = load_verified_student(folder, trusted, opts.device)
        config, what = manifest["student"]["config"], "student"
    else:
        ensemble, manifest = load_verified(folder, trusted, opts.device)
        parse_routing(opts.routing, len(ensemble))
        velocity, config, what = ensemble.as_velocity(opts.routing), manifest["router"]["config"], opts.routing
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    with progress_bar() as bar:
        task = bar.add_task(f"sampling ({what})", total=opts.n, info="")
        images = generate(
            velocity,
            opts.n,
            shape,
            opts.steps,
            opts.sampler,
            seed=opts.seed,
            device=opts.device,
            on_batch=lambda b: bar.advance(task, b),
        )
    return images.clamp(-1.0, 1.0)  # the ODE may overshoot the image range slightly


def sample_to_files(folder: Path, trusted: set[str], opts: SampleOptions, png: Path, npz: Path | None) -> Path:
    images = sample_images(folder, trusted, opts)
    if npz is not None:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images.numpy())
    return save_grid(images[:GRID_MAX], png)
