"""Diffusion Transformer (DiT) with adaLN-Zero blocks, the network of every expert.

The network maps (x_t, t, y) to a tensor of the image's shape and knows nothing of the
probability path: ``flow.py`` decides what that tensor means (a velocity).

Sizes come from one table, ``PRESETS``: ``tiny`` (tests), ``small`` (the CPU demo; ``small/4``
with patch 4 for 28x28 images on a CPU) and the
DiT paper's S, B, L and XL widths with patch 2, 4 or 8 (``"B/2"``, ``"XL/2"``, ...). A model is
rebuilt from its JSON config (``DiTConfig.to_dict`` / ``from_dict``) plus a safetensors file.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DDMError


@dataclass(frozen=True)
class Trunk:
    """Width, depth, heads and patch size of a transformer trunk."""

    hidden: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0


def _paper_presets() -> dict[str, Trunk]:
    widths = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    return {
        f"{name}/{patch}": Trunk(hidden, depth, heads, patch)
        for name, (hidden, depth, heads) in widths.items()
        for patch in (2, 4, 8)
    }


PRESETS: dict[str, Trunk] = {
    "tiny": Trunk(hidden=32, depth=2, heads=2, patch=2, mlp_ratio=2.0),
    "small": Trunk(hidden=64, depth=4, heads=4, patch=2),
    "small/4": Trunk(hidden=64, depth=4, heads=4, patch=4),  # 28x28 images on a CPU: 49 tokens
    **_paper_presets(),
}

# Bounds on the dataset-dependent fields, so that a config from a stranger cannot ask for an
# absurd allocation before any weight is read.
MAX_IMAGE_SIZE = 1024
MAX_CHANNELS = 16
MAX_CLASSES = 100_000


class ConfigError(DDMError, ValueError):
    """A model config that names an unknown preset or holds an invalid field."""


def trunk_for(preset: str) -> Trunk:
    try:
        return PRESETS[preset]
    except KeyError:
        known = ", ".join(PRESETS)
        raise ConfigError(f"unknown model preset {preset!r}; known presets: {known}") from None


def check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config field {name!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_geometry(preset: object, image_size: object, in_channels: object) -> Trunk:
    """Validate the fields every trunk config shares; return the preset's trunk."""
    if not isinstance(preset, str):
        raise ConfigError(f"config field 'preset' must be a string, got {preset!r}")
    trunk = trunk_for(preset)
    check_int("image_size", image_size, 1, MAX_IMAGE_SIZE)
    check_int("in_channels", in_channels, 1, MAX_CHANNELS)
    if image_size % trunk.patch:
        raise ConfigError(f"image_size {image_size} is not a multiple of preset {preset!r}'s patch {trunk.patch}")
    return trunk


def check_classes(num_classes: object, class_dropout: object) -> None:
    """Validate the class-conditioning fields experts and routers share."""
    check_int("num_classes", num_classes, 0, MAX_CLASSES)
    if isinstance(class_dropout, bool) or not isinstance(class_dropout, (int, float)) or not 0 <= class_dropout < 1:
        raise ConfigError(f"config field 'class_dropout' must be a number in [0, 1), got {class_dropout!r}")


