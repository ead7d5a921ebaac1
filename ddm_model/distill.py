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
from .ensemble import mix
from .flow import TimeSampler, Velocity, noised
from .train import Objective, ProgressCallback, TrainConfig, TrainError, TrainResult, fit, seeded

DEFAULT_DATA_WEIGHT = 0.25


def teacher_velocity(teachers: Sequence[Velocity], xt: torch.Tensor, t: torch.Tensor, teacher_of: torch.Tensor):
    """Each row's velocity from its own teacher only, one batched call per teacher."""
    with torch.no_grad():
        choice = F.one_hot(teacher_of, len(teachers)).to(xt.dtype)
        return mix(teachers, xt, t, choice)


def distill_objective(teachers: Sequence[Velocity], times: TimeSampler, data_weight: float) -> Objective:
    def objective(student, x1, teacher_of, generator):
        xt, t, target = noised(x1, times, generator)
        pred = student(xt, t).float()
        loss = F.mse_loss(pred, teacher_velocity(teachers, xt, t, teacher_of).float())
        if data_weight:
            loss = loss + data_weight * F.mse_loss(pred, target.float())
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
    when the images are not real data."""
    teacher_of = torch.as_tensor(teacher_of, dtype=torch.int64)
    if teacher_of.shape != (len(dataset),):
        raise TrainError(f"{len(dataset)} samples but {teacher_of.shape[0]} teacher labels")
    if not teachers or len(teacher_ids) != len(teachers):
        raise TrainError(f"{len(teachers)} teachers but {len(teacher_ids)} teacher ids")
    if teacher_of.min() < 0 or teacher_of.max() >= len(teachers):
        raise TrainError(f"teacher labels must lie in [0, {len(teachers)})")
    if data_weight < 0:
        raise TrainError(f"the data weight must be non-negative, got {data_weight}")
    if student_cfg.num_classes:
        raise TrainError("distillation trains unconditional students only (num_classes = 0)")
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
        teacher_of,
        distill_objective(teachers, cfg.times, data_weight),
        cfg,
        identity,
        checkpoint_dir,
        progress,
        description,
        on_progress,
        stop,
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
) -> float:
    """Mean squared difference between the student's velocity and each sample's teacher's,
    at points noised like training ones under a fixed seed: how closely the student follows."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x1 = images[start : start + batch_size]
        xt, t, _ = noised(x1, times, generator)
        teacher = teacher_velocity(teachers, xt, t, teacher_of[start : start + batch_size].to(images.device))
        total += F.mse_loss(student(xt, t).float(), teacher.float(), reduction="sum").item()
    return total / images.numel()
