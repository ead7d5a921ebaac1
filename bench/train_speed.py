"""Expert training speed against diffusers' DiT of the same size, and the sampling cost of a
routed ensemble against one expert. Prints the figures and writes a Markdown report and the raw
figures as JSON (train_speed-DEVICE.md and .json); asserts nothing.

    python bench/train_speed.py --device cuda                     # S/2 and B/2, 256 tokens, batch 256
    python bench/train_speed.py --device cuda --presets B/2 --modes bf16 --peak-tflops 989
    python bench/train_speed.py --device cpu --presets S/2 --tokens 64 --batch 16 --modes fp32,bf16
    python bench/train_speed.py --quick --out /tmp/speed          # CPU smoke: a few seconds

Training: for each preset and precision mode, ddm's own loop (``train.train_expert``, which runs
``train.fit``) and a loop here that does the same work per step with
``diffusers.DiTTransformer2DModel`` of the same width, depth, heads and patch: draw the batch,
drop labels, draw logit-normal times and noise, x_t = (1 - t) x_0 + t x_1, regress v = x_1 - x_0
with MSE, backward, clip the gradient, AdamW (fused on CUDA) and an EMA. Both train on the same
random latents (C x H x W, class labels) at the same batch, learning rate and schedule. Speed
is timed between log windows of ``--window`` steps, after ``--warmup-windows`` windows (start,
compilation and the FLOP count stay out); each window ends where the loop reads its mean loss
back, so the device has finished its work; with ``--rounds`` the two sides take turns, so that a
change in a shared machine's load falls on both. Precision modes: ``fp32``, ``fp32-tf32`` (TF32
matrix products), ``bf16`` (autocast) and any of them with ``-compile`` (torch.compile of the
model); TF32 and compile need CUDA (ddm's loop compiles on CUDA only).

FLOPs per training image are counted with ``flops.count_flops`` over one real forward and
backward of each model; MFU is FLOPs per image x images per second / the device's dense peak
(a table for H100, H200 and A100, or ``--peak-tflops``; on the CPU only with it).

Sampling: ``--experts`` randomly initialised experts of the first preset with a router
(``--router-preset``, its zero-initialised layers drawn at random and its bias centred, so that
it spreads samples), sampled with ``recipe.generate`` over ``--sample-steps`` Euler steps with
full, top-1 and ancestral (once-per-sample) routing, against one expert alone and against the
same expert run on K batches of 1/K (what running each expert on its share costs, without
routing); per precision of ``--modes`` (sampling runs uncompiled).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this script belongs to, before any installed copy

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.machine import describe, version  # noqa: E402
from ddm_model.data import ImageDataset  # noqa: E402
from ddm_model.dit import DiT, DiTConfig, trunk_for  # noqa: E402
from ddm_model.ensemble import RoutedEnsemble  # noqa: E402
from ddm_model.flops import count_flops  # noqa: E402
from ddm_model.flow import TimeSampler  # noqa: E402
from ddm_model.recipe import generate  # noqa: E402
from ddm_model.router import Router, RouterConfig  # noqa: E402
from ddm_model.train import TrainConfig, expert_objective, seeded, tf32_matmuls, train_expert  # noqa: E402

DEFAULTS = TrainConfig()  # warmup, gradient clip and EMA decay: the same for both loops
DATASET_SIZE = 1024  # random latents the batches are drawn from
FLOP_BATCH = 8  # FLOPs are counted on this many images at most (they grow linearly with the batch)
ROUTINGS = ("one expert", "one expert split", "full", "top1", "ancestral")  # split: K batches of 1/K
AIM_RATIO = 1.2  # at B/2, ddm's best precision mode trains at least this much faster than diffusers' best
AIM_PRESET = "B/2"
AIM_COST = 1.1  # top-1 and ancestral sampling cost at most this many times one expert

# Dense peak TFLOP/s (bf16, TF32, fp32) by a part of the device's name, first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 495.0, 67.0)),
    ("H200", (989.0, 495.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
)


@dataclass(frozen=True)
class Mode:
    name: str
    bf16: bool
    tf32: bool
    compile: bool

    @property
    def precision(self) -> str:
        """The mode without compilation (sampling runs uncompiled)."""
        return "bf16" if self.bf16 else "fp32-tf32" if self.tf32 else "fp32"

    @classmethod
    def parse(cls, name: str) -> Mode:
        base, *flags = name.split("-")
        if base not in ("fp32", "bf16") or not set(flags) <= {"tf32", "compile"} or len(set(flags)) != len(flags):
            raise ValueError(f"unknown mode {name!r}: fp32 or bf16, then -tf32 (fp32 only) and/or -compile")
        if base == "bf16" and "tf32" in flags:
            raise ValueError(f"mode {name!r}: TF32 goes with fp32")
        return cls(name, base == "bf16", "tf32" in flags, "compile" in flags)


# -- the machine ------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = describe(f"Python {platform.python_version()}, torch {version('torch')}, diffusers {version('diffusers')}")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = f"CUDA {torch.version.cuda} (torch build), driver {nvidia_driver()}"
    return info


def nvidia_driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def device_slug(info: dict, device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().removeprefix("nvidia")).strip("-")


def peak_tflops(info: dict, mode: Mode, override: float | None) -> float | None:
    if override is not None:
        return override
    for part, (bf16, tf32, fp32) in PEAK_TFLOPS:
        if part in info.get("gpu", ""):
            return bf16 if mode.bf16 else tf32 if mode.tf32 else fp32
    return None


class PeakMemory:
    """Peak memory of the timed steps: on CUDA the allocator's peak (weights, optimizer, EMA,
    activations); on Linux CPUs the process's peak RSS above its RSS when the cell began (the
    kernel's high-water mark, reset through /proc/self/clear_refs); else None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = 0 if self.cuda else self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) * 1024 if match else None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        high = self._status("VmHWM")
        return None if high is None or self.base is None else max(high - self.base, 0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last cell left, so that the next one's memory figure starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that RSS falls


# -- the models -------------------------------------------------------------------------------------


class DiffusersVelocity(nn.Module):
    """diffusers' DiT as v(x, t, y) with t in [0, 1]: its timestep embedding takes continuous
    times on the [0, 1000) scale (ddm's embeds 1000 t the same way)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, timestep=1000.0 * t, class_labels=y, return_dict=False)[0]


def diffusers_dit(cfg: DiTConfig) -> DiffusersVelocity:
    from diffusers import DiTTransformer2DModel

    trunk = cfg.trunk
    model = DiTTransformer2DModel(
        num_attention_heads=trunk.heads,
        attention_head_dim=trunk.hidden // trunk.heads,
        num_layers=trunk.depth,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,  # no learned sigma: flow matching predicts v alone
        sample_size=cfg.image_size,
        patch_size=trunk.patch,
        num_embeds_ada_norm=cfg.num_classes,
    )
    # Each block embeds t and y itself and, in training mode, drops labels on its own. The loop
    # drops labels once per sample, as ddm's does; the null label keeps its row in the tables.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return DiffusersVelocity(model)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conditioning_parameters(model: nn.Module) -> int:
    """Parameters of the t and class embedders: ddm has one pair, diffusers one per block."""
    if isinstance(model, DiffusersVelocity):
        return sum(parameters(block.norm1.emb) for block in model.model.transformer_blocks)
    return parameters(model.t_embed) + parameters(model.y_embed)


def diffusers_loss(
    forward: Callable, x1: torch.Tensor, y: torch.Tensor, generator: torch.Generator, cfg: DiTConfig
) -> torch.Tensor:
    """ddm's expert objective, written out: label dropout, logit-normal t, the straight path, MSE on v."""
    n, device = x1.shape[0], x1.device
    drop = torch.rand(n, generator=generator, device=device) < cfg.class_dropout
    y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)  # diffusers' null label is num_classes too
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    x0 = torch.randn(x1.shape, generator=generator, device=device, dtype=x1.dtype)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * x1
    return F.mse_loss(forward(xt, t, y).float(), (x1 - x0).float())


