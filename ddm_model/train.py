"""The training loop: one expert on one cluster, the router on all clusters, or a monolith.

One loop serves all three; only the objective differs. It gives AdamW with linear warmup,
gradient clipping, an EMA of the weights, bf16 autocast (on CUDA, or on the CPU if asked),
TF32 and torch.compile on CUDA if asked, a step budget, a measured FLOP count per step, a rich
progress bar with loss and throughput, and periodic local resume files from which a killed run
continues bit-for-bit (model, EMA, optimizer, step and RNG state). Given a
``distributed.World`` it runs as one of several processes that split each batch between them
and make the single-process update (``distributed`` says how).

An expert's loop sees only the ``ImageDataset`` it is given; ``train_expert`` is meant to be
called with one cluster's subset, which holds copies of that cluster's samples and nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from .checkpoint import CheckpointInfo, save_checkpoint
from .data import ImageDataset
from .distributed import World
from .dit import DiT, DiTConfig
from .errors import DDMError
from .flops import count_flops
from .flow import ALL_ROWS, TimeSampler, drop_labels, flow_matching_loss
from .fsutil import atomic_path
from .privacy import DPConfig, PrivateTraining, quiet_hooks
from .progress import maybe_progress
from .router import Router, RouterConfig, router_loss

RESUME_FILE = "resume.pt"
FLOP_ROWS = 8  # samples a step's FLOPs are counted on (_measure_step_flops)


class TrainError(DDMError, RuntimeError):
    """A training run that cannot start or resume as asked."""


class TrainStopped(TrainError):
    """Training was asked to stop; its resume state was saved first."""


ProgressCallback = Callable[[int, float, float], None]  # (step, mean loss, images per second)


@dataclass(frozen=True)
class RunOptions:
    """Where and how one call of the loop runs; none of it changes the weights it produces.

    ``checkpoint_dir`` holds the resume file (none is written without one); ``progress`` is a
    rich ``Progress`` to add a bar to, or whether to show one of the loop's own; ``description``
    names the run on the bar and in errors; ``on_progress`` is called after every log window;
    setting ``stop`` makes the loop save its resume state and raise ``TrainStopped`` at the next
    step. ``world`` makes this process one of several that train the model together
    (``distributed``): ``cfg.device`` must then be the world's device; only its main process
    writes the resume file, and a stop set on any process stops them all at the end of the log
    window.
    """

    checkpoint_dir: str | Path | None = None
    progress: Progress | bool = True
    description: str = "train"
    on_progress: ProgressCallback | None = None
    stop: threading.Event | None = None
    world: World | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast, CUDA only unless cpu_amp
    cpu_amp: bool = False  # bf16 autocast on the CPU too (with amp): fast where the CPU has bf16 units
    tf32: bool = False  # TF32 for float32 matrix products, CUDA only (cuDNN convolutions use it by default)
    compile: bool = False  # torch.compile, CUDA only
    checkpoint_every: int = 500
    log_every: int = 10
    time_kind: str = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 0,
            "batch_size": 1 <= self.batch_size <= 1 << 20,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "grad_clip": self.grad_clip >= 0,
            "ema_decay": 0 <= self.ema_decay < 1,
            "checkpoint_every": self.checkpoint_every >= 0,
            "log_every": self.log_every >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise TrainError(f"training settings out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        TimeSampler(self.time_kind, self.time_mean, self.time_std)  # validates the time distribution

    @property
    def times(self) -> TimeSampler:
        return TimeSampler(self.time_kind, self.time_mean, self.time_std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> TrainConfig:
        """Rebuild from JSON (a lease carries one), refusing unknown fields and wrong types."""
        if not isinstance(data, dict):
            raise TrainError(f"training settings must be a JSON object, got {type(data).__name__}")
        defaults = cls()
        unknown = set(data) - set(asdict(defaults))
        if unknown:
            raise TrainError(f"unknown training settings: {', '.join(sorted(unknown))}")
        for name, value in data.items():
            want = type(getattr(defaults, name))
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise TrainError(f"training setting {name!r} must be {want.__name__}, got {value!r}")
        return cls(**data)

    def run_identity(self) -> dict:
        """Settings that must not change across a resume. The step budget may grow, and the
        device may change (a resume on another device continues the run, though not bit for
        bit: its random stream restarts from the seed and the step)."""
        skip = {"steps", "checkpoint_every", "log_every", "device", "amp", "cpu_amp", "tf32", "compile"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    model: nn.Module  # the EMA weights, in eval mode: what gets exported and sampled
    steps: int
    flops_per_step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each log window
    seconds: float = 0.0
    resumed_from: int = 0  # step found in the resume state when this call started
    privacy: dict | None = None  # a DP-SGD run's guarantee (privacy.Guarantee.to_dict())

    @property
    def flops(self) -> int:
        return self.steps * self.flops_per_step

    def export(
        self,
        path: str | Path,
        data_fingerprint: str,
        cluster_id: int | None = None,
        metrics: dict | None = None,
        kind: str | None = None,
    ) -> CheckpointInfo:
        """Write the EMA weights as a checkpoint carrying this run's steps, FLOPs and final loss,
        or, for a private run, its guarantee and no loss (a loss is a statistic of the data)."""
        final = {"final_loss": self.losses[-1]} if self.losses and self.privacy is None else {}
        return save_checkpoint(
            path,
            self.model,
            cluster_id=cluster_id,
            steps=self.steps,
            flops=self.flops,
            data_fingerprint=data_fingerprint,
            metrics={**final, **(metrics or {})},
            kind=kind,
            privacy=self.privacy,
        )


# objective(model, x, targets, generator, rows): the mean loss over ``rows`` of the batch (x,
# targets), every random number drawn for the whole batch (``flow.noised``).
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor | None, torch.Generator, slice], torch.Tensor]


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def _ema_decay_at(cfg: TrainConfig, step: int) -> float:
    # Short runs must not be dominated by the initial weights: ramp the decay up.
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None,
    objective: Objective,
    cfg: TrainConfig,
    identity: dict,
    run: RunOptions = RunOptions(),
    privacy: DPConfig | None = None,
) -> TrainResult:
    """Minimise ``objective`` over random batches of (images, targets) for ``cfg.steps`` steps.

    ``identity`` names the model and data; a resume file in ``run.checkpoint_dir`` is continued
    only if it carries the same identity and ``cfg.run_identity()``, whatever number of
    processes wrote it. A loss or weight that is not finite ends the run with ``TrainError``; no
    state past it is saved or returned.

    With ``privacy`` the run is DP-SGD (``privacy.PrivateTraining``): Poisson batches of
    expected size ``cfg.batch_size``, each sample's gradient clipped and the sum noised, for a
    guarantee planned for exactly ``cfg.steps`` steps (part of the resume identity, so a
    resumed run cannot change it); ``cfg.grad_clip`` and ``cfg.compile`` do not apply.
    """
    if images.shape[0] == 0:
        raise TrainError("cannot train on an empty dataset")
    world = run.world
    rows = ALL_ROWS if world is None else world.rows(cfg.batch_size)
    device = torch.device(cfg.device)
    if world is not None and device != world.device:
        raise TrainError(f"{run.description}: this process trains on {world.device}, not {device}")
    cuda = device.type == "cuda"
    private = None
    if privacy is not None:
        if world is not None:
            raise TrainError(f"{run.description}: differentially private training runs in one process")
        private = PrivateTraining(privacy, images.shape[0], cfg.batch_size, cfg.steps)
    autocast = cfg.amp and (cuda or (cfg.cpu_amp and device.type == "cpu"))
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    images = images.to(device)
    targets = None if targets is None else targets.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=cuda or None
    )

    rows_per_step = cfg.batch_size * (private.pairs if private else 1)
    flops_per_step = _measure_step_flops(model, images, targets, objective, rows_per_step)
    identity = {**identity, "train": cfg.run_identity()}
    if private is not None:
        identity["privacy"] = private.guarantee.to_dict()
    step, losses = 0, []
    resume_path = Path(run.checkpoint_dir) / RESUME_FILE if run.checkpoint_dir is not None else None
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state["identity"] != identity:
            raise TrainError(
                f"{resume_path} belongs to a different run (model, data or settings differ);"
                " remove it or use another checkpoint directory"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        if state.get("device_type") == device.type:
            generator.set_state(state["rng"].to("cpu"))
        else:
            generator.manual_seed(cfg.seed + step)

    forward = model if world is None else world.wrap(model)
    if private is not None:
        forward, optimizer = private.attach(model, optimizer, generator)
    elif cfg.compile and cuda:
        forward = torch.compile(forward)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
    window_loss = torch.zeros((), device=device)
    window_losses: list[torch.Tensor] = []  # the open window's losses, left on the device

    # Finiteness is checked only where the loop waits for the device anyway: at the end of a log
    # window (its mean loss is read back) and before a resume file is written or the weights are
    # returned. Testing each step's loss on the host would stall a GPU once a step. A bad loss is
    # still caught, at most log_every steps late, and nothing past it is saved or returned.
    def check_finite(weights: bool) -> None:
        if window_losses:
            finite = torch.isfinite(torch.stack(window_losses))
            if not finite.all():
                i = int(finite.logical_not().nonzero()[0])
                bad_step = step - len(window_losses) + i
                raise TrainError(
                    f"{run.description}: loss became {window_losses[i].item()} at step {bad_step};"
                    " lower the learning rate"
                )
        # A finite loss can still have a non-finite gradient, so the weights are checked too.
        if weights and not torch.stack([torch.isfinite(p).all() for p in params + ema_params]).all():
            raise TrainError(
                f"{run.description}: the weights became non-finite by step {step}; lower the learning rate"
            )

    def save_resume() -> None:
        check_finite(weights=True)
        if resume_path is None or (world is not None and not world.main):
            return
        state = {
            "identity": identity,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": generator.get_state(),
            "device_type": device.type,
            "step": step,
            "losses": losses,
        }
        with atomic_path(resume_path) as tmp:
            torch.save(state, tmp)

    def stop_asked() -> bool:
        return run.stop is not None and run.stop.is_set()

    stopping = False  # with a world: whether any process asked, as agreed at the last log window

    def stop_now() -> bool:
        return stop_asked() if world is None else stopping

    start_step, started = step, time.perf_counter()
    window_steps, window_start = 0, time.perf_counter()
    quiet = quiet_hooks() if private is not None else contextlib.nullcontext()
    with maybe_progress(run.progress) as bar, tf32_matmuls(cfg.tf32 and cuda), quiet:
        resumed = f"resumed at step {step}" if step else ""
        task = bar.add_task(run.description, total=cfg.steps, completed=step, info=resumed) if bar else None
        while step < cfg.steps:
            if stop_now():
                save_resume()
                raise TrainStopped(f"{run.description}: stopped at step {step}; the resume state is saved")
            if private is None:
                index = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=generator, device=device)
            else:
                index = private.draw(images.shape[0], generator, device)
            x = images[index]
            y = None if targets is None else targets[index]
            if private is not None:
                x, y = private.repeat(x), private.repeat(y)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss = None
            if x.shape[0]:  # a Poisson batch may be empty: its step is noise alone
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = objective(forward, x, y, generator, rows)
                loss.backward()
            if private is not None:
                private.per_sample(params, index.shape[0])
            elif cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():  # one multi-tensor kernel on CUDA, not one launch per parameter
                torch._foreach_lerp_(ema_params, params, 1.0 - _ema_decay_at(cfg, step))
            step += 1
            if loss is not None:
                loss = loss.detach() if world is None else world.mean(loss)
                window_loss += loss
                window_losses.append(loss)
            window_steps += 1
            if window_steps == cfg.log_every or step == cfg.steps:
                check_finite(weights=False)
                mean_loss = (window_loss / len(window_losses)).item() if window_losses else math.nan
                losses.append(mean_loss)
                now = time.perf_counter()
                rate = window_steps * cfg.batch_size / (now - window_start)
                if bar:
                    bar.update(task, completed=step, info=f"loss {mean_loss:.4f}  {rate:,.0f} img/s")
                if run.on_progress is not None:
                    run.on_progress(step, mean_loss, rate)
                window_loss.zero_()
                window_losses.clear()
                window_steps, window_start = 0, now
                if world is not None:
                    stopping = world.any(stop_asked())
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_resume()
        save_resume()
    if private is not None:
        private.detach()
    return TrainResult(
        model=ema,
        steps=step,
        flops_per_step=flops_per_step,
        losses=losses,
        seconds=time.perf_counter() - started if step > start_step else 0.0,
        resumed_from=start_step,
        privacy=None if private is None else private.guarantee.to_dict(),
    )


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matrix products on CUDA while the block runs (the process-wide setting
    is restored after it)."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _measure_step_flops(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None, objective: Objective, batch_size: int
) -> int:
    """FLOPs of one real forward + backward on a batch, drawn from a throwaway generator so that
    the run's own random stream is untouched.

    Every op of these models works on each sample apart, so the count is exactly linear in the
    batch: it is taken on FLOP_ROWS samples and scaled, which spares a large model on a GPU a
    full-batch float32 pass that could need more memory than its bf16 training. A count that
    does not divide evenly is taken on the whole batch."""

    def count(rows: int) -> int:
        generator = torch.Generator(device=images.device).manual_seed(0)
        index = torch.randint(0, images.shape[0], (rows,), generator=generator, device=images.device)
        y = None if targets is None else targets[index]
        flops = count_flops(lambda: objective(model, images[index], y, generator, ALL_ROWS).backward())
        model.zero_grad(set_to_none=True)
        return flops

    rows = min(batch_size, FLOP_ROWS)
    flops = count(rows)
    if rows == batch_size:
        return flops
    return flops // rows * batch_size if flops % rows == 0 else count(batch_size)


# ---------------------------------------------------------------------------------------------
# The three kinds of run


def seeded(cls: type[nn.Module], config, seed: int) -> nn.Module:
    """A model whose initial weights depend on ``seed`` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def expert_objective(model_cfg: DiTConfig, times: TimeSampler) -> Objective:
    def objective(model, x, y, generator, rows=ALL_ROWS):
        if y is not None:
            # Label dropout for classifier-free guidance: some samples see the null label.
            y = drop_labels(y, model_cfg.class_dropout, model_cfg.num_classes, generator)
        return flow_matching_loss(model, x, times, generator, y, rows)

    return objective


