"""`ddm-coordinator init`: cluster the dataset, hold a probe slice out of each cluster, cut one
shard per cluster from the rest, make the signing key, the TLS certificate and the registry.
With --latent, the autoencoder is packed into the store too: the experts' model is sized for
its latents, and islands encode their shards (or siloed data) with it.
Everything is built in a temporary folder beside the home and renamed into place at the end, so
a failed init leaves nothing half made."""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ddm_model.autoencoder import Autoencoder, pack, read_folder
from ddm_model.clustering import cluster_dataset
from ddm_model.data import load_dataset, save_dataset_file
from ddm_model.dit import DiT, DiTConfig
from ddm_model.probe import hold_out
from ddm_model.router import DEFAULT_ROUTER_SHARE, RouterConfig
from ddm_model.train import TrainConfig

from .home import MODES, CoordinatorConfig, Home, HomeError
from .keys import SigningKey
from .registry import Registry
from .store import Store
from .tls import write_certificate


@dataclass
class InitOptions:
    home: Path
    dataset: str = "digits"
    experts: int = 4
    preset: str = "small"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    router_preset: str | None = None  # None: the experts' own preset
    router_steps: int | None = None  # None: as many as cost router_share of the experts' FLOPs
    router_share: float | None = None  # None: DEFAULT_ROUTER_SHARE
    router_lr: float = 1e-3
    clustering: str = "kmeans2"
    features: str = "pixels"
    feature_weights: str | None = None
    seed: int = 0
    image_size: int | None = None
    channels: int | None = None  # siloed mode only: the coordinator cannot read it off data
    mode: str = "shared"
    router_samples: int = 1024  # siloed mode: samples drawn from each expert for the router
    lease_seconds: float = 120.0
    heartbeat_seconds: float = 10.0
    max_upload_mb: float = 0.0
    database_url: str = ""
    tls_names: tuple[str, ...] = ()  # names (DNS or IP) the TLS certificate adds to localhost and the hostname
    probe_margin: float = 0.05
    class_conditional: bool = False  # experts and router conditioned on the class label
    classes: int | None = None  # siloed mode with class_conditional: the class count (no data to read it off)
    latent: str | None = None  # a local diffusers AutoencoderKL folder: experts train on its latents
    require_dp_epsilon: float | None = None  # siloed mode: sign only experts private to this epsilon


def expected_checkpoint_bytes(model_config: DiTConfig) -> int:
    """Size of the float32 weights of an expert; the header adds a few KiB. A large model is
    counted on the meta device, without allocating it; a small one is built for real, because
    the meta device's first use costs more (1.5 s of imports) than building it."""
    trunk = model_config.trunk
    small = 12 * trunk.depth * trunk.hidden**2 < 20_000_000
    with torch.device("cpu" if small else "meta"):
        model = DiT(model_config)
    return sum(t.numel() * 4 for t in model.state_dict().values())