def random_latents(cfg: DiTConfig, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    shape = (DATASET_SIZE, cfg.in_channels, cfg.image_size, cfg.image_size)
    return ImageDataset(
        images=torch.randn(shape, generator=g),
        ids=torch.arange(DATASET_SIZE),
        labels=torch.randint(0, cfg.num_classes, (DATASET_SIZE,), generator=g),
        num_classes=cfg.num_classes,
        name="random latents",
    )


def gflop_per_image(cfg: DiTConfig, device: torch.device, batch: int, seed: int) -> dict[str, float]:
    """Measured FLOPs of one training forward + backward per image, for each side (in fp32)."""
    data = random_latents(cfg, seed)
    n = min(batch, FLOP_BATCH)
    x, y = data.images[:n].to(device), data.labels[:n].to(device)
    ddm_model = DiT(cfg).to(device)
    objective = expert_objective(cfg, TimeSampler())
    out = {}
    for side, model, loss in (
        ("ddm", ddm_model, lambda m, g: objective(m, x, y, g)),
        ("diffusers", diffusers_dit(cfg).to(device), lambda m, g: diffusers_loss(m, x, y, g, cfg)),
    ):
        g = torch.Generator(device=device).manual_seed(seed)
        out[side] = count_flops(lambda m=model, f=loss, g=g: f(m, g).backward()) / n / 1e9
    return out


# -- training ---------------------------------------------------------------------------------------


class Windows:
    """Times the log windows of a training loop: the first ``warmup`` are left out, and the peak
    memory is reset where the timed ones begin."""

    def __init__(self, warmup: int, memory: PeakMemory):
        self.warmup, self.memory = warmup, memory
        self.ends: list[float] = []
        self.losses: list[float] = []

    def close(self, loss: float) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(loss)
        if len(self.ends) == self.warmup:
            self.memory.reset()

    def figures(self, window: int, batch: int) -> dict:
        timed = self.ends[self.warmup - 1 :]
        spans = [b - a for a, b in itertools.pairwise(timed)]
        return {
            "images_per_s": window * batch * len(spans) / sum(spans),
            "images_per_step": batch,
            "window_images_per_s": [window * batch / s for s in spans],
            "timed_steps": window * len(spans),
            "timed_seconds": sum(spans),
            "final_loss": self.losses[-1],
            "peak_memory_bytes": self.memory.peak(),
        }


def train_ddm(cfg: DiTConfig, mode: Mode, args) -> dict:
    device = torch.device(args.device)
    data = random_latents(cfg, args.seed)
    memory = PeakMemory(device)
    windows = Windows(args.warmup_windows, memory)
    train = TrainConfig(
        steps=args.window * (args.warmup_windows + args.windows),
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        amp=mode.bf16,
        cpu_amp=mode.bf16,
        tf32=mode.tf32,
        compile=mode.compile,
        checkpoint_every=0,
        log_every=args.window,
    )
    result = train_expert(data, cfg, train, progress=False, on_progress=lambda step, loss, rate: windows.close(loss))
    figures = windows.figures(args.window, args.batch)
    figures["fit_gflop_per_image"] = result.flops_per_step / args.batch / 1e9  # fit's own count, full batch
    return figures


def train_diffusers(cfg: DiTConfig, mode: Mode, args) -> dict:
    """The per-step work of ddm's ``fit`` with diffusers' DiT: same draws, loss, optimizer, EMA."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    data = random_latents(cfg, args.seed)
    memory = PeakMemory(device)
    windows = Windows(args.warmup_windows, memory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = diffusers_dit(cfg).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    images, labels = data.images.to(device), data.labels.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), fused=cuda or None)
    forward = torch.compile(model) if mode.compile else model
    params, ema_params = list(model.parameters()), list(ema.parameters())
    window_loss = torch.zeros((), device=device)
    window_losses: list[torch.Tensor] = []
    with tf32_matmuls(mode.tf32):
        for step in range(args.window * (args.warmup_windows + args.windows)):
            index = torch.randint(0, images.shape[0], (args.batch,), generator=generator, device=device)
            x1, y = images[index], labels[index]
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(DEFAULTS.warmup, 1))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16):
                loss = diffusers_loss(forward, x1, y, generator, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, DEFAULTS.grad_clip)
            optimizer.step()
            with torch.no_grad():
                decay = min(DEFAULTS.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            loss = loss.detach()
            window_loss += loss
            window_losses.append(loss)
            if (step + 1) % args.window == 0:
                if not torch.isfinite(torch.stack(window_losses)).all():
                    raise RuntimeError(f"diffusers' loss became non-finite by step {step + 1}")
                windows.close((window_loss / args.window).item())
                window_loss.zero_()
                window_losses.clear()
    return windows.figures(args.window, args.batch)


def training_run(cfg: DiTConfig, mode: Mode, side: str, args) -> dict:
    device = torch.device(args.device)
    release(device)
    if mode.compile:
        torch._dynamo.reset()
    figures = (train_ddm if side == "ddm" else train_diffusers)(cfg, mode, args)
    release(device)
    print(f"  {cfg.preset} {mode.name:>14} {side:>9}: {figures['images_per_s']:9.1f} img/s", flush=True)
    return figures


def training_row(cfg: DiTConfig, mode: Mode, side: str, runs: list[dict], gflop: float, peak: float | None) -> dict:
    """One side's figures over its rounds: images over the timed seconds of all of them."""
    seconds = sum(r["timed_seconds"] for r in runs)
    steps = sum(r["timed_steps"] for r in runs)
    memory = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None]
    images_per_s = steps * runs[0]["images_per_step"] / seconds
    achieved = gflop * images_per_s / 1e3
    return {
        "preset": cfg.preset,
        "mode": mode.name,
        "side": side,
        "gflop_per_image": gflop,
        "images_per_s": images_per_s,
        "round_images_per_s": [r["images_per_s"] for r in runs],
        "window_images_per_s": [w for r in runs for w in r["window_images_per_s"]],
        "timed_steps": steps,
        "timed_seconds": seconds,
        "final_loss": runs[-1]["final_loss"],
        "fit_gflop_per_image": runs[-1].get("fit_gflop_per_image"),
        "peak_memory_bytes": max(memory) if memory else None,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": None if peak is None else achieved / peak,
    }


