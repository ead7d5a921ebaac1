"""A small diffusers AutoencoderKL with random weights, saved the way users get real ones
(``save_pretrained``: config.json + diffusion_pytorch_model.safetensors). Random weights are
enough for wiring: latents are still a fixed function of the pixels."""

from __future__ import annotations

from pathlib import Path

import torch


def save_small_autoencoder(folder: Path, seed: int = 0, latent_channels: int = 4, levels: int = 2) -> Path:
    """An AutoencoderKL that downsamples by 2 ** (levels - 1), written to ``folder``."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(8,) * levels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=16,
        )
    model.save_pretrained(folder)
    return Path(folder)
