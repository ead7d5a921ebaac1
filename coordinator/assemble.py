"""Router training and ensemble publication, done by the coordinator itself.

Once every expert is signed (or on `ddm-coordinator assemble`, with the experts signed so
far, at least two), the coordinator trains the router with ddm_model: on the clustered dataset
in shared mode, and in siloed mode, where it holds no data, on samples drawn from the experts
themselves. It stores the router as an artifact and publishes a manifest that names the router
and the experts by sha256, signed as a whole. Router training keeps resume state under HOME/work,
so a coordinator restarted mid-way continues where it stopped.

The router's steps are fixed by `init --router-steps`, or else chosen here to cost
``config.router_share`` of the signed experts' training FLOPs (each signed entry carries its
own); the manifest's router entry says how (``budget``). The manifest also carries the experts'
shares of the data (protocol/shares.py), so that any downloader can route ancestrally: the
cluster sizes and per-class counts in shared mode; in siloed mode the counts islands reported
with ``join --share-counts`` when every signed expert did, else uniform shares.

Exactly one process assembles at a time: it holds the registry's "assembly" lock (a
PostgreSQL advisory lock, or an flock beside a SQLite file) for as long as it trains and
publishes. The lock dies with its process, so an ensemble left "training" while nobody holds it
was interrupted: the next holder marks it failed and assembles again, resuming the router
from its state under HOME/work (on storage that every `serve` process shares).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ddm_model.checkpoint import load_checkpoint
from ddm_model.clustering import Clustering
from ddm_model.data import ImageDataset, load_dataset
from ddm_model.errors import DDMError
from ddm_model.router import RouterConfig, expert_samples, router_metrics, router_steps_for, router_warmup
from ddm_model.train import TrainConfig, router_step_flops, train_router
from protocol.manifest import Manifest
from protocol.shares import uniform

from .faults import fault_point
from .home import CoordinatorConfig, Home
from .keys import SigningKey
from .latents import in_model_space
from .registry import Registry
from .store import Store

log = logging.getLogger("ddm.coordinator")
LOCK = "assembly"
BUSY_WAIT_S = 30.0  # `assemble` waits this long for another process's assembly to end


class AssembleError(DDMError):
    """An ensemble that cannot be assembled now; the message says why."""


class Assembler:
    def __init__(self, home: Home, config: CoordinatorConfig, registry: Registry, store: Store, key: SigningKey):
        self.home = home
        self.config = config
        self.registry = registry
        self.store = store
        self.key = key
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self) -> None:
        """Assemble in a background thread, if an ensemble is due and no thread (here) or process
        (elsewhere) is already at it."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run_logged, name="assemble", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_logged(self) -> None:
        try:
            while True:
                with self.registry.exclusive(LOCK, wait=False) as held:
                    if not held:
                        return  # another process is assembling; it checks again before it stops
                    self._take_over()
                    while self.registry.assembly_due():  # an expert signed meanwhile is not left out
                        ensemble_id = self._run(progress=False)
                        log.info("published ensemble %d", ensemble_id)
                # Checked after the release: an expert signed by another process just before it,
                # whose own request found the lock held, is assembled here.
                if not self.registry.assembly_due():
                    return
        except DDMError as exc:
            log.error("assembly failed: %s", exc)
        except Exception:
            log.exception("assembly failed")

    def _take_over(self) -> bool:
        """With the lock held: fail the assemblies left "training" by a process that ended
        (nobody else can be at them); whether there were any."""
        interrupted = self.registry.assemblies_in_training()
        for ensemble_id in interrupted:
            reason = "interrupted: its coordinator process ended (a crash or a restart); assembling again"
            self.registry.fail_ensemble(ensemble_id, reason)
        return bool(interrupted)

    def run(self, progress: Progress | bool = True) -> int:
        """Train the router over the experts signed so far (at least 2) and publish the ensemble;
        returns its id. Waits up to BUSY_WAIT_S for another process's assembly to end."""
        waited = time.monotonic() + BUSY_WAIT_S
        while True:
            with self.registry.exclusive(LOCK, wait=False) as held:
                if held:
                    self._take_over()
                    return self._run(progress)
            if time.monotonic() > waited:
                raise AssembleError(
                    "another coordinator process is assembling this home's ensemble; wait for it to publish"
                    " (`ddm-coordinator status`), then run assemble again if you still need to"
                )
            time.sleep(0.5)

    def _run(self, progress: Progress | bool) -> int:
        signed = [e for e in self.registry.experts() if e.state == "signed"]
        if len(signed) < 2:
            raise AssembleError(f"an ensemble needs at least 2 signed experts; {len(signed)} are signed")
        entries = [json.loads(e.entry_json) for e in signed]
        router_cfg = RouterConfig.from_dict({**self.config.router_model, "num_clusters": len(signed)})
        router_train = TrainConfig.from_dict(self.config.router_train)
        budget = router_budget(self.config, router_cfg, router_train, entries)
        router_train.steps = budget["steps"]
        if budget["rule"] == "share":  # a few hundred steps: warm up over a tenth of them
            router_train.warmup = router_warmup(router_train.steps, router_train.warmup)
        ensemble_id = self.registry.start_ensemble(len(signed), router_train.steps)
        try:
            return self._assemble(ensemble_id, signed, entries, router_cfg, router_train, budget, progress)
        except BaseException as exc:
            self.registry.fail_ensemble(ensemble_id, str(exc) or type(exc).__name__)
            raise

    def _assemble(
        self,
        ensemble_id: int,
        signed: list,
        entries: list[dict],
        router_cfg: RouterConfig,
        router_train: TrainConfig,
        budget: dict,
        progress,
    ) -> int:
        # Router output i is the i-th signed expert, whatever its cluster id.
        clusters = [e.cluster_id for e in signed]
        num_classes = router_cfg.num_classes
        if self.config.mode == "siloed":
            shares = island_shares(entries, num_classes)
            data, targets, source = self._expert_samples(signed, shares)
        else:
            data, targets = cluster_data(self.home, self.config, clusters)
            shares = cluster_shares(data, targets, len(clusters), num_classes)
            source = "the clustered dataset"

        def on_progress(step: int, loss: float, rate: float) -> None:
            self.registry.ensemble_progress(ensemble_id, step)
            fault_point("router.training")

        result = train_router(
            data,
            targets,
            router_cfg,
            router_train,
            checkpoint_dir=self._resume_dir(signed),
            progress=progress,
            description="router",
            on_progress=on_progress,
        )
        labels = data.labels if num_classes else None
        metrics = {
            **router_metrics(result.model, data.images, targets, labels, router_train.seed),
            "trained_on": source,
        }
        staged = self.home.work / f"router-{ensemble_id}.safetensors"
        result.export(staged, data.fingerprint() if self.config.mode == "shared" else "", metrics=metrics)
        router_sha, router_size = self.store.add_file(staged, move=True)
        fault_point("router.stored")
        manifest = Manifest.build(
            ensemble_id,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            mode=self.config.mode,
            dataset={"name": self.config.dataset, "fingerprint": self.config.dataset_fingerprint},
            clustering_sha256=self.config.clustering.get("sha256", ""),
            router={
                "sha256": router_sha,
                "size": router_size,
                "config": router_cfg.to_dict(),
                "steps": result.steps,
                "flops": result.flops,
                "budget": {k: v for k, v in budget.items() if k != "steps"},
                "metrics": metrics,
                "clusters": clusters,
            },
            experts=[(e.entry_json, e.signature) for e in signed],
            shares=shares,
            autoencoder=self.config.autoencoder or None,
        )
        manifest_json, signature = self.key.sign(manifest.data)
        self.registry.publish_ensemble(
            ensemble_id, router_sha, router_size, [e.checkpoint_sha256 for e in signed], manifest_json, signature
        )
        return ensemble_id

    def _resume_dir(self, signed: list) -> Path:
        """Where router training keeps its resume state: one folder per set of inputs the router
        learns from. In shared mode that is the clusters' data alone; in siloed mode the samples
        come from the experts themselves, so a retrained expert (after an exclusion) needs a
        fresh run, not the resume state of its predecessor."""
        key = "-".join(str(e.cluster_id) for e in signed)
        if self.config.mode == "siloed":
            key += "-" + hashlib.sha256("".join(e.checkpoint_sha256 for e in signed).encode()).hexdigest()[:16]
        return self.home.work / f"router-{key}"

    def _expert_samples(self, signed: list, shares: dict) -> tuple[ImageDataset, torch.Tensor, str]:
        experts = [
            load_checkpoint(
                self.store.path(e.checkpoint_sha256), expect_kind="expert", expect_config=self.config.model
            )[0]
            for e in signed
        ]
        per_expert = None
        if shares["source"] == "islands":  # as many samples of each expert as its island has data
            total, counts = self.config.router_samples * len(signed), shares["clusters"]
            per_expert = [max(1, round(total * c / sum(counts))) for c in counts]
        return samples_from_experts(self.config, experts, per_expert)