# -- sampling ---------------------------------------------------------------------------------------


def spread_router(router: Router, seed: int) -> Router:
    """A random-init router sends every sample to the same expert: its zero-initialised layers
    (adaLN, head) make its logits alike for all inputs. Drawing those at random and centring the
    head's bias on random latents makes it spread samples over the experts, as a trained router
    does over clusters of similar size."""
    cfg = router.config
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5 / math.sqrt(p.shape[1]))
        n = 256
        x = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=generator)
        y = torch.randint(0, max(cfg.num_classes, 1), (n,), generator=generator) if cfg.num_classes else None
        router.head.bias -= router(x, torch.rand(n, generator=generator), y).mean(dim=0)
    return router


def forward_gflop(model: nn.Module, cfg: DiTConfig, device: torch.device) -> float:
    """Measured GFLOP of one forward on one image."""
    x = torch.zeros((1, cfg.in_channels, cfg.image_size, cfg.image_size), device=device)
    t, y = torch.ones(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        return count_flops(lambda: model(x, t, y)) / 1e9


def sampling_rows(cfg: DiTConfig, mode: Mode, args) -> list[dict]:
    """Images per second of one expert and of each routing. The timed batches go round the
    routings in turn, so that a change in the machine's load falls on all of them alike."""
    device = torch.device(args.device)
    release(device)
    experts = [seeded(DiT, cfg, args.seed + k).to(device).eval() for k in range(args.experts)]
    router_cfg = RouterConfig(args.router_preset, cfg.image_size, cfg.in_channels, args.experts, cfg.num_classes)
    router = spread_router(seeded(Router, router_cfg, args.seed), args.seed).to(device).eval()
    ensemble = RoutedEnsemble(experts, router)
    samplers = {r: experts[0] if r.startswith("one expert") else ensemble.sampler(r) for r in ROUTINGS}
    gflop = {"expert": forward_gflop(experts[0], cfg, device), "router": forward_gflop(router, cfg, device)}
    shape, b = (cfg.in_channels, cfg.image_size, cfg.image_size), args.sample_batch
    labels = torch.randint(0, cfg.num_classes, (b * args.sample_batches,), generator=torch.Generator().manual_seed(0))
    seconds = dict.fromkeys(ROUTINGS, 0.0)
    rows_per_expert = {r: [0] * args.experts for r in ROUTINGS}

    def run(routing: str, batch: int, steps: int) -> None:
        y = labels[batch * b : (batch + 1) * b]
        chunk = -(-b // args.experts) if routing == "one expert split" else b
        generate(
            samplers[routing], b, shape, steps, seed=args.seed + batch, batch_size=chunk, device=args.device, labels=y
        )

    with tf32_matmuls(mode.tf32), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16):
        for routing in ROUTINGS:
            run(routing, 0, min(2, args.sample_steps))  # warm-up
        for batch in range(args.sample_batches):
            for routing in ROUTINGS:
                ensemble.reset_counts()
                synchronize(device)
                started = time.perf_counter()
                run(routing, batch, args.sample_steps)  # ends with the samples copied to the host
                seconds[routing] += time.perf_counter() - started
                rows_per_expert[routing] = [
                    a + c for a, c in zip(rows_per_expert[routing], ensemble.expert_rows, strict=True)
                ]
    n = b * args.sample_batches
    rows = []
    for routing in ROUTINGS:
        evaluations = sum(rows_per_expert[routing])
        rows.append(
            {
                "preset": cfg.preset,
                "router_preset": args.router_preset,
                "precision": mode.precision,
                "routing": routing,
                "images_per_s": n / seconds[routing],
                "cost_vs_one_expert": seconds[routing] / seconds["one expert"],
                "expert_evaluations_per_image_step": evaluations / n / args.sample_steps if evaluations else 1.0,
                "router_calls_per_step": 1 if routing in ("full", "top1") else 0,
                "expert_forward_gflop_per_image": gflop["expert"],
                "router_forward_gflop_per_image": gflop["router"],
                "rows_per_expert": [round(r / evaluations, 3) for r in rows_per_expert[routing]]
                if evaluations
                else None,
            }
        )
        print(
            f"  sampling {mode.precision:>9} {routing:>10}: {rows[-1]['images_per_s']:8.2f} img/s, "
            f"{rows[-1]['cost_vs_one_expert']:.2f}x one expert",
            flush=True,
        )
    return rows


# -- the report -------------------------------------------------------------------------------------


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def table_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def training_table(preset: str, figures: dict) -> str:
    params = figures["parameters"][preset]
    header = ["mode", "side", "parameters", "GFLOP/img", "img/s", "windows, img/s", "ddm/diffusers", "TFLOP/s", "MFU"]
    header.append("peak memory, MiB")
    rows = []
    for r in figures["training"]:
        if r["preset"] != preset:
            continue
        ratio = figures["ratios"].get(f"{preset} {r['mode']}")
        rows.append(
            [
                r["mode"],
                r["side"],
                f"{params[r['side']]['total'] / 1e6:.1f}M",
                f"{r['gflop_per_image']:.2f}",
                f"{r['images_per_s']:,.1f}",
                f"{min(r['window_images_per_s']):,.1f} to {max(r['window_images_per_s']):,.1f}",
                f"{ratio:.2f}" if r["side"] == "ddm" and ratio is not None else "",
                f"{r['achieved_tflops']:.3g}",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                mib(r["peak_memory_bytes"]),
            ]
        )
    return table_md(header, rows)


def sampling_table(rows: list[dict]) -> str:
    header = ["precision", "routing", "img/s", "cost vs one expert", "expert evals / img / step"]
    header += ["router calls / step", "rows per expert"]
    body = [
        [
            r["precision"],
            r["routing"],
            f"{r['images_per_s']:,.2f}",
            f"{r['cost_vs_one_expert']:.2f}x",
            f"{r['expert_evaluations_per_image_step']:.2f}",
            str(r["router_calls_per_step"]),
            "" if r["rows_per_expert"] is None else " / ".join(f"{100 * s:.0f}%" for s in r["rows_per_expert"]),
        ]
        for r in rows
    ]
    return table_md(header, body)


def router_line(rows: list[dict]) -> str:
    if not rows:
        return ""
    expert, router = rows[0]["expert_forward_gflop_per_image"], rows[0]["router_forward_gflop_per_image"]
    return (
        f"One router call costs {router:.3g} GFLOP per image, {100 * router / expert:.1f}% of an expert's "
        f"{expert:.3g} (measured, one forward)."
    )


def within_noise(figures: dict, preset: str, mode: str) -> bool:
    """Whether ddm's and diffusers' window speeds in one cell overlap."""
    ddm, diffusers = (
        r["window_images_per_s"] for r in figures["training"] if r["preset"] == preset and r["mode"] == mode
    )
    return max(ddm) >= min(diffusers) and max(diffusers) >= min(ddm)


def aims(figures: dict) -> list[dict]:
    cells = [(r["preset"], r["mode"]) for r in figures["training"] if r["side"] == "ddm"]
    ratios = {cell: figures["ratios"][f"{cell[0]} {cell[1]}"] for cell in cells}
    evidence = [
        f"{p} {m}: {v:.2f}x" + (" (the windows' ranges overlap)" if within_noise(figures, p, m) else "")
        for (p, m), v in ratios.items()
    ]
    aim = (
        f"ddm's expert training at least {AIM_RATIO:.1f}x diffusers' DiT at {AIM_PRESET}, each in its best"
        " precision mode, on the same device"
    )
    best = {}
    for side in ("ddm", "diffusers"):
        rows = [r for r in figures["training"] if r["side"] == side and r["preset"] == AIM_PRESET]
        if rows:
            top = max(rows, key=lambda r: r["images_per_s"])
            best[side] = (top["images_per_s"], top["mode"])
    if len(best) == 2:
        ratio = best["ddm"][0] / best["diffusers"][0]
        met = ratio >= AIM_RATIO
        found = f"{AIM_PRESET}: ddm {best['ddm'][1]} {best['ddm'][0]:,.0f} img/s against diffusers"
        found += f" {best['diffusers'][1]} {best['diffusers'][0]:,.0f} img/s, {ratio:.2f}x; every cell: "
        evidence = found + ", ".join(evidence)
    else:
        met = False
        evidence = f"{AIM_PRESET} not measured in this run; the cells measured: " + (", ".join(evidence) or "none")
    out = [{"aim": aim, "met": met, "evidence": evidence}]
    for routing in ("top1", "ancestral"):
        rows = [r for r in figures["sampling"] if r["routing"] == routing]
        out.append(
            {
                "aim": f"{routing} sampling within {AIM_COST}x the cost of one expert",
                "met": bool(rows) and all(r["cost_vs_one_expert"] <= AIM_COST for r in rows),
                "evidence": ", ".join(f"{r['precision']}: {r['cost_vs_one_expert']:.2f}x" for r in rows)
                or "not measured",
            }
        )
    return out


def reading(figures: dict) -> list[str]:
    """What the sampling rows add up to, per precision."""
    lines = []
    for precision in dict.fromkeys(r["precision"] for r in figures["sampling"]):
        rows = {r["routing"]: r for r in figures["sampling"] if r["precision"] == precision}
        split, top1, ancestral = (rows[k]["cost_vs_one_expert"] for k in ("one expert split", "top1", "ancestral"))
        share = rows["top1"]["router_forward_gflop_per_image"] / rows["top1"]["expert_forward_gflop_per_image"]
        lines.append(
            f"{precision}: running each expert on its share of the batch costs {split:.2f}x one expert; top-1 "
            f"({top1:.2f}x) adds the router ({100 * share:.1f}% of an expert's FLOPs at every step) and its "
            f"dispatch; ancestral routing ({ancestral:.2f}x) needs no router."
        )
    return lines


def write_report(figures: dict, out: Path, slug: str) -> Path:
    s, info = figures["settings"], figures["machine"]
    device = info.get("gpu", info["cpu"])
    load = figures["load"]
    lines = [
        f"# Expert training speed: ddm against diffusers' DiT, and routed sampling ({device})\n",
        f"Generated by `{figures['command']}` on {figures['date']}; the whole run took {figures['total_s']:.0f} s.\n",
        "**Interrupted** before the end: the tables hold the cells measured before.\n"
        if figures["interrupted"]
        else "",
        f"Machine: {info['cpu']}, {info['cores']}, {info['ram']} RAM, {info['os']}; {info['software']}"
        + (f"; GPU {info['gpu']}, {info['cuda']}" if "gpu" in info else "")
        + f". Load average at the start: {' '.join(f'{x:.2f}' for x in load['start'])}; at the end: "
        f"{' '.join(f'{x:.2f}' for x in load['end'])}; torch ran {s['torch_threads']} CPU thread(s).\n",
        f"Settings: presets {', '.join(s['presets'])}; {s['tokens']} tokens ("
        + ", ".join(f"{p}: {s['channels']}x{n}x{n} latents" for p, n in s["image_sizes"].items())
        + f"); batch {s['batch']}; {s['classes']} classes (label dropout 0.1); AdamW "
        f"lr {s['lr']:g} with ddm's default warmup ({DEFAULTS.warmup} steps), gradient clip {DEFAULTS.grad_clip}, "
        f"EMA {DEFAULTS.ema_decay}; each cell {s['warmup_windows']} warm-up window(s) then {s['windows']} timed "
        f"windows of {s['window']} steps, {s['rounds']} round(s) with the two sides taking turns; "
        f"device `{s['device']}`.\n",
        "Method: ddm is `train.train_expert` (its `fit` loop, timed at its log windows through `on_progress`); "
        "diffusers is `DiTTransformer2DModel` (out_channels = in_channels, no learned sigma; its per-block label "
        "dropout off, the loop drops labels once) in a loop here that does the same work per step: batch, label "
        "dropout, logit-normal t and noise, x_t, MSE on v = x_1 - x_0, backward, clip, AdamW (fused on CUDA), EMA "
        "lerp, and a read-back of the mean loss at the end of each window. img/s is the images of all timed windows "
        "(of all rounds) over their time. "
        f"GFLOP/img is `flops.count_flops` over one forward and backward (on {FLOP_BATCH} images at most; ddm's "
        "own `fit` count at the full batch agrees, see the JSON). MFU = GFLOP/img x img/s / the dense peak"
        + (f" ({figures['peak_note']})" if figures.get("peak_note") else "")
        + ". Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated` over the timed steps."
            if s["device"].startswith("cuda")
            else "the process's peak RSS over the timed steps above its RSS when the cell began."
        )
        + "\n",
        "## Parameters\n",
        table_md(
            ["preset", "ddm", "diffusers", "ddm without t/class embedders", "diffusers without them"],
            [
                [
                    p,
                    f"{v['ddm']['total']:,}",
                    f"{v['diffusers']['total']:,}",
                    f"{v['ddm']['trunk']:,}",
                    f"{v['diffusers']['trunk']:,}",
                ]
                for p, v in figures["parameters"].items()
            ],
        ),
        "",
        "diffusers' DiT gives every block its own timestep MLP and class table (one per block, plus the use of "
        "the first block's again at the output); ddm's embeds t and the class once for all blocks, as the DiT "
        "paper's does. Without those embedders the two are the same size, parameter for parameter.\n",
        "## Training\n",
    ]
    for preset in figures["flops_gflop_per_image"]:
        lines += [f"### {preset}\n", training_table(preset, figures), ""]
    lines += [
        "## Sampling\n",
        f"{s['experts']} randomly initialised {s['presets'][0]} experts and a class-conditional "
        f"{s['router_preset']} router (its zero-initialised layers drawn at random, so that it spreads samples), "
        f"`recipe.generate` at {s['sample_steps']} Euler steps, batches of {s['sample_batch']}, "
        f"{s['sample_batches']} timed batch(es) each, taken in turn over the routings after a warm-up; random class "
        "labels; uniform cluster shares (ancestral routing draws the expert of each sample from them). Cost = the "
        "row's time / one expert's. 'one expert split' is the one expert run on "
        f"{s['experts']} batches of 1/{s['experts']} the size: what running each expert on its share of the batch "
        "costs, without any routing. " + router_line(figures["sampling"]) + "\n",
        sampling_table(figures["sampling"]),
        "",
        *[f"- {line}" for line in reading(figures)],
        "",
        "## Aims\n",
        *[f"- {a['aim']}: **{'met' if a['met'] else 'not met'}** ({a['evidence']})" for a in figures["aims"]],
        "",
    ]
    if s.get("notes"):
        lines += [s["notes"], ""]
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"train_speed-{slug}.md"
    report.write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n")  # no run of blank lines
    (out / f"train_speed-{slug}.json").write_text(json.dumps(figures, indent=1))
    return report


