"""`ddm-coordinator distill`: one dense student from the latest published ensemble, published
beside it.

The coordinator reads its latest published manifest back and trusts nothing it has not
checked again: the manifest's signature against its own key, every expert entry's signature,
every artifact's sha256 and every checkpoint's structure. It then distills the experts into
one DiT (``ddm_model.distill``), each training sample taught by its cluster's expert:

- shared mode: the clustered dataset (the router's own data, ``assemble.cluster_data``), with
  the flow-matching term weighted by ``data_weight``;
- siloed mode, where it holds no data: ``router_samples`` samples per expert in all, drawn from
  the experts themselves (``ddm_model.distill.teacher_samples``), as many from each as its
  share of the data where the manifest carries the islands' ``shares`` (else equally), each
  for a class drawn from that expert's class counts (else uniformly) when the experts are
  class-conditional; velocity regression only.

A class-conditional ensemble (the experts' config has ``num_classes``) gives a class-conditional
student with the experts' config: it is taught per label, with the experts' label dropout, so
it samples with a class and classifier-free guidance like the experts.

Resume state lives under HOME/work/student-<teacher ensemble>-<settings digest>, so a stopped
run continues and a finished one is not trained again. The student goes into the artifact
store and a new signed manifest version is published: the same router and experts, plus a
``student`` entry (sha256, size, config, steps, FLOPs with the teacher passes, the teacher
ensemble's id, metrics). Manifests stay in format ``ddm.ensemble/1``: the entry is an addition
that readers without distillation ignore, and the signature covers it like everything else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from dataclasses import dataclass

import torch
from rich.progress import Progress

from ddm_model.data import ImageDataset
from ddm_model.distill import (
    DEFAULT_DATA_WEIGHT,
    class_probabilities,
    teacher_counts,
    teacher_gap,
    teacher_samples,
    train_student,
)
from ddm_model.dit import DiTConfig
from ddm_model.errors import DDMError
from ddm_model.flops import count_flops
from ddm_model.train import TrainConfig
from protocol.trust import canonical_json

from .assemble import cluster_data
from .home import Home
from .keys import SigningKey
from .published import PublishedError, load_member, verified_manifest
from .registry import Registry
from .store import Store

GAP_SAMPLES = 1024  # samples on which the student's distance to its teachers is measured


class DistillError(DDMError):
    """A distillation that cannot run as asked; the message says what to do."""


@dataclass
class DistillOptions:
    steps: int | None = None  # default: the experts' steps
    preset: str | None = None  # default: the experts' preset
    data_weight: float | None = None  # default: DEFAULT_DATA_WEIGHT with real data, 0 without
    device: str = "cpu"


@dataclass
class DistillReport:
    ensemble_id: int  # the published manifest version that names the student
    teacher_ensemble_id: int
    sha256: str
    steps: int
    flops: int
    published: bool  # False when the latest manifest already named this very student


def distill(
    home: Home, opts: DistillOptions, progress: Progress | bool = True, stop: threading.Event | None = None
) -> DistillReport:
    config = home.load_config()
    registry = Registry(home.database_url(config), lease_seconds=config.lease_seconds)
    try:
        store = Store(home.artifacts, home.staging)
        key = SigningKey.load(home.key_path)
        return _distill(home, config, registry, store, key, opts, progress, stop)
    finally:
        registry.close()


def _distill(home, config, registry, store, key, opts, progress, stop) -> DistillReport:
    latest = registry.latest_published()
    if latest is None:
        raise DistillError("no ensemble is published yet; distill once the coordinator has published one")
    try:
        manifest = verified_manifest(latest, key)
        experts = [m for m in manifest.members if m.kind == "expert"]
        teachers = [load_member(store, m, opts.device) for m in experts]
    except PublishedError as exc:
        raise DistillError(str(exc)) from None
    teacher_ids = [m.sha256 for m in experts]
    # A manifest version that already names a student keeps the id of the ensemble it was taught by.
    teacher_ensemble_id = (manifest.student or {}).get("teacher_ensemble_id", manifest.ensemble_id)

    siloed = config.mode == "siloed"
    if siloed and opts.data_weight:
        raise DistillError("a siloed coordinator holds no real data: the data weight must be 0")
    data_weight = (0.0 if siloed else DEFAULT_DATA_WEIGHT) if opts.data_weight is None else opts.data_weight
    base = manifest.entries[0]["config"]
    try:
        student_cfg = DiTConfig.from_dict({**base, "preset": opts.preset or base["preset"]})
        train = TrainConfig.from_dict(config.train)
    except ValueError as exc:
        raise DistillError(str(exc)) from None
    train.seed += config.experts  # a seed no expert used
    train.device = opts.device
    if opts.steps is not None:
        train.steps = opts.steps

    sampling_flops = 0
    if siloed:
        drawn = []
        sampling_flops = count_flops(
            lambda: drawn.append(siloed_data(config, manifest.shares, teachers, student_cfg.num_classes, opts.device))
        )
        data, teacher_of, source = drawn[0]
    else:
        data, teacher_of = cluster_data(home, config, manifest.clusters)
        source = "the clustered dataset"
        if student_cfg.num_classes and data.labels is None:
            raise DistillError(f"the experts are class-conditional but the dataset {config.dataset} has no labels")
    settings = {"student": student_cfg.to_dict(), "data_weight": data_weight, "train": train.run_identity()}
    digest = hashlib.sha256(canonical_json(settings)).hexdigest()[:12]
    result = train_student(
        data,
        teacher_of,
        teachers,
        teacher_ids,
        student_cfg,
        train,
        data_weight,
        checkpoint_dir=home.work / f"student-{teacher_ensemble_id}-{digest}",
        progress=progress,
        description="student",
        stop=stop,
    )
    images, gap_teachers = data.images[:GAP_SAMPLES].to(opts.device), teacher_of[:GAP_SAMPLES]
    labels = None if not student_cfg.num_classes else data.labels[:GAP_SAMPLES]

    def gap(y):
        return round(teacher_gap(result.model, teachers, images, gap_teachers, train.times, train.seed, labels=y), 6)

    metrics = {"teacher_mse": gap(labels)}
    if labels is not None:  # the null label's gap: how well the student serves guidance
        metrics["teacher_mse_unconditional"] = gap(torch.full_like(labels, student_cfg.num_classes))
    metrics.update(data_weight=data_weight, trained_on=source, data_sampling_flops=sampling_flops)
    staged = home.work / f"student-{teacher_ensemble_id}-{digest}.safetensors"
    info = result.export(staged, data.fingerprint() if not siloed else "", metrics=metrics, kind="student")
    sha, size = store.add_file(staged, move=True)
    report = DistillReport(latest.id, teacher_ensemble_id, sha, result.steps, result.flops, published=False)
    if (manifest.student or {}).get("sha256") == sha:
        return report

    entry = {
        "sha256": sha,
        "size": size,
        "config": student_cfg.to_dict(),
        "steps": result.steps,
        "flops": result.flops,
        "teacher_ensemble_id": teacher_ensemble_id,
        "metrics": info.metrics,
    }

    def sign(version: int) -> tuple[bytes, bytes]:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return key.sign(manifest.with_student(version, now, entry).data)

    report.ensemble_id = registry.publish_student(latest.id, sha, size, sign)
    report.published = True
    return report


def siloed_data(config, shares: dict | None, teachers: list, num_classes: int, device: str):
    """Siloed mode: samples drawn from the experts, in proportion to the manifest's cluster
    ``shares`` (and per-class counts) where it carries them. Returns the data, each sample's
    teacher and a description."""
    found = {} if shares is None else shares
    if not isinstance(found, dict):
        raise DistillError("the published manifest's shares are not a JSON object")
    cluster_shares, class_shares = found.get("clusters"), found.get("classes")
    shape = (config.model["in_channels"], config.model["image_size"], config.model["image_size"])
    total, steps = config.router_samples * len(teachers), config.router_sampling_steps
    try:
        teacher_counts(total, cluster_shares, len(teachers))
        if num_classes:
            class_probabilities(class_shares, len(teachers), num_classes)
    except (DDMError, TypeError, ValueError, RuntimeError) as exc:
        raise DistillError(f"the published manifest's shares cannot be used: {exc}") from None
    images, teacher_of, labels = teacher_samples(
        teachers,
        total,
        shape,
        steps=steps,
        seed=config.router_train["seed"],
        device=device,
        cluster_shares=cluster_shares,
        num_classes=num_classes,
        class_shares=class_shares if num_classes else None,
    )
    data = ImageDataset(images, torch.arange(total, dtype=torch.int64), labels, num_classes, name="expert samples")
    split = f"by the cluster shares ({found.get('source', 'unnamed source')})" if cluster_shares else "equally"
    classes = ""
    if num_classes:
        classes = ", classes by each expert's class counts" if class_shares else ", classes uniformly"
    return data, teacher_of, f"{total} samples drawn from the experts, split {split}{classes} ({steps} Euler steps)"


def describe(report: DistillReport) -> str:
    what = "published" if report.published else "already published"
    return (
        f"{what} ensemble {report.ensemble_id} with a student distilled from ensemble {report.teacher_ensemble_id}:"
        f" {report.steps} steps, {report.flops / 1e12:.3g} TFLOP (teacher passes included), sha256 {report.sha256}"
    )