def router_budget(config: CoordinatorConfig, router_cfg: RouterConfig, train: TrainConfig, entries: list[dict]) -> dict:
    """The router's steps and how they were chosen: fixed (``init --router-steps``, and homes made
    before the share existed), or as many as cost ``config.router_share`` of the signed experts'
    total training FLOPs at the router's measured FLOPs per step."""
    expert_flops = sum(int(entry.get("flops", 0)) for entry in entries)
    if config.router_share <= 0:
        return {"steps": train.steps, "rule": "fixed", "share": None, "expert_flops": expert_flops, "step_flops": None}
    # A step's FLOPs depend on the shapes alone: measured on one batch of blank images.
    c, size, n = router_cfg.in_channels, router_cfg.image_size, train.batch_size
    labels = torch.zeros(n, dtype=torch.int64) if router_cfg.num_classes else None
    blank = ImageDataset(torch.zeros(n, c, size, size), torch.arange(n), labels, router_cfg.num_classes, "blank")
    step_flops = router_step_flops(blank, router_cfg, n)
    steps = router_steps_for(config.router_share, expert_flops, step_flops)
    return {
        "steps": steps,
        "rule": "share",
        "share": config.router_share,
        "expert_flops": expert_flops,
        "step_flops": step_flops,
    }


def cluster_shares(data: ImageDataset, targets: torch.Tensor, experts: int, num_classes: int) -> dict:
    """Shared mode: each router output's cluster size and, where the data has labels, its
    per-class counts (as many classes as the model has, or the data if more)."""
    clusters = torch.bincount(targets, minlength=experts).tolist()
    classes = None
    if data.labels is not None:
        width = max(num_classes, data.num_classes)
        classes = [torch.bincount(data.labels[targets == k], minlength=width).tolist() for k in range(experts)]
    return {"source": "clusters", "clusters": clusters, "classes": classes}


