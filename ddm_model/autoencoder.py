"""Latent space: a diffusers ``AutoencoderKL`` that maps images to latents and back.

Experts of a latent home train on latents z = (mean(E(x)) - shift) * scale instead of pixels:
the encoder's posterior mean, so that a dataset's latents are a deterministic function of its
pixels and can be cached and fingerprinted like any dataset; ``decode`` inverts the scaling
and runs the decoder. Images go in and come out in [-1, 1]; grey images are repeated to the
autoencoder's three channels.

An autoencoder comes from a local diffusers folder (``config.json`` and
``diffusion_pytorch_model.safetensors``; nothing is ever downloaded) and travels as one
safetensors file of format ``ddm.autoencoder/1`` whose header holds its config and identity.
The identity is a sha256 over the config and every weight (name, dtype, shape, bytes), so it
names the autoencoder whatever file it came in; the signed manifest carries it, and every
reader checks the file it decodes with against it. diffusers is needed only to run one (the
``latent`` extra); the file format, the identity and the checks need only safetensors.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import ImageDataset, load_dataset_file, save_dataset_file
from .errors import DDMError
from .tensorfile import read_tensor_file, write_tensor_file

AUTOENCODER_FORMAT = "ddm.autoencoder/1"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
ENCODE_BATCH = 16  # images per encoder or decoder call: SD's VAE at 256 px needs a few GiB for 16
MAX_CONFIG_BYTES = 64 * 1024


class AutoencoderError(DDMError, ValueError):
    """An autoencoder that is missing, unreadable, not the one expected or not usable here."""


def _diffusers_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise AutoencoderError(
            "latent experts need diffusers, which is not installed: pip install 'ddm[latent]'"
        ) from None
    return AutoencoderKL


def identity_of(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical JSON config and every tensor, in name order."""
    h = hashlib.sha256(b"ddm-autoencoder-v1\0")
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Autoencoder:
    model: nn.Module  # diffusers AutoencoderKL, in eval mode
    config: dict  # its constructor's arguments, JSON
    identity: str

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def factor(self) -> int:
        """How many pixels one latent cell spans per side."""
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, S, S) of the latents of ``image_size`` square images."""
        if image_size % self.factor:
            raise AutoencoderError(
                f"{image_size}x{image_size} images do not fit this autoencoder, which downsamples by"
                f" {self.factor}: use an image size that is a multiple of {self.factor}"
            )
        return (self.latent_channels, image_size // self.factor, image_size // self.factor)

    def describe(self) -> dict:
        """What a manifest or a home's config says of it (with the file's sha256 and size added)."""
        return {
            "identity": self.identity,
            "class": "AutoencoderKL",
            "config": self.config,
            "factor": self.factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    def to(self, device: str | torch.device) -> Autoencoder:
        self.model.to(device)
        return self

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _rgb(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == self.in_channels:
            return images
        if images.shape[1] == 1:
            return images.expand(-1, self.in_channels, -1, -1)
        raise AutoencoderError(
            f"images have {images.shape[1]} channels; this autoencoder reads {self.in_channels} (or grey images)"
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = ENCODE_BATCH) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, latent C, H / f, W / f) float32 latents, on the CPU."""
        self.latent_shape(images.shape[-1])
        device, out = self._device(), []
        for start in range(0, images.shape[0], batch_size):
            x = self._rgb(images[start : start + batch_size]).to(device, torch.float32)
            mean = self.model.encode(x).latent_dist.mean
            out.append(((mean - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, *self.latent_shape(images.shape[-1]))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = ENCODE_BATCH) -> torch.Tensor:
        """Latents -> (N, C, H, W) images in [-1, 1], on the CPU."""
        device, out = self._device(), []
        for start in range(0, latents.shape[0], batch_size):
            z = latents[start : start + batch_size].to(device, torch.float32)
            x = self.model.decode(z / self.scaling_factor + self.shift_factor).sample
            out.append(x.float().clamp(-1.0, 1.0).cpu())
        return torch.cat(out)


def _constructor_config(config: dict) -> dict:
    """The config's constructor arguments only (no "_class_name", "_diffusers_version", ...), as JSON."""
    accepted = set(inspect.signature(_diffusers_class().__init__).parameters) - {"self"}
    kept = {k: v for k, v in config.items() if k in accepted}
    return json.loads(json.dumps(kept))  # tuples become lists, as a reader of the JSON gets them


def _build(config: dict, tensors: dict[str, torch.Tensor], identity: str, where: str) -> Autoencoder:
    cls = _diffusers_class()
    try:
        model = cls.from_config(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise AutoencoderError(f"{where}: its config does not build an AutoencoderKL ({exc})") from None
    model.requires_grad_(False)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise AutoencoderError(f"{where}: its weights do not fit its config ({first})") from None
    return Autoencoder(model.float().eval(), config, identity)


def read_folder(path: str | Path) -> Autoencoder:
    """A diffusers AutoencoderKL saved in a local folder (``save_pretrained``'s layout); no network."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise AutoencoderError(
            f"no autoencoder at {folder}: --latent needs a local folder holding a diffusers AutoencoderKL"
            " (config.json and diffusion_pytorch_model.safetensors); nothing is downloaded"
        )
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise AutoencoderError(
            f"{folder} has a config.json but no {WEIGHT_NAMES[0]}: ddm reads safetensors weights only"
        )
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AutoencoderError(f"{folder / 'config.json'} is not readable JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        found = raw.get("_class_name") if isinstance(raw, dict) else type(raw).__name__
        raise AutoencoderError(f"{folder} holds a {found}, not an AutoencoderKL")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach the Hub (read at import)
    cls = _diffusers_class()
    try:
        # from_pretrained also renames the keys of checkpoints saved by older diffusers versions.
        model = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            use_safetensors=True,
            low_cpu_mem_usage=False,
            variant="fp16" if "fp16" in weights.name else None,
        )
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AutoencoderError(f"cannot read the autoencoder in {folder}: {first}") from None
    config = _constructor_config(dict(model.config))
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    return _build(config, tensors, identity_of(config, tensors), str(folder))


def pack(autoencoder: Autoencoder, path: str | Path) -> None:
    """Write the autoencoder as one ``ddm.autoencoder/1`` file (the same autoencoder, the same bytes)."""
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in autoencoder.model.state_dict().items()}
    description = {"format": AUTOENCODER_FORMAT, "config": autoencoder.config, "identity": autoencoder.identity}
    write_tensor_file(path, tensors, description)


def _read_packed(path: str | Path, expect_identity: str | None) -> tuple[dict, dict[str, torch.Tensor], str]:
    description, tensors = read_tensor_file(path, AUTOENCODER_FORMAT, "autoencoder", AutoencoderError)
    config = description.get("config")
    if not isinstance(config, dict) or len(json.dumps(config)) > MAX_CONFIG_BYTES:
        raise AutoencoderError(f"{path}: the autoencoder's config is missing or not a JSON object")
    identity = identity_of(config, tensors)
    if identity != description.get("identity"):
        raise AutoencoderError(f"{path}: its weights and config do not match the identity in its header")
    if expect_identity is not None and identity != expect_identity:
        raise AutoencoderError(f"{path} holds autoencoder {identity[:16]}…, not the expected {expect_identity[:16]}…")
    return config, tensors, identity


def verify_packed(path: str | Path, expect_identity: str | None = None) -> str:
    """Check a packed autoencoder's identity (needs no diffusers); returns it."""
    return _read_packed(path, expect_identity)[2]


def load_packed(path: str | Path, expect_identity: str | None = None, device: str = "cpu") -> Autoencoder:
    config, tensors, identity = _read_packed(path, expect_identity)
    return _build(config, tensors, identity, str(path)).to(device)


def latent_dataset(
    dataset: ImageDataset, autoencoder: Autoencoder, cache_dir: str | Path | None = None
) -> ImageDataset:
    """``dataset`` encoded to latents: the same ids and labels, images replaced by latents.

    With ``cache_dir`` the latents are kept there as a dataset file named after the pixels'
    fingerprint and the autoencoder's identity, and read back (and checked against their own
    fingerprint) instead of encoding again."""
    name = f"{dataset.name}@latent"
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{dataset.fingerprint()}\0{autoencoder.identity}".encode()).hexdigest()
        cached = Path(cache_dir) / f"latents-{key[:32]}.safetensors"
        if cached.is_file():
            try:
                return load_dataset_file(cached)
            except DDMError:
                cached.unlink()  # damaged: encode again
    latents = autoencoder.encode(dataset.images)
    out = ImageDataset(latents, dataset.ids.clone(), dataset.labels, dataset.num_classes, name)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_dataset_file(out, cached)
    return out


def image_shape(description: dict, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The decoded images' (C, H, W), from a manifest's or config's description and the latents' shape."""
    factor = int(description.get("factor", 1))
    channels = int(description.get("config", {}).get("out_channels", 3))
    return (channels, latent_shape[1] * factor, latent_shape[2] * factor)
