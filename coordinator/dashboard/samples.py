"""The dashboard's sample grid: when an ensemble is published, a background thread draws
GRID_SAMPLES samples of it (ancestral routing, the same seed every time) and writes them as
one PNG under HOME/work/samples, named by the manifest's sha256. A grid is drawn once per
published manifest: one that exists is not drawn again, after a restart either.

The ensemble is read back from the store and checked again (``coordinator.published``); a
latent ensemble's samples are decoded by the home's autoencoder."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

from ddm_model.ensemble import ANCESTRAL
from ddm_model.errors import DDMError
from ddm_model.grid import save_grid
from ddm_model.recipe import generate

from ..latents import home_autoencoder
from ..published import load_ensemble, verified_manifest
from ..server import Coordinator

log = logging.getLogger("ddm.coordinator.dashboard")
GRID_SAMPLES = 36
GRID_STEPS = 20  # Euler steps per sample
CHECK_EVERY_S = 2.0  # how often the thread looks for a new publication


class SampleGrids:
    def __init__(self, coordinator: Coordinator, every: float = CHECK_EVERY_S):
        """The grids of ``coordinator``'s publications: its home, registry, store and key."""
        c = coordinator
        self.home, self.config, self.registry, self.store, self.key = c.home, c.config, c.registry, c.store, c.key
        self.every = every
        self._failed: set[str] = set()  # manifests whose grid could not be drawn: not tried again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-samples", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.draw_latest()
            except Exception:
                log.exception("dashboard sample grid")
            self._stop.wait(self.every)

    def draw_latest(self) -> Path | None:
        """Draw the latest published ensemble's grid unless it exists; returns its path (None
        while nothing is published, or when drawing it failed)."""
        row = self.registry.latest_published()
        if row is None:
            return None
        sha = hashlib.sha256(row.manifest_json).hexdigest()
        path = self.home.samples / f"{sha}.png"
        if path.is_file() or sha in self._failed:
            return path if path.is_file() else None
        try:
            images = self._sample(row)
        except DDMError as exc:
            self._failed.add(sha)
            log.warning("no sample grid for ensemble %d: %s", row.id, exc)
            return None
        save_grid(images, path)
        log.info("drew the sample grid of ensemble %d (%s)", row.id, path.name)
        return path

    def _sample(self, row) -> torch.Tensor:
        manifest = verified_manifest(row, self.key)
        ensemble = load_ensemble(self.store, manifest)
        config = manifest.entries[0]["config"]
        shape = (config["in_channels"], config["image_size"], config["image_size"])
        with torch.inference_mode():
            images = generate(ensemble.sampler(ANCESTRAL), GRID_SAMPLES, shape, GRID_STEPS, seed=0)
            autoencoder = home_autoencoder(self.home, self.config)
            if autoencoder is not None:  # a latent ensemble's samples are latents
                images = autoencoder.decode(images)
        return images.clamp(-1.0, 1.0)