def train_expert(
    dataset: ImageDataset,
    model_cfg: DiTConfig,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | bool = True,
    description: str = "expert",
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    world: World | None = None,
    privacy: DPConfig | None = None,
) -> TrainResult:
    """Train one flow-matching DiT on exactly the samples of ``dataset``.

    For an expert, pass one cluster's subset; for a monolith, the whole dataset. The arguments
    from ``checkpoint_dir`` to ``world`` are the run's ``RunOptions``; ``privacy`` makes it a
    DP-SGD run whose guarantee the result (and its exported checkpoint) carries.
    """
    if model_cfg.image_size != dataset.image_size or model_cfg.in_channels != dataset.channels:
        raise TrainError(
            f"model expects {model_cfg.in_channels}x{model_cfg.image_size}x{model_cfg.image_size} images,"
            f" the dataset holds {dataset.channels}x{dataset.image_size}x{dataset.image_size}"
        )
    labels = None
    if model_cfg.num_classes:
        if dataset.labels is None:
            raise TrainError("the model is class-conditional but the dataset has no labels")
        if dataset.num_classes > model_cfg.num_classes:
            raise TrainError(f"the dataset has {dataset.num_classes} classes, the model {model_cfg.num_classes}")
        labels = dataset.labels
    identity = {"kind": "expert", "model": model_cfg.to_dict(), "data": dataset.fingerprint()}
    model = seeded(DiT, model_cfg, cfg.seed)
    objective = expert_objective(model_cfg, cfg.times)
    return fit(
        model,
        dataset.images,
        labels,
        objective,
        cfg,
        identity,
        RunOptions(checkpoint_dir, progress, description, on_progress, stop, world),
        privacy,
    )


