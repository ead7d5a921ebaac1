"""`ddm-client join`: the island's life.

enroll (once; the identity stays in the state folder) -> lease -> fetch and verify the
cluster's data -> train locally with resume state and a heartbeat thread -> upload the
finished checkpoint (resumable) -> check the coordinator's signature on it -> next lease, or
exit with --once. A killed island restarted with the same state folder gets its lease back,
resumes training from its last local checkpoint and resumes an interrupted upload from the
coordinator's committed offset. With --nproc-per-node N, N local processes train the expert
(``nodes``) and this one alone still talks to the coordinator.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from rich.console import Console

from ddm_model.autoencoder import Autoencoder
from ddm_model.checkpoint import read_checkpoint_header
from ddm_model.data import DataError, ImageDataset, load_dataset, load_dataset_file
from ddm_model.dit import DiTConfig
from ddm_model.privacy import DPConfig
from ddm_model.progress import transfer_bar
from ddm_model.train import TrainConfig, TrainStopped
from protocol import ddm_pb2 as pb
from protocol.address import is_loopback, split_address
from protocol.limits import MAX_NAME_CHARS, MAX_REASON_CHARS
from protocol.shares import COUNTS_KEY
from protocol.trust import TrustError, is_sha256, key_fingerprint

from .connection import ClientError, Connection
from .latents import in_model_space, lease_autoencoder
from .nodes import ExpertJob, check_nproc, launch, run_job, split_error
from .outbox import settle_outbox, upload_lease
from .state import Identity, IslandState
from .tls import TlsSettings, first_contact_error, resolve
from .transfer import bar_callback, download_artifact

console = Console(stderr=True)


def tofu_warning(fingerprint: str) -> None:
    console.print(
        f"[yellow]warning:[/yellow] trusting the coordinator key {fingerprint} on first use; "
        "pass --fingerprint to pin the key you were given",
        highlight=False,
        soft_wrap=True,
    )


# What AcquireLeaseRequest.local_dataset carries for an island with its own copy of the shared
# dataset: the coordinator only asks whether it is set (then it sends an index list, not a
# shard), and where the copy lies on the island's disk, or what the island calls it, is none of
# its business. The island checks its copy against the lease's dataset fingerprint itself.
OWN_COPY = "own-copy"


class LeaseLost(ClientError):
    """The coordinator gave the lease's expert to another island."""


class Unfit(ClientError):
    """This island cannot train the lease: ``reason`` is what the coordinator is told (nothing
    about the data beyond that it does not fit), the message what the island's operator reads."""

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message or reason)
        self.reason = reason


@dataclass
class JoinOptions:
    coordinator: str
    state_dir: Path
    token: str | None = None
    name: str = ""
    device: str = "cpu"
    once: bool = False
    dataset: str | None = None  # a local copy of the shared dataset: receive index lists, not shards
    data: str | None = None  # siloed mode: this island's own data, which never leaves it
    fingerprint: str | None = None  # pin the coordinator's key at enrollment
    threads: int | None = None
    tls: TlsSettings | None = None  # the TLS flags given; see tls_for
    share_counts: bool = False  # siloed mode: report the data's sample (and class) counts with the checkpoint
    nproc_per_node: int = 1  # train each expert with DDP over this many local processes (nodes.py)
    dp: DPConfig | None = None  # train each expert with DP-SGD to this guarantee (ddm_model.privacy)


def tls_for(state: IslandState, coordinator: str, flags: TlsSettings | None) -> TlsSettings:
    """How to reach the coordinator: the flags, then $DDM_TLS_FINGERPRINT, then the settings
    saved with this state folder's identity."""
    saved = state.identity()
    tls = resolve(flags, saved.tls_settings if saved else None, coordinator)
    try:
        remote = not is_loopback(split_address(coordinator)[0])
    except ValueError:
        remote = True
    if tls.insecure and remote:
        console.print(
            f"[yellow]warning:[/yellow] speaking plaintext to {coordinator} (--insecure): the credential and "
            "data cross the network unencrypted",
            highlight=False,
            soft_wrap=True,
        )
    return tls


