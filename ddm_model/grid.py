"""Writing a batch of samples as one PNG grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fsutil import atomic_path


def save_grid(
    images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int | None = None, padding: int = 1
) -> Path:
    """Tile (N, C, H, W) images in [-1, 1] into a PNG; small images are enlarged (nearest)
    to about 32 pixels a side so they stay legible. Returns the path written."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = scale or max(1, 32 // max(h, w))
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    canvas = np.full((c, rows * (h + padding) + padding, columns * (w + padding) + padding), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[:, top : top + h, left : left + w] = pixels[i]
    image = Image.fromarray(canvas[0] if c == 1 else canvas.transpose(1, 2, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
