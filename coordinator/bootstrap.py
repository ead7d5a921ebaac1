"""`ddm-coordinator init`: cluster the dataset, cut one shard per cluster, make the signing key
and the registry. Everything is built in a temporary folder beside the home and renamed into
place at the end, so a failed init leaves nothing half made."""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_dataset, save_dataset_file
from ddm_model.dit import DiT, DiTConfig
from ddm_model.router import RouterConfig
from ddm_model.train import TrainConfig

from .home import CoordinatorConfig, Home, HomeError
from .keys import SigningKey
from .registry import Registry
from .store import Store


@dataclass
class InitOptions:
    home: Path
    dataset: str = "digits"
    experts: int = 4
    preset: str = "small"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    router_preset: str = "small"
    router_steps: int = 2000
    router_lr: float = 1e-3
    clustering: str = "kmeans2"
    features: str = "pixels"
    feature_weights: str | None = None
    seed: int = 0
    image_size: int | None = None
    lease_seconds: float = 120.0
    heartbeat_seconds: float = 10.0
    max_upload_mb: float = 0.0
    database_url: str = ""


def expected_checkpoint_bytes(model_config: DiTConfig) -> int:
    """Size of the float32 weights of an expert; the header adds a few KiB."""
    with torch.device("meta"):
        model = DiT(model_config)
    return sum(t.numel() * 4 for t in model.state_dict().values())


def init_home(opts: InitOptions) -> tuple[Home, str]:
    """Create a coordinator home; returns it and the signing key's fingerprint."""
    home = Home(opts.home)
    if home.exists():
        raise HomeError(f"{home.root} is already a coordinator home; pick another folder")
    if home.root.exists() and any(home.root.iterdir()):
        raise HomeError(f"{home.root} exists and is not empty; pick a new or empty folder")
    if opts.lease_seconds <= 0 or opts.heartbeat_seconds <= 0 or opts.heartbeat_seconds >= opts.lease_seconds:
        raise HomeError("need 0 < heartbeat seconds < lease seconds")

    # Validate every setting before the slow work.
    dataset = load_dataset(opts.dataset, image_size=opts.image_size)
    model = DiTConfig(opts.preset, dataset.image_size, dataset.channels, num_classes=0)
    router = RouterConfig(opts.router_preset, dataset.image_size, dataset.channels, opts.experts)
    train = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed)
    router_train = TrainConfig(steps=opts.router_steps, batch_size=opts.batch_size, lr=opts.router_lr, seed=opts.seed)
    clustering = cluster_dataset(
        dataset,
        opts.experts,
        method=opts.clustering,
        features=opts.features,
        seed=opts.seed,
        weights=opts.feature_weights,
    )

    home.root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{home.root.name}.init-", dir=home.root.parent))
    try:
        staged = Home(build)
        store = Store(staged.artifacts, staged.staging)
        clustering.save(staged.clustering_path)
        clustering_sha, clustering_size = store.add_file(staged.clustering_path)
        shards = []
        for k in range(opts.experts):
            shard = dataset.subset(clustering.members(k), name=f"{dataset.name}-cluster-{k}")
            tmp = build / f"shard-{k}.safetensors"
            fingerprint = save_dataset_file(shard, tmp)
            sha, size = store.add_file(tmp, move=True)
            shards.append((k, sha, size, fingerprint))
        key = SigningKey.create(staged.key_path)

        quota = (
            int(opts.max_upload_mb * 1024 * 1024)
            if opts.max_upload_mb > 0
            else expected_checkpoint_bytes(model) + 1024 * 1024
        )
        config = CoordinatorConfig(
            dataset=opts.dataset,
            dataset_fingerprint=dataset.fingerprint(),
            image_size=opts.image_size,
            experts=opts.experts,
            clustering={
                "method": clustering.method,
                "features": clustering.features,
                "seed": opts.seed,
                "sha256": clustering_sha,
                "sizes": clustering.sizes.tolist(),
            },
            model=model.to_dict(),
            train=train.to_dict(),
            router_model=router.to_dict(),
            router_train=router_train.to_dict(),
            lease_seconds=opts.lease_seconds,
            heartbeat_seconds=opts.heartbeat_seconds,
            max_upload_bytes=quota,
            database_url=opts.database_url,
        )
        registry = Registry(staged.database_url(config) if not opts.database_url else opts.database_url)
        registry.create()
        registry.add_artifact(clustering_sha, "clustering", clustering_size)
        for _, sha, size, _ in shards:
            registry.add_artifact(sha, "shard", size)
        registry.add_experts([(k, sha, fingerprint) for k, sha, _, fingerprint in shards])
        registry.close()
        staged.save_config(config)
        if home.root.exists():
            home.root.rmdir()  # empty, checked above
        build.rename(home.root)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return home, key.fingerprint


def lease_train_config(config: CoordinatorConfig, expert_id: int) -> TrainConfig:
    """The training settings an island gets for one expert: its own seed, nothing else differs."""
    settings = TrainConfig.from_dict(config.train)
    settings.seed += expert_id
    settings.checkpoint_every = max(1, math.ceil(settings.steps / 20))
    return settings