# -- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="S/2 B/2", help="expert presets, space or comma separated")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per image (a square number)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (SD-VAE: 4)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--modes", default="fp32-tf32,bf16,bf16-compile", help="fp32, fp32-tf32, bf16, ...-compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--window", type=int, default=5, help="steps per timing window (the loops' log window)")
    parser.add_argument("--warmup-windows", type=int, default=2, help="windows left out of the timing")
    parser.add_argument("--windows", type=int, default=4, help="timed windows")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each cell, the sides taking turns")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--router-preset", default="S/8", help="the router's preset (the paper's is smaller)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--sample-batches", type=int, default=2, help="timed batches, after one warm-up batch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench/reports")
    parser.add_argument("--notes", default="", help="a paragraph appended to the report as is")
    parser.add_argument("--quick", action="store_true", help="CPU smoke size: a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.presets, args.tokens, args.batch, args.classes, args.modes = "small", 16, 8, 10, "fp32"
        args.window, args.warmup_windows, args.windows = 1, 1, 2
        args.router_preset, args.sample_steps, args.sample_batch, args.sample_batches = "tiny", 2, 8, 1
        args.threads = args.threads or 1  # tiny tensors: a second thread only waits, more so on a busy machine
    args.presets = [p for p in re.split(r"[\s,]+", args.presets) if p]
    try:
        args.modes = [Mode.parse(m) for m in args.modes.split(",") if m.strip()]
        for preset in (*args.presets, args.router_preset):
            trunk_for(preset)
    except ValueError as e:
        parser.error(str(e))
    side = math.isqrt(args.tokens)
    if side * side != args.tokens:
        parser.error(f"--tokens {args.tokens} is not a square number")
    if args.classes < 1:
        parser.error("--classes must be at least 1 (diffusers' DiT is class-conditional)")
    if min(args.window, args.warmup_windows, args.windows, args.rounds, args.sample_batches, args.experts - 1) < 1:
        parser.error(
            "--window, --warmup-windows, --windows, --rounds and --sample-batches must be >= 1, --experts >= 2"
        )
    if not args.device.startswith("cuda") and any(m.tf32 or m.compile for m in args.modes):
        parser.error("TF32 and compile modes need --device cuda (ddm's loop compiles on CUDA only)")
    return args


def model_sizes(cfg: DiTConfig) -> dict:
    models = {"ddm": DiT(cfg), "diffusers": diffusers_dit(cfg)}
    return {
        name: {"total": parameters(m), "trunk": parameters(m) - conditioning_parameters(m)}
        for name, m in models.items()
    }


def training_rows(cfg: DiTConfig, mode: Mode, args, gflop: dict, peak: float | None) -> dict[str, dict]:
    """Both sides in one mode, each run ``--rounds`` times, the sides taking turns so that a
    change in the machine's load falls on both."""
    runs: dict[str, list[dict]] = {"ddm": [], "diffusers": []}
    for _ in range(args.rounds):
        for name, side_runs in runs.items():
            side_runs.append(training_run(cfg, mode, name, args))
    return {name: training_row(cfg, mode, name, r, gflop[name], peak) for name, r in runs.items()}


def peak_note(args, info: dict) -> str:
    if args.peak_tflops:
        return f"--peak-tflops {args.peak_tflops:g}"
    if "gpu" not in info:
        return ""
    return "bf16 / TF32 / fp32 dense peaks: H100 and H200 SXM 989 / 495 / 67 TFLOP/s, A100 312 / 156 / 19.5"


def measure(configs: dict[str, DiTConfig], args, info: dict, figures: dict) -> None:
    """Fill ``figures`` cell by cell, so that an interrupted run still reports what it measured.
    Sampling goes first: it is short beside training (with its compilations) on a GPU."""
    device = torch.device(args.device)
    for mode in {m.precision: m for m in args.modes}.values():
        figures["sampling"] += sampling_rows(configs[args.presets[0]], mode, args)
    for preset, cfg in configs.items():
        figures["parameters"][preset] = sizes = model_sizes(cfg)
        figures["flops_gflop_per_image"][preset] = flops = gflop_per_image(cfg, device, args.batch, args.seed)
        print(
            f"{preset} at {args.tokens} tokens: ddm {sizes['ddm']['total'] / 1e6:.1f}M parameters, "
            f"{flops['ddm']:.2f} GFLOP/img; diffusers {sizes['diffusers']['total'] / 1e6:.1f}M, "
            f"{flops['diffusers']:.2f} GFLOP/img",
            flush=True,
        )
        for mode in args.modes:
            peak = peak_tflops(info, mode, args.peak_tflops)
            rows = training_rows(cfg, mode, args, flops, peak)
            figures["training"] += rows.values()
            ratio = rows["ddm"]["images_per_s"] / rows["diffusers"]["images_per_s"]
            figures["ratios"][f"{preset} {mode.name}"] = ratio
            mfu = "" if peak is None else ", MFU " + " / ".join(f"{100 * r['mfu']:.1f}%" for r in rows.values())
            print(f"  {preset} {mode.name}: ddm/diffusers {ratio:.2f}{mfu}", flush=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    device = torch.device(args.device)
    info = machine(device)
    print(f"machine: {info['cpu']}, {info['cores']}; {info.get('gpu', 'no GPU')}; {info['software']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)} (the machine may be shared)")
    side = math.isqrt(args.tokens)
    try:
        configs = {
            p: DiTConfig(p, trunk_for(p).patch * side, args.channels, num_classes=args.classes) for p in args.presets
        }
        first = configs[args.presets[0]]  # the sampled experts' size, checked for the router before any work
        RouterConfig(args.router_preset, first.image_size, first.in_channels, args.experts, args.classes)
    except ValueError as e:
        sys.exit(str(e))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick", "modes")}
    settings["modes"] = [asdict(m) for m in args.modes]
    settings["torch_threads"] = torch.get_num_threads()
    settings["image_sizes"] = {preset: cfg.image_size for preset, cfg in configs.items()}
    figures = {
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": info,
        "settings": settings,
        "parameters": {},
        "flops_gflop_per_image": {},
        "training": [],
        "ratios": {},
        "sampling": [],
        "peak_note": peak_note(args, info),
        "interrupted": False,
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` ends the run: report what was measured
    try:
        measure(configs, args, info, figures)
    except KeyboardInterrupt:
        figures["interrupted"] = True
        print("interrupted: the report holds what was measured before", flush=True)
    figures["aims"] = aims(figures)
    figures["load"] = {"start": load_start, "end": os.getloadavg()}
    figures["total_s"] = time.perf_counter() - started
    report = write_report(figures, args.out, device_slug(info, device))
    print()
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
