"""Feature extractors that turn images into vectors for clustering.

- ``pixels``: images downsampled by area averaging, flattened, then PCA. No weights needed.
- ``dinov2``: DINOv2's CLS embedding, loaded from a local Hugging Face-format folder
  (``config.json`` + ``model.safetensors``) with the optional ``transformers`` package.
  Nothing is ever downloaded: a missing folder or file is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DDMError


class FeatureError(DDMError, RuntimeError):
    """A feature extractor that cannot run as configured; the message says how to fix it."""


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) images in [-1, 1] -> (N, D) float features."""


class PixelFeatures:
    """Downsample to ``size`` x ``size`` (area average), flatten, PCA to ``components``."""

    name = "pixels"

    def __init__(self, size: int = 8, components: int = 32, seed: int = 0):
        self.size = size
        self.components = components
        self.seed = seed

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        from sklearn.decomposition import PCA

        small = F.adaptive_avg_pool2d(images.float(), min(self.size, images.shape[-1]))
        flat = small.flatten(1).numpy().astype(np.float64)
        components = min(self.components, flat.shape[0], flat.shape[1])
        return PCA(n_components=components, svd_solver="full", random_state=self.seed).fit_transform(flat)


class DinoV2Features:
    """DINOv2 CLS features from a local folder holding ``config.json`` and ``model.safetensors``."""

    name = "dinov2"

    def __init__(self, weights: str | Path | None, device: str = "cpu", batch_size: int = 64):
        if weights is None:
            raise FeatureError(
                "DINOv2 features need local weights: pass the path of a folder holding the model's"
                " config.json and model.safetensors (e.g. a copy of facebook/dinov2-small)"
            )
        folder = Path(weights)
        if not folder.is_dir():
            raise FeatureError(f"DINOv2 weights folder {folder} does not exist; nothing is downloaded at run time")
        for needed in ("config.json", "model.safetensors"):
            if not (folder / needed).is_file():
                raise FeatureError(f"DINOv2 weights folder {folder} has no {needed}")
        try:
            from transformers import AutoModel
        except ImportError:
            raise FeatureError(
                "DINOv2 features need the optional 'transformers' package: pip install 'ddm[dinov2]'"
            ) from None
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = (images[start : start + self.batch_size].float() + 1) / 2
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
            x = ((x - mean) / std).to(self.device)
            out.append(self.model(pixel_values=x).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out).numpy()


def make_extractor(name: str, weights: str | Path | None = None, seed: int = 0) -> FeatureExtractor:
    if name == "pixels":
        return PixelFeatures(seed=seed)
    if name == "dinov2":
        return DinoV2Features(weights)
    raise FeatureError(f"unknown feature extractor {name!r}; use 'pixels' or 'dinov2'")