def init_home(opts: InitOptions) -> tuple[Home, str]:
    """Create a coordinator home; returns it and the signing key's fingerprint (the TLS
    certificate's is ``tls.home_fingerprint(home)``)."""
    home = Home(opts.home)
    if home.exists():
        raise HomeError(f"{home.root} is already a coordinator home; pick another folder")
    if home.root.exists() and any(home.root.iterdir()):
        raise HomeError(f"{home.root} exists and is not empty; pick a new or empty folder")
    if opts.lease_seconds <= 0 or opts.heartbeat_seconds <= 0 or opts.heartbeat_seconds >= opts.lease_seconds:
        raise HomeError("need 0 < heartbeat seconds < lease seconds")
    if opts.mode not in MODES:
        raise HomeError(f"unknown mode {opts.mode!r}; use {' or '.join(MODES)}")
    if not 0 < opts.probe_margin < 1:
        raise HomeError(f"--probe-margin must lie strictly between 0 and 1, got {opts.probe_margin}")
    check_dp_requirement(opts)

    # Validate every setting before the slow work.
    if opts.mode == "siloed":
        if opts.image_size is None or opts.channels is None:
            raise HomeError("siloed mode needs --image-size and --channels: the coordinator sees no data to read them")
        dataset, image_size, channels = None, opts.image_size, opts.channels
    else:
        dataset = load_dataset(opts.dataset, image_size=opts.image_size)
        image_size, channels = dataset.image_size, dataset.channels
    num_classes = class_count(opts, dataset)
    autoencoder = None if opts.latent is None else read_autoencoder(opts.latent, image_size, channels)
    # The experts' space: the images, or the autoencoder's latents of them.
    if autoencoder is None:
        space = (image_size, channels)
    else:
        latent_channels, latent_size, _ = autoencoder.latent_shape(image_size)
        space = (latent_size, latent_channels)
    model = DiTConfig(opts.preset, *space, num_classes=num_classes)
    router_preset = opts.router_preset or opts.preset
    router = RouterConfig(router_preset, *space, opts.experts, num_classes=num_classes)
    share = DEFAULT_ROUTER_SHARE if opts.router_share is None else opts.router_share
    if opts.router_steps is not None and opts.router_share is not None:
        raise HomeError("--router-steps fixes the router's steps; it does not go with --router-share")
    if not 0 < share < 1:
        raise HomeError(f"--router-share must lie strictly between 0 and 1, got {share}")
    train = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed)
    router_steps = 0 if opts.router_steps is None else opts.router_steps  # 0: chosen at assembly
    router_train = TrainConfig(steps=router_steps, batch_size=opts.batch_size, lr=opts.router_lr, seed=opts.seed)
    if opts.mode == "siloed" and opts.router_samples < 1:
        raise HomeError("--router-samples must be at least 1")

    home.root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{home.root.name}.init-", dir=home.root.parent))
    try:
        staged = Home(build)
        store = Store(staged.artifacts, staged.staging)
        if dataset is None:
            experts = [(k, "", "") for k in range(opts.experts)]  # each island brings its own data
            artifacts, clustering = [], {}
        else:
            experts, artifacts, clustering = _cut_shards(opts, dataset, staged, store)
        described = {}
        if autoencoder is not None:
            packed = staged.root / "autoencoder.safetensors"
            pack(autoencoder, packed)
            sha, size = store.add_file(packed, move=True)
            artifacts.append((sha, "autoencoder", size))
            described = {
                **autoencoder.describe(),
                "sha256": sha,
                "size": size,
                "image": [channels, image_size, image_size],
            }
        key = SigningKey.create(staged.key_path)
        write_certificate(staged, list(opts.tls_names))
        quota = (
            int(opts.max_upload_mb * 1024 * 1024)
            if opts.max_upload_mb > 0
            else expected_checkpoint_bytes(model) + 1024 * 1024
        )
        config = CoordinatorConfig(
            dataset="" if dataset is None else opts.dataset,
            dataset_fingerprint="" if dataset is None else dataset.fingerprint(),
            image_size=opts.image_size,
            experts=opts.experts,
            clustering=clustering,
            model=model.to_dict(),
            train=train.to_dict(),
            router_model=router.to_dict(),
            router_train=router_train.to_dict(),
            router_share=share if opts.router_steps is None else 0.0,
            mode=opts.mode,
            router_samples=opts.router_samples,
            probe_margin=opts.probe_margin,
            lease_seconds=opts.lease_seconds,
            heartbeat_seconds=opts.heartbeat_seconds,
            max_upload_bytes=quota,
            database_url=opts.database_url,
            autoencoder=described,
            require_dp_epsilon=opts.require_dp_epsilon,
        )
        registry = Registry(staged.database_url(config) if not opts.database_url else opts.database_url)
        registry.create()
        for sha, kind, size in artifacts:
            registry.add_artifact(sha, kind, size)
        registry.add_experts(experts)
        registry.close()
        staged.save_config(config)
        if home.root.exists():
            home.root.rmdir()  # empty, checked above
        build.rename(home.root)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return home, key.fingerprint