def enroll(
    state: IslandState,
    coordinator: str,
    token: str | None,
    name: str,
    role: str,
    pin: str | None,
    tls: TlsSettings | None = None,
) -> Identity:
    """The identity kept in the state folder, or a new one from an invite token, enrolled over
    ``tls`` (which is saved with it).

    ``role`` is what a new enrollment must yield; an existing island identity also serves for
    downloads, but a reader identity cannot join.
    """
    identity = state.identity()
    if identity is not None and role == "island" and identity.role != "island":
        raise ClientError(
            f"{state.root} holds a {identity.role} identity, which may only download; "
            "use another --state-dir (and an island invite) to join"
        )
    if identity is not None:
        if identity.coordinator != coordinator:
            # The coordinator moved (or listens on a new port). The credential still has to pass
            # its check, and every signature is still checked against the key pinned at enrollment.
            console.print(
                f"[yellow]note:[/yellow] this identity was enrolled at {identity.coordinator}; using it with"
                f" {coordinator} (key {identity.key_fingerprint} stays pinned)",
                highlight=False,
                soft_wrap=True,
            )
            identity.coordinator = coordinator
            state.save_identity(identity)
            state.remember_key(coordinator, identity.key_fingerprint)
        return identity
    if not token:
        raise ClientError(f"no identity in {state.root} yet: pass --token with an invite from the coordinator")
    if tls is None:
        raise first_contact_error(coordinator)
    conn = Connection(coordinator, tls=tls)
    try:
        reply = conn.unary("Enroll", pb.EnrollRequest(token=token, name=name[:MAX_NAME_CHARS]))
    finally:
        conn.close()
    fingerprint = key_fingerprint(reply.coordinator_public_key)
    if fingerprint != reply.key_fingerprint:
        raise TrustError("the coordinator's key and its stated fingerprint disagree; refusing to enroll")
    if pin and fingerprint != pin:
        raise TrustError(f"the coordinator's key is {fingerprint}, not the pinned {pin}; refusing to enroll")
    if not pin:
        tofu_warning(fingerprint)
    if reply.role != role:
        raise ClientError(f"this token enrolls a {reply.role}, but a {role} is needed here")
    identity = Identity(
        coordinator=coordinator,
        island_id=reply.island_id,
        credential=reply.credential,
        role=reply.role,
        public_key_hex=reply.coordinator_public_key.hex(),
        key_fingerprint=fingerprint,
        tls=tls.to_json(),
    )
    state.save_identity(identity)
    state.remember_key(coordinator, fingerprint)
    console.print(
        f"enrolled as {reply.role} {reply.island_id}; coordinator key {fingerprint}", highlight=False, soft_wrap=True
    )
    return identity


class Heartbeat(threading.Thread):
    """Reports progress every interval; sets ``lost`` when the coordinator says the lease is gone."""

    def __init__(self, conn: Connection, lease_id: str, interval: float):
        super().__init__(name="heartbeat", daemon=True)
        self.conn = conn
        self.lease_id = lease_id
        self.interval = interval
        self.step, self.loss, self.rate = 0, math.nan, 0.0
        self.lost = threading.Event()
        self.reason = ""
        self._done = threading.Event()

    def update(self, step: int, loss: float, rate: float) -> None:
        self.step, self.loss, self.rate = step, loss, rate

    def beat(self) -> None:
        request = pb.HeartbeatRequest(
            lease_id=self.lease_id, step=self.step, loss=self.loss, images_per_second=self.rate
        )
        try:
            self.conn.unary("Heartbeat", request, timeout=max(self.interval, 5.0), retry=False)
        except ClientError as err:
            if err.code is not None and err.code.name in ("FAILED_PRECONDITION", "PERMISSION_DENIED"):
                self.reason = str(err)
                self.lost.set()
            # Anything else is transient: the next beat tries again.

    def run(self) -> None:
        while not self.lost.is_set():
            self.beat()
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=self.interval + 5)


