"""Sampling from a downloaded, verified ensemble."""

from __future__ import annotations

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

from .ensemble import load_verified


def sample_images(
    folder: Path,
    n: int,
    routing: str,
    steps: int,
    sampler: str = "euler",
    seed: int = 0,
    device: str = "cpu",
    fingerprint: str | None = None,
) -> torch.Tensor:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    ensemble, manifest = load_verified(folder, fingerprint, device)
    parse_routing(routing, len(ensemble))
    config = manifest["router"]["config"]
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    with progress_bar() as bar:
        task = bar.add_task(f"sampling ({routing})", total=n, info="")
        images = generate(
            ensemble.as_velocity(routing),
            n,
            shape,
            steps,
            sampler,
            seed=seed,
            device=device,
            on_batch=lambda b: bar.advance(task, b),
        )
    return images.clamp(-1.0, 1.0)  # the ODE may overshoot the image range slightly


def sample_folder(
    folder: Path,
    n: int,
    routing: str,
    steps: int,
    sampler: str,
    seed: int,
    device: str,
    fingerprint: str | None,
    out: Path,
    npz: Path | None = None,
) -> Path:
    images = sample_images(folder, n, routing, steps, sampler, seed, device, fingerprint)
    if npz is not None:
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images.numpy())
    return save_grid(images[:100], out)