def read_autoencoder(folder: str, image_size: int, channels: int) -> Autoencoder:
    """The --latent autoencoder, checked against the images it will encode."""
    autoencoder = read_folder(folder)
    if channels not in (1, autoencoder.in_channels):
        raise HomeError(
            f"the images have {channels} channels; the autoencoder in {folder} reads {autoencoder.in_channels}"
            " (or grey images)"
        )
    autoencoder.latent_shape(image_size)  # an image size it divides
    return autoencoder


def check_dp_requirement(opts: InitOptions) -> None:
    """--require-dp-epsilon: a positive finite epsilon, in siloed mode only. In shared mode the
    coordinator trains the router (and a student) on the data itself, outside any island's
    guarantee, so the ensemble would not be private whatever the experts are."""
    epsilon = opts.require_dp_epsilon
    if epsilon is None:
        return
    if opts.mode != "siloed":
        raise HomeError(
            "--require-dp-epsilon is for siloed mode: in shared mode the coordinator trains the router on"
            " the data itself, outside any island's privacy guarantee"
        )
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise HomeError(f"--require-dp-epsilon must be a positive number, got {epsilon}")


def class_count(opts: InitOptions, dataset) -> int:
    """The experts' (and router's) number of classes: 0 unless --class-conditional; then the
    dataset's class count (shared mode) or --classes (siloed mode, where no data is here)."""
    if not opts.class_conditional:
        if opts.classes is not None:
            raise HomeError("--classes goes with --class-conditional")
        return 0
    if dataset is None:
        if opts.classes is None or opts.classes < 1:
            raise HomeError("siloed mode with --class-conditional needs --classes N: no data is here to count them")
        return opts.classes
    if opts.classes is not None:
        raise HomeError("--classes is for siloed mode; shared mode counts the classes of its dataset")
    if dataset.labels is None or dataset.num_classes < 1:
        raise HomeError(f"--class-conditional needs labelled data, and {opts.dataset} has no labels")
    return dataset.num_classes


def _cut_shards(opts: InitOptions, dataset, staged: Home, store: Store):
    """Shared mode: cluster the dataset, keep each cluster's probe slice in the home and store
    one content-addressed shard per cluster of the rest. Returns the expert rows, the artifacts
    (sha256, kind, size) and the clustering summary."""
    clustering = cluster_dataset(
        dataset,
        opts.experts,
        method=opts.clustering,
        features=opts.features,
        seed=opts.seed,
        weights=opts.feature_weights,
    )
    clustering.save(staged.clustering_path)
    clustering_sha, clustering_size = store.add_file(staged.clustering_path)
    experts, artifacts = [], [(clustering_sha, "clustering", clustering_size)]
    probe = {"sizes": [], "fingerprints": []}
    staged.probe_path(0).parent.mkdir()
    for k in range(opts.experts):
        train_ids, probe_ids = hold_out(clustering.members(k), opts.seed, k)
        held = dataset.subset(probe_ids, name=f"{dataset.name}-cluster-{k}-probe")
        probe["fingerprints"].append(save_dataset_file(held, staged.probe_path(k)))
        probe["sizes"].append(len(probe_ids))
        shard = dataset.subset(train_ids, name=f"{dataset.name}-cluster-{k}")
        tmp = staged.root / f"shard-{k}.safetensors"
        fingerprint = save_dataset_file(shard, tmp)
        sha, size = store.add_file(tmp, move=True)
        experts.append((k, sha, fingerprint))
        artifacts.append((sha, "shard", size))
    summary = {
        "method": clustering.method,
        "features": clustering.features,
        "seed": opts.seed,
        "sha256": clustering_sha,
        "sizes": clustering.sizes.tolist(),
        "probe": probe,  # held out of every shard and index list; see ddm_model/probe.py
    }
    return experts, artifacts, summary


def lease_train_config(config: CoordinatorConfig, expert_id: int) -> TrainConfig:
    """The training settings an island gets for one expert: its own seed, nothing else differs."""
    settings = TrainConfig.from_dict(config.train)
    settings.seed += expert_id
    settings.checkpoint_every = max(1, math.ceil(settings.steps / 20))
    return settings