def refuse_lease(conn: Connection, lease: pb.Lease, reason: str, message: str | None = None) -> NoReturn:
    """Give the lease back, telling the coordinator ``reason``, and stop with ``message``."""
    conn.unary("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease.lease_id, reason=reason[:MAX_REASON_CHARS]))
    raise ClientError(message or reason)


def siloed(lease: pb.Lease) -> bool:
    """A siloed coordinator's lease names no data: the island's own data is its cluster."""
    return lease.WhichOneof("data") is None


def load_silo(lease: pb.Lease, path: str | None, autoencoder: Autoencoder | None = None) -> ImageDataset:
    """The island's own data, checked against the model's image shape (for a latent lease, the
    images whose latents fit it) before any training; ``Unfit`` if it cannot serve the lease."""
    if not path:
        raise ClientError("this coordinator runs in siloed mode: pass --data PATH (your own image folder or .npz)")
    model = DiTConfig.from_dict(json.loads(lease.model_config_json))
    # Labels are read only for a class-conditional model: they are all it uses them for.
    data = load_dataset(path, labels=bool(model.num_classes))
    want = (model.in_channels, model.image_size, model.image_size)
    have = (data.channels, data.image_size, data.image_size)
    if autoencoder is not None:  # grey images are encoded as RGB
        size = model.image_size * autoencoder.factor
        want = (autoencoder.in_channels, size, size)
        have = (autoencoder.in_channels if data.channels == 1 else data.channels, *have[1:])

    # The coordinator hears only that the data does not fit, not what it is.
    if have != want:
        raise Unfit(
            f"the island's data does not fit the model's {want[0]}x{want[1]}x{want[2]} images",
            f"{path} holds {have[0]}x{have[1]}x{have[2]} images; this coordinator's model needs "
            f"{want[0]}x{want[1]}x{want[2]} (resize your data, e.g. an image folder of that size)",
        )
    if model.num_classes and data.labels is None:
        raise Unfit(
            "the island's data has no class labels for the class-conditional model",
            f"{path} has no class labels, and this coordinator's model is class-conditional ({model.num_classes}"
            " classes): give an .npz with a 'labels' array or an image folder with one subfolder per class",
        )
    if model.num_classes and data.num_classes > model.num_classes:
        raise Unfit(
            f"the island's labels do not fit the model's {model.num_classes} classes",
            f"{path} has labels up to {data.num_classes - 1}; this coordinator's model has classes 0 to"
            f" {model.num_classes - 1}",
        )
    return data


def fetch_data(
    conn: Connection,
    lease: pb.Lease,
    state: IslandState,
    local: str | None,
    silo: str | None = None,
    share_counts: bool = False,
    autoencoder: Autoencoder | None = None,
) -> ImageDataset:
    """The lease's cluster: the island's own data (siloed), or a shard or index list verified
    against the fingerprints the coordinator sent (shared). A lease the island cannot serve is
    given back with its reason. ``autoencoder``: a latent lease's (``latents.lease_autoencoder``),
    whose input the siloed data must fit."""
    try:
        return _fetch_data(conn, lease, state, local, silo, share_counts, autoencoder)
    except Unfit as exc:
        refuse_lease(conn, lease, exc.reason, str(exc))


def _fetch_data(
    conn: Connection,
    lease: pb.Lease,
    state: IslandState,
    local: str | None,
    silo: str | None,
    share_counts: bool,
    autoencoder: Autoencoder | None = None,
) -> ImageDataset:
    if siloed(lease):
        return load_silo(lease, silo, autoencoder)
    if silo:
        raise ClientError("--data is for siloed coordinators; this one shares its dataset (drop --data)")
    if share_counts:
        raise ClientError("--share-counts is for siloed coordinators; this one knows its clusters' sizes (drop it)")
    if lease.WhichOneof("data") == "shard":
        if not is_sha256(lease.shard.sha256):
            raise ClientError("the coordinator sent a malformed shard address")
        path = state.shards / f"{lease.shard.sha256}.safetensors"
        if not path.exists():
            with transfer_bar() as bar:
                on_bytes = bar_callback(bar, f"data shard {lease.shard.sha256[:12]}", lease.shard.size)
                download_artifact(conn, lease.shard.sha256, path, lease.shard.size, on_bytes)
        return load_dataset_file(path, expect_fingerprint=lease.shard_fingerprint)
    index = lease.index_list
    if not local:
        raise ClientError("the coordinator sent an index list but this island has no --dataset of its own")
    dataset = load_dataset(local)
    if dataset.fingerprint() != index.dataset_fingerprint:
        raise Unfit(
            f"the local dataset {local} has fingerprint {dataset.fingerprint()[:16]}…, the coordinator's"
            f" {index.dataset} has {index.dataset_fingerprint[:16]}…; refusing to train on a different copy",
        )
    try:
        shard = dataset.subset(list(index.ids), name=f"{dataset.name}-cluster-{lease.cluster_id}")
    except DataError as exc:
        raise Unfit(f"the coordinator's index list does not fit the local dataset: {exc}") from None
    if shard.fingerprint() != lease.shard_fingerprint:
        raise Unfit("the cluster cut from the local dataset does not match the coordinator's fingerprint")
    return shard


def finished_checkpoint(
    lease: pb.Lease, state: IslandState, data: ImageDataset, dp: DPConfig | None = None
) -> tuple[Path, Path | None]:
    """Where the lease's finished checkpoint goes in the outbox, and that path again if an
    earlier run already finished it (same steps, same model, and private as ``dp`` asks or not
    private at all without it), else None."""
    model_cfg = DiTConfig.from_dict(json.loads(lease.model_config_json))
    steps = TrainConfig.from_dict(json.loads(lease.train_config_json)).steps
    out = state.outbox / f"expert-{lease.expert_id}-{data.fingerprint()[:16]}.safetensors"
    if out.exists():
        info, _ = read_checkpoint_header(out)
        if info.steps == steps and info.model == model_cfg.to_dict() and private_as_asked(info.privacy, dp):
            return out, out
    return out, None


def private_as_asked(guarantee: dict | None, dp: DPConfig | None) -> bool:
    """Whether a finished checkpoint's guarantee (or its lack) is what ``dp`` asks for."""
    if dp is None or guarantee is None:
        return dp is None and guarantee is None
    same = all(guarantee[name] == getattr(dp, name) for name in ("clip", "noise_pairs", "accountant"))
    return same and guarantee["epsilon"] <= dp.epsilon and (dp.delta is None or guarantee["delta"] == dp.delta)


def expert_job(
    lease: pb.Lease,
    state: IslandState,
    data: ImageDataset,
    out: Path,
    device: str = "cpu",
    threads: int | None = None,
    nproc: int = 1,
    share_counts: bool = False,
    images: ImageDataset | None = None,
    dp: DPConfig | None = None,
) -> ExpertJob:
    """The lease's expert as a training job on ``data``, resumable from the state folder's work
    directory. For a latent lease ``data`` holds the latents of ``images``, the cluster's own
    samples, whose fingerprint the checkpoint names. ``dp``: train it with DP-SGD."""
    model_cfg = DiTConfig.from_dict(json.loads(lease.model_config_json))
    train_cfg = TrainConfig.from_dict(json.loads(lease.train_config_json))
    train_cfg.device = device
    fingerprint = data.fingerprint()
    source = fingerprint if images is None else images.fingerprint()
    processes = f", {nproc} processes" if nproc > 1 else ""
    return ExpertJob(
        model=model_cfg,
        train=train_cfg,
        checkpoint_dir=state.work(lease.expert_id),
        out=out,
        description=f"expert {lease.expert_id} ({len(data)} imgs{processes})",
        data_fingerprint=fingerprint,
        # A siloed island sends no fingerprint of its data, not even a hash; its counts only if it opts in.
        export_fingerprint="" if siloed(lease) else source,
        cluster_id=lease.cluster_id,
        metrics={COUNTS_KEY: data_counts(data, model_cfg.num_classes)} if share_counts else None,
        threads=threads or max(1, torch.get_num_threads() // nproc),
        privacy=None if dp is None else dp.to_dict(),
    )


def train_lease(
    heartbeat: Heartbeat,
    lease: pb.Lease,
    state: IslandState,
    data: ImageDataset,
    opts: JoinOptions,
    autoencoder: Autoencoder | None = None,
) -> Path:
    """Train (or resume) the lease's expert, in this process or with --nproc-per-node N in N, on
    ``data`` or, for a latent lease, on its latents under ``autoencoder``; returns the finished
    checkpoint in the outbox."""
    out, done = finished_checkpoint(lease, state, data, opts.dp)
    if done is not None:
        info, _ = read_checkpoint_header(done)
        console.print(f"expert {lease.expert_id}: already trained, uploading {done.name}", highlight=False)
        heartbeat.update(info.steps, info.metrics.get("final_loss", math.nan), 0.0)
        return done
    nproc = opts.nproc_per_node
    trained_on = in_model_space(data, autoencoder, state)
    job = expert_job(
        lease, state, trained_on, out, opts.device, opts.threads, nproc, opts.share_counts, images=data, dp=opts.dp
    )
    report = heartbeat.update
    if opts.dp is not None:  # a private run's losses are statistics of the data: they stay here

        def report(step: int, loss: float, rate: float) -> None:
            heartbeat.update(step, math.nan, rate)

    try:
        if nproc == 1:
            return run_job(job, trained_on, on_progress=report, stop=heartbeat.lost)
        return launch(job, trained_on, nproc, on_progress=report, stop=heartbeat.lost)
    except TrainStopped:
        raise LeaseLost(f"lease {lease.lease_id} was lost ({heartbeat.reason}); training stopped") from None


def data_counts(data: ImageDataset, num_classes: int) -> dict:
    """What `join --share-counts` reports (protocol/shares.py): the sample count, and for a
    class-conditional model the count of each class."""
    counts = {"samples": len(data)}
    if num_classes:
        counts["class_counts"] = torch.bincount(data.labels, minlength=num_classes).tolist()
    return counts


def check_dp(opts: JoinOptions) -> None:
    """Refuse, in one line, what cannot go with --dp-epsilon."""
    if opts.dp is None:
        return
    if opts.nproc_per_node > 1:
        raise ClientError("--dp-epsilon trains in one process; drop --nproc-per-node")
    if opts.share_counts:
        raise ClientError(
            "--share-counts reports exact data counts, which the --dp-epsilon guarantee does not cover; drop one"
        )


def dp_requirement_error(lease: pb.Lease, dp: DPConfig | None) -> tuple[str, str] | None:
    """(what the coordinator is told, what the operator reads) when the lease asks for a
    differential-privacy guarantee this island was not started to give, else None."""
    required = lease.require_dp_epsilon
    if required <= 0 or (dp is not None and dp.epsilon <= required):
        return None
    reason = "the island does not train with differential privacy at the required epsilon"
    asked = "without differential privacy" if dp is None else f"with --dp-epsilon {dp.epsilon:g}"
    return reason, (
        f"this coordinator signs only experts private to epsilon <= {required:g}, and this island was started"
        f" {asked}: rejoin with --dp-epsilon {required:g} (or less)"
    )


def run_island(opts: JoinOptions) -> int:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ClientError("--device cuda was asked for but this PyTorch sees no CUDA GPU")
    check_nproc(opts.nproc_per_node, opts.device)
    check_dp(opts)
    state = IslandState(opts.state_dir)
    tls = tls_for(state, opts.coordinator, opts.tls)
    identity = enroll(state, opts.coordinator, opts.token, opts.name, "island", opts.fingerprint, tls)
    conn = Connection(opts.coordinator, identity.credential, tls=tls)
    try:
        settle_outbox(conn, identity, state)
        while True:
            reply = conn.unary("AcquireLease", pb.AcquireLeaseRequest(local_dataset=OWN_COPY if opts.dataset else ""))
            state.remember_tls(identity, tls)
            if reply.WhichOneof("result") == "no_work":
                console.print(f"no work: {reply.no_work.reason}", highlight=False)
                if reply.no_work.finished or opts.once:
                    return 0
                time.sleep(max(1, reply.no_work.retry_after_s))
                continue
            lease = reply.lease
            console.print(
                f"lease {lease.lease_id}: expert {lease.expert_id} on cluster {lease.cluster_id}",
                highlight=False,
            )
            nproc = opts.nproc_per_node
            unsplittable = split_error(TrainConfig.from_dict(json.loads(lease.train_config_json)).batch_size, nproc)
            if unsplittable:
                refuse_lease(conn, lease, f"the island cannot split the batch over {nproc} processes", unsplittable)
            required = dp_requirement_error(lease, opts.dp)
            if required:
                refuse_lease(conn, lease, required[0], required[1])
            autoencoder = lease_autoencoder(conn, lease, state, opts.device)
            data = fetch_data(conn, lease, state, opts.dataset, opts.data, opts.share_counts, autoencoder)
            heartbeat = Heartbeat(conn, lease.lease_id, lease.heartbeat_interval_s)
            heartbeat.start()  # beats through training and upload alike
            try:
                checkpoint = train_lease(heartbeat, lease, state, data, opts, autoencoder)
                digest = upload_lease(conn, lease, identity, checkpoint, state)
            except LeaseLost as lost:
                console.print(f"[yellow]{lost}[/yellow]", highlight=False)
                if opts.once:
                    return 1
                continue
            finally:
                heartbeat.stop()
            console.print(f"expert {lease.expert_id} signed by the coordinator ({digest[:12]})", highlight=False)
            if opts.once:
                return 0
    finally:
        conn.close()