class TrunkConfig:
    """JSON round trip shared by the expert and router configs (frozen dataclasses)."""

    what: ClassVar[str] = "model"

    @property
    def trunk(self) -> Trunk:
        return trunk_for(self.preset)

    def to_dict(self) -> dict:
        return {**asdict(self), **asdict(self.trunk)}

    @classmethod
    def from_dict(cls, data: object):
        """Rebuild from JSON, rejecting missing and unknown fields.

        Fields named after the trunk (hidden, depth, ...) must agree with the preset: they
        are stored so that a reader of the JSON sees the sizes, not so that they can differ.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.what} config must be a JSON object, got {type(data).__name__}")
        trunk_names = {f.name for f in fields(Trunk)}
        own = {f.name for f in fields(cls)}
        unknown = set(data) - own - trunk_names
        if unknown:
            names = ", ".join(repr(name)[:40] for name in sorted(unknown)[:12])  # a stranger's: one bounded line
            raise ConfigError(f"{cls.what} config has unknown fields: {names}")
        missing = {f.name for f in fields(cls) if f.name not in data and f.default is MISSING}
        if missing:
            raise ConfigError(f"{cls.what} config is missing fields: {', '.join(sorted(missing))}")
        cfg = cls(**{k: v for k, v in data.items() if k in own})
        trunk = asdict(cfg.trunk)
        for name in trunk_names & set(data):
            if data[name] != trunk[name]:
                raise ConfigError(
                    f"{cls.what} config says {name}={data[name]!r} but preset {cfg.preset!r} has {trunk[name]!r}"
                )
        return cfg


@dataclass(frozen=True)
class DiTConfig(TrunkConfig):
    """Everything needed to rebuild an expert network."""

    what: ClassVar[str] = "expert"

    preset: str
    image_size: int
    in_channels: int
    num_classes: int = 0  # 0: unconditional; else class labels 0..num_classes-1, and a null label
    class_dropout: float = 0.1  # probability of training with the null label (for CFG)

    def __post_init__(self):
        check_geometry(self.preset, self.image_size, self.in_channels)
        check_classes(self.num_classes, self.class_dropout)


# ---------------------------------------------------------------------------------------------
# Building blocks, shared with the router.


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (grid*grid, dim)."""
    if dim % 4:
        raise ConfigError(f"hidden size {dim} must be a multiple of 4 for 2D position embeddings")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (xx, yy):
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) tokens with fixed position embeddings."""

    def __init__(self, image_size: int, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.grid = image_size // patch
        self.register_buffer("pos", sincos_2d(hidden, self.grid).unsqueeze(0), persistent=False)
        nn.init.xavier_uniform_(self.proj.weight.view(hidden, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D, H / p, W / p) -> (B, T, D), where T = H * W / p ** 2, plus pos (1, T, D)
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D) through sinusoidal frequencies and an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (1000.0 * t.float()).unsqueeze(1) * freqs.unsqueeze(0)  # (B, freq_dim / 2)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1))  # (B, freq_dim) -> (B, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x (B, T, D); shift and scale (B, D), the same for every token
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, T, D)
        # (B, T, 3 * D) -> (3, B, heads, T, D / heads): q, k and v
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, T, D)


class Block(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        for module in (self.attn.qkv, self.attn.proj, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        nn.init.zeros_(self.adaLN[1].weight)  # the "Zero": every block starts as the identity
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, T, D) tokens, c (B, D) conditioning
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # (B, D) each
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, T, D)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, T, D)


# ---------------------------------------------------------------------------------------------


class Conditioned(nn.Module):
    """The conditioning the experts and the router share: c = t embedding, plus a class label's
    embedding when ``num_classes`` (index ``num_classes`` is the null label, used for
    classifier-free guidance and wherever no label is given)."""

    def _conditioning(self, hidden: int, num_classes: int) -> None:
        self.t_embed = TimestepEmbedder(hidden)
        self.num_classes = num_classes
        if num_classes:
            self.y_embed = nn.Embedding(num_classes + 1, hidden)
            nn.init.normal_(self.y_embed.weight, std=0.02)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """t (B,) times, y (B,) labels or None -> c (B, D)."""
        c = self.t_embed(t)  # (B, D)
        if self.num_classes:
            if y is None:
                y = torch.full((t.shape[0],), self.null_label, dtype=torch.long, device=t.device)  # (B,)
            c = c + self.y_embed(y)  # (B, D)
        return c


class DiT(Conditioned):
    """The expert network: v = DiT(x_t, t, y), same shape as x_t."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        trunk = config.trunk
        self.patch = trunk.patch
        self.channels = config.in_channels
        self.embed = PatchEmbed(config.image_size, config.in_channels, trunk.hidden, trunk.patch)
        self._conditioning(trunk.hidden, config.num_classes)
        self.blocks = nn.ModuleList(Block(trunk.hidden, trunk.heads, trunk.mlp_ratio) for _ in range(trunk.depth))
        self.final_norm = nn.LayerNorm(trunk.hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(trunk.hidden, 2 * trunk.hidden))
        self.out = nn.Linear(trunk.hidden, trunk.patch * trunk.patch * config.in_channels)
        for layer in (self.final_adaLN[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) images, t (B,) times in [0, 1], y (B,) class labels or None."""
        c = self.condition(t, y)  # (B, D)
        h = self.embed(x)  # (B, T, D), where T = H * W / patch ** 2
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)  # (B, D) each
        h = self.out(modulate(self.final_norm(h), shift, scale))  # (B, T, patch ** 2 * C)
        return self.unpatchify(h)  # (B, C, H, W)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, p ** 2 * C) patch tokens, row by row, -> (B, C, H, W), where H = W = p * sqrt(T)."""
        b, p, c = h.shape[0], self.patch, self.channels
        g = self.embed.grid  # patches per side, sqrt(T)
        # (B, g, g, p, p, C): patch row, patch column, row and column in the patch, channel
        h = h.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(b, c, g * p, g * p)  # (B, C, H, W)
