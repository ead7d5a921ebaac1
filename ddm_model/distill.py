"""Distillation: one dense student from a routed ensemble of expert teachers.

Each training sample's cluster picks its teacher. At a point x_t drawn with the experts' own
path and time distribution (``flow.noised``), the student s regresses that teacher's velocity,
and, where the samples are real data, also the flow-matching target:

    loss = ||s(x_t, t) - v_k(x_t, t)||^2 + data_weight * ||s(x_t, t) - (x_1 - x_0)||^2

With x_t drawn from cluster k's data, E[v_k(x_t, t) | x_t] = sum_k p(k | x_t) v_k(x_t, t), the
full ensemble under the exact posterior, which is also the minimiser of the flow-matching term:
both terms aim at the same velocity. The teacher's target has far less variance (it averages
over every x_1 of its cluster that could have produced x_t) but carries the teacher's errors; the
flow-matching target is unbiased but noisy. The minimiser of the sum is the blend
(v_k + data_weight (x_1 - x_0)) / (1 + data_weight). The default, 0.25, makes it 80% teacher:
the data term's noise enters at (0.2)^2 = 4% of its variance while it still pulls a fifth of the
way back to the real data where a teacher is wrong. Without real data (samples drawn from the
experts themselves, as a siloed coordinator has) the weight must be 0: an expert's sample is no
evidence beyond the expert.

A class-conditional ensemble (experts with ``num_classes``) distills into a class-conditional
student: the student and the teacher see the sample's label y, replaced for both by the null
label with the experts' own ``class_dropout``, so the student learns sum_k p(k | x_t, y)
v_k(x_t, y) and, from the dropped rows, the unconditional sum_k p(k | x_t) v_k(x_t, null) that
classifier-free guidance needs.

Without real data (siloed) the training samples are drawn from the teachers themselves
(``teacher_samples``): as many per teacher as its share of the data (``teacher_counts``,
uniform when the shares are unknown), each for a class drawn from that teacher's own class
counts (uniform when unknown), so the samples follow the ensemble's p(k, y).

Teachers run sparsely: one batched call per teacher over exactly its rows (``ensemble.mix``),
so a step costs one student forward and backward plus one teacher forward per sample, and
the training loop's measured FLOPs per step include the teacher passes. The loop, its resume
files, EMA, progress and checkpoints are the experts' own (``train.fit``); the result is saved
with kind ``student``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from .data import ImageDataset
from .dit import DiT, DiTConfig
from .ensemble import mix, shares
from .errors import UsageError
from .flow import ALL_ROWS, TimeSampler, Velocity, call_velocity, drop_labels, integrate, noised
from .train import Objective, ProgressCallback, RunOptions, TrainConfig, TrainError, TrainResult, fit, seeded

DEFAULT_DATA_WEIGHT = 0.25


def teacher_velocity(
    teachers: Sequence[Velocity],
    xt: torch.Tensor,
    t: torch.Tensor,
    teacher_of: torch.Tensor,
    y: torch.Tensor | None = None,
):
    """Each row's velocity from its own teacher only (given the row's label, if any), one
    batched call per teacher."""
    with torch.no_grad():
        choice = F.one_hot(teacher_of, len(teachers)).to(xt.dtype)
        return mix(teachers, xt, t, choice, y)


def distill_objective(
    teachers: Sequence[Velocity],
    times: TimeSampler,
    data_weight: float,
    num_classes: int = 0,
    class_dropout: float = 0.0,
) -> Objective:
    """The distillation loss on a batch. Unconditional (``num_classes = 0``): the targets are
    the rows' teacher indices. Class-conditional: (B, 2) rows of (teacher, label); the label,
    dropped to the null label ``num_classes`` at rate ``class_dropout``, goes to the student and
    the teacher alike."""

    def objective(student, x1, target, generator, rows=ALL_ROWS):
        teacher_of, y = target, None
        if num_classes:
            teacher_of = target[:, 0]
            y = drop_labels(target[:, 1], class_dropout, num_classes, generator)[rows]
        xt, t, v = noised(x1, times, generator, rows)
        teacher_of = teacher_of[rows]
        pred = call_velocity(student, xt, t, y).float()
        loss = F.mse_loss(pred, teacher_velocity(teachers, xt, t, teacher_of, y).float())
        if data_weight:
            loss = loss + data_weight * F.mse_loss(pred, v.float())
        return loss

    return objective


def train_student(
    dataset: ImageDataset,
    teacher_of: torch.Tensor,
    teachers: Sequence[Velocity],
    teacher_ids: Sequence[str],
    student_cfg: DiTConfig,
    cfg: TrainConfig,
    data_weight: float = DEFAULT_DATA_WEIGHT,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | bool = True,
    description: str = "student",
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """Distill ``teachers`` into one DiT: sample i of ``dataset`` is taught by
    ``teachers[teacher_of[i]]``. ``teacher_ids`` name the teachers (checkpoint sha256s, say)
    so that a resume state is only ever continued with the same ones. Pass ``data_weight=0``
    when the images are not real data.

    A class-conditional ``student_cfg`` (``num_classes > 0``, the teachers' own) learns from
    ``dataset.labels``: teacher and student see each sample's label, or both the null label
    at the rate ``student_cfg.class_dropout``. An unconditional student ignores any labels
    and calls its teachers without one (a class-conditional teacher then uses its null label).
    The arguments from ``checkpoint_dir`` on are the run's ``train.RunOptions``."""
    teacher_of = torch.as_tensor(teacher_of, dtype=torch.int64)
    if teacher_of.shape != (len(dataset),):
        raise TrainError(f"{len(dataset)} samples but {teacher_of.shape[0]} teacher labels")
    if not teachers or len(teacher_ids) != len(teachers):
        raise TrainError(f"{len(teachers)} teachers but {len(teacher_ids)} teacher ids")
    if teacher_of.min() < 0 or teacher_of.max() >= len(teachers):
        raise TrainError(f"teacher labels must lie in [0, {len(teachers)})")
    if data_weight < 0:
        raise TrainError(f"the data weight must be non-negative, got {data_weight}")
    targets = teacher_of
    if student_cfg.num_classes:
        if dataset.labels is None:
            raise TrainError("the student is class-conditional but the data has no labels")
        if len(dataset) and (dataset.labels.min() < 0 or dataset.labels.max() >= student_cfg.num_classes):
            raise TrainError(f"labels must lie in [0, {student_cfg.num_classes}), the student's classes")
        targets = torch.stack([teacher_of, dataset.labels.to(torch.int64)], dim=1)
    for k, teacher in enumerate(teachers):
        classes = getattr(teacher, "num_classes", None)
        if student_cfg.num_classes and classes is not None and classes != student_cfg.num_classes:
            raise TrainError(f"teacher {k} has {classes} classes, the student {student_cfg.num_classes}")
    if student_cfg.image_size != dataset.image_size or student_cfg.in_channels != dataset.channels:
        raise TrainError(
            f"the student expects {student_cfg.in_channels}x{student_cfg.image_size}x{student_cfg.image_size} images,"
            f" the data holds {dataset.channels}x{dataset.image_size}x{dataset.image_size}"
        )
    device = torch.device(cfg.device)
    teachers = [t.to(device).eval().requires_grad_(False) if isinstance(t, torch.nn.Module) else t for t in teachers]
    identity = {
        "kind": "student",
        "model": student_cfg.to_dict(),
        "data": dataset.fingerprint(),
        "teacher_of": hashlib.sha256(teacher_of.numpy().astype("<i8").tobytes()).hexdigest(),
        "teachers": list(teacher_ids),
        "data_weight": float(data_weight),
    }
    return fit(
        seeded(DiT, student_cfg, cfg.seed),
        dataset.images,
        targets,
        distill_objective(teachers, cfg.times, data_weight, student_cfg.num_classes, student_cfg.class_dropout),
        cfg,
        identity,
        RunOptions(checkpoint_dir, progress, description, on_progress, stop),
    )


@torch.no_grad()
def teacher_gap(
    student: Velocity,
    teachers: Sequence[Velocity],
    images: torch.Tensor,
    teacher_of: torch.Tensor,
    times: TimeSampler,
    seed: int = 0,
    batch_size: int = 512,
    labels: torch.Tensor | None = None,
) -> float:
    """Mean squared difference between the student's velocity and each sample's teacher's,
    at points noised like training ones under a fixed seed: how closely the student follows.
    With ``labels`` both see each sample's label (pass the null label for the unconditional gap)."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x1 = images[start : start + batch_size]
        y = None if labels is None else labels[start : start + batch_size].to(images.device)
        xt, t, _ = noised(x1, times, generator)
        teacher = teacher_velocity(teachers, xt, t, teacher_of[start : start + batch_size].to(images.device), y)
        total += F.mse_loss(call_velocity(student, xt, t, y).float(), teacher.float(), reduction="sum").item()
    return total / images.numel()


# ---------------------------------------------------------------------------------------------
# Training samples drawn from the teachers (no real data)


def teacher_counts(total: int, cluster_shares: Sequence[float] | None, num_teachers: int) -> list[int]:
    """``total`` samples split between the teachers in proportion to their shares of the data
    (uniform when ``cluster_shares`` is None): the expected counts of k ~ p(k), rounded by
    largest remainder so that they sum to exactly ``total``."""
    if total < 0:
        raise UsageError(f"the number of samples must be non-negative, got {total}")
    p = shares([1.0] * num_teachers if cluster_shares is None else cluster_shares, "cluster shares")
    if p.shape != (num_teachers,):
        raise UsageError(f"{p.shape[0]} cluster shares for {num_teachers} teachers")
    exact = p * total
    counts = exact.floor().long()
    short = total - int(counts.sum())
    # Ties go to the lower index: deterministic, whatever the sort's stability.
    order = sorted(range(num_teachers), key=lambda k: (-(exact[k] - counts[k]).item(), k))
    for k in order[:short]:
        counts[k] += 1
    return counts.tolist()


def class_probabilities(
    class_shares: Sequence[Sequence[float]] | None, num_teachers: int, num_classes: int
) -> torch.Tensor:
    """(K, C) p(y | k): each teacher's per-class counts normalised; uniform over the classes
    where they are unknown (None) or a teacher's row is all zero."""
    if num_classes < 1:
        raise UsageError(f"class probabilities need at least one class, got {num_classes}")
    table = torch.ones((num_teachers, num_classes), dtype=torch.float64)
    if class_shares is not None:
        if len(class_shares) != num_teachers:
            raise UsageError(f"per-class counts for {len(class_shares)} teachers, expected {num_teachers}")
        for k, row in enumerate(class_shares):
            counts = torch.as_tensor(row, dtype=torch.float64)
            if counts.dim() != 1 or counts.shape[0] > num_classes:
                raise UsageError(f"teacher {k}'s per-class counts must be a list of at most {num_classes} numbers")
            if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
                raise UsageError(f"teacher {k}'s per-class counts must be non-negative finite numbers")
            if float(counts.sum()) > 0:
                table[k] = F.pad(counts, (0, num_classes - counts.shape[0]))
    return table / table.sum(dim=1, keepdim=True)


@torch.no_grad()
def teacher_samples(
    teachers: Sequence[Velocity],
    total: int,
    shape: tuple[int, int, int],
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cluster_shares: Sequence[float] | None = None,
    num_classes: int = 0,
    class_shares: Sequence[Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Training data for a student when no real data may be seen: ``total`` samples, split
    between the teachers by ``teacher_counts``, each drawn (Euler, ``steps`` steps, clamped to
    [-1, 1]) from its teacher alone. For class-conditional teachers (``num_classes``) each
    sample is drawn for a class y ~ p(y | k) (``class_probabilities``) and the teacher is
    called with it. Returns (images, teacher index per sample, labels or None), ordered by
    teacher; teachers run sparsely, each batched over its own rows."""
    counts = teacher_counts(total, cluster_shares, len(teachers))
    teacher_of = torch.repeat_interleave(torch.arange(len(teachers)), torch.tensor(counts, dtype=torch.int64))
    generator = torch.Generator().manual_seed(seed)
    labels = None
    if num_classes:
        p = class_probabilities(class_shares, len(teachers), num_classes)
        labels = torch.cat(
            [torch.multinomial(p[k], n, replacement=True, generator=generator) for k, n in enumerate(counts) if n]
            or [torch.zeros(0, dtype=torch.int64)]
        )
    images = []
    for start in range(0, total, batch_size):
        rows = teacher_of[start : start + batch_size].to(device)
        y = None if labels is None else labels[start : start + batch_size].to(device)
        noise = torch.randn((rows.shape[0], *shape), generator=generator).to(device)

        def velocity(x, t, y=None, rows=rows):
            return teacher_velocity(teachers, x, t, rows, y)

        images.append(integrate(velocity, noise, steps, y=y).clamp(-1, 1).cpu())
    images = torch.cat(images) if images else torch.zeros((0, *shape))
    return images, teacher_of, labels