def train_router(
    dataset: ImageDataset,
    clusters: torch.Tensor,
    router_cfg: RouterConfig,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | bool = True,
    description: str = "router",
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Train r(x_t, t[, y]) to name the cluster of each sample from its noised version.

    A class-conditional router (``router_cfg.num_classes``) also sees each sample's label,
    replaced by the null label with probability ``class_dropout`` as the experts' is. The
    arguments from ``checkpoint_dir`` on are the run's ``RunOptions``.
    """
    clusters = torch.as_tensor(clusters, dtype=torch.int64)
    if clusters.shape != (len(dataset),):
        raise TrainError(f"{len(dataset)} samples but {clusters.shape[0]} cluster labels")
    if clusters.min() < 0 or clusters.max() >= router_cfg.num_clusters:
        raise TrainError(f"cluster labels must lie in [0, {router_cfg.num_clusters})")
    targets = clusters
    conditional = bool(router_cfg.num_classes)
    if conditional:
        if dataset.labels is None:
            raise TrainError("the router is class-conditional but the dataset has no labels")
        if dataset.num_classes > router_cfg.num_classes:
            raise TrainError(f"the dataset has {dataset.num_classes} classes, the router {router_cfg.num_classes}")
        targets = torch.stack([clusters, dataset.labels], dim=1)  # (N, 2): cluster, class
    model = seeded(Router, router_cfg, cfg.seed)
    labels_digest = hashlib.sha256(clusters.numpy().astype("<i8").tobytes()).hexdigest()
    identity = {
        "kind": "router",
        "model": router_cfg.to_dict(),
        "data": dataset.fingerprint(),
        "clusters": labels_digest,
    }
    times = cfg.times

    def objective(router, x, target, generator, rows=ALL_ROWS):
        if not conditional:
            return router_loss(router, x, target, times, generator, rows=rows)
        y = target[:, 1]
        y = drop_labels(y, router_cfg.class_dropout, router_cfg.num_classes, generator)
        return router_loss(router, x, target[:, 0], times, generator, y, rows)

    return fit(
        model,
        dataset.images,
        targets,
        objective,
        cfg,
        identity,
        RunOptions(checkpoint_dir, progress, description, on_progress, stop),
    )


def router_step_flops(dataset: ImageDataset, router_cfg: RouterConfig, batch_size: int) -> int:
    """Training FLOPs of one router step on ``dataset`` at ``batch_size``, measured."""
    clusters = torch.zeros(len(dataset), dtype=torch.int64)
    cfg = TrainConfig(steps=0, batch_size=batch_size)
    return train_router(dataset, clusters, router_cfg, cfg, progress=False).flops_per_step