def island_shares(entries: list[dict], num_classes: int) -> dict:
    """Siloed mode: the counts islands reported (checked when their checkpoints were signed), if
    every signed expert's island reported them; else uniform shares."""
    counts = [entry.get("counts") for entry in entries]
    if any(c is None for c in counts):
        return uniform(len(entries))
    classes = [c["class_counts"] for c in counts] if num_classes else None
    return {"source": "islands", "clusters": [c["samples"] for c in counts], "classes": classes}


def cluster_data(home: Home, config: CoordinatorConfig, clusters: list[int]) -> tuple[ImageDataset, torch.Tensor]:
    """Shared mode: the samples of the given clusters, labelled by their index in ``clusters``, in
    the experts' space (their latents in a latent home)."""
    dataset = load_dataset(config.dataset, image_size=config.image_size)
    if dataset.fingerprint() != config.dataset_fingerprint:
        raise AssembleError(f"the dataset at {config.dataset} changed since init (fingerprint differs)")
    clustering = Clustering.load(home.clustering_path)
    ids = np.concatenate([clustering.members(c) for c in clusters])
    labels = np.concatenate([np.full(len(clustering.members(c)), i) for i, c in enumerate(clusters)])
    order = np.argsort(ids, kind="stable")
    subset = dataset.subset(ids[order], name=f"{dataset.name}[clusters {clusters}]")
    return in_model_space(home, config, subset), torch.from_numpy(labels[order])


def samples_from_experts(
    config: CoordinatorConfig, experts: list, per_expert: list[int] | None = None
) -> tuple[ImageDataset, torch.Tensor, str]:
    """Siloed mode: no real data exists here, so learn from ``config.router_samples`` samples
    drawn from each expert (or ``per_expert[k]`` from expert k), labelled with that expert's
    index; a class-conditional expert's samples are drawn for uniformly random classes, which
    the returned dataset carries as its labels. Returns them and a description."""
    shape = (config.model["in_channels"], config.model["image_size"], config.model["image_size"])
    n, steps = config.router_samples, config.router_sampling_steps
    num_classes = config.model.get("num_classes", 0)
    images, labels, classes = expert_samples(
        experts, per_expert or n, shape, steps=steps, seed=config.router_train["seed"], num_classes=num_classes
    )
    ids = torch.arange(len(images), dtype=torch.int64)
    data = ImageDataset(images, ids, classes, num_classes if classes is not None else 0, name="expert samples")
    if per_expert is None:
        return data, labels, f"{n} samples drawn from each expert ({steps} Euler steps)"
    drawn = f"{sum(per_expert)} samples drawn from the experts in proportion to their islands' counts"
    return data, labels, f"{drawn} ({per_expert}, {steps} Euler steps)"
