"""Train a ddm expert at a Flower node: the ClientApp (flwr, the ``flower`` extra).

The ServerApp (coordinator/flower_server.py) sends a "train.expert" message holding the lease
exactly as a ddm island receives it. This node trains the expert with ddm's own loop on its own
data and answers with the finished checkpoint, which the coordinator validates and signs as it
does every upload. Training resumes from the node's local checkpoints after a restart, and a
finished checkpoint is answered at once if the lease comes again (a rerun of `flwr run`).

The node's settings come from its operator (``flower-supernode --node-config``):

    data-dir   siloed mode: this site's images (an image folder or an .npz); they never leave it
    state-dir  where resume state and finished checkpoints are kept (default ~/.ddm-flower)
    device     cpu (default), cuda, cuda:1, ...
    threads    CPU threads for training (default: what torch chooses)
    share-counts  true: report the data's sample (and class) counts with the checkpoint
    upload     "reply": always answer with the checkpoint, even when the ServerApp offers
               ddm's port; default: upload through that port when offered and reachable

When the ServerApp serves ddm's gRPC port, the message names it: the checkpoint then goes
through ddm's resumable upload, pinned to the certificate the message names, and the reply
carries its digest alone. A port that cannot be reached (or refuses the connection) falls back
to the checkpoint inside the reply.

The coordinator hears only that the data does not fit the model, never what it is: the
details go to this node's log. Nothing else in ddm imports this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ddm_model.data import DataError, ImageDataset, load_dataset_file
from ddm_model.errors import DDMError
from ddm_model.fsutil import atomic_path
from ddm_model.progress import log_to_stderr
from protocol import ddm_pb2 as pb
from protocol.flower import CHECKPOINT, FILE, FORMAT, RAW, RECORD, SHARD, UPLOAD
from protocol.limits import MAX_REASON_CHARS
from protocol.trust import key_fingerprint

from .connection import ClientError, Connection
from .island import Unfit, expert_job, finished_checkpoint, load_silo, siloed
from .nodes import run_job
from .outbox import upload_lease
from .state import Identity, IslandState
from .tls import TlsSettings

log = logging.getLogger("ddm.client")
PORT_ATTEMPTS = 3  # tries of ddm's port before the checkpoint goes in the reply instead


@dataclass(frozen=True)
class NodeSettings:
    data_dir: str | None
    state_dir: Path
    device: str = "cpu"
    threads: int | None = None
    share_counts: bool = False
    upload: str = "port"  # or "reply"

    @classmethod
    def from_node_config(cls, config: dict) -> NodeSettings:
        threads = config.get("threads")
        return cls(
            data_dir=str(config["data-dir"]) if config.get("data-dir") else None,
            state_dir=Path(str(config.get("state-dir") or Path.home() / ".ddm-flower")).expanduser(),
            device=str(config.get("device", "cpu")),
            threads=int(threads) if threads else None,
            share_counts=str(config.get("share-counts", "false")).lower() in ("true", "1", "yes"),
            upload="reply" if str(config.get("upload", "")).lower() == "reply" else "port",
        )


def reply(message: Message, **fields) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord({"format": FORMAT, **fields})}), reply_to=message)


def received_lease(message: Message) -> pb.Lease:
    record = message.content.config_records.get(RECORD)
    if record is None or record.get("format") != FORMAT or not isinstance(record.get("lease"), bytes):
        raise Unfit(f"the node speaks ddm's Flower format {FORMAT}; the message is not in it (update ddm)")
    return pb.Lease.FromString(record["lease"])


def node_data(message: Message, lease: pb.Lease, state: IslandState, settings: NodeSettings) -> ImageDataset:
    """Siloed: this node's own data, checked against the model. Shared: the cluster's shard the
    message carries, checked against the lease's fingerprint."""
    if lease.HasField("autoencoder"):
        raise Unfit(
            "the node does not train latent experts over Flower",
            "this coordinator's experts train on latents, which ddm's Flower app does not carry yet:"
            " join its port with `ddm-client join` instead",
        )
    if siloed(lease):
        if not settings.data_dir:
            raise Unfit(
                "the node has no data configured",
                "this coordinator runs in siloed mode: start the SuperNode with --node-config 'data-dir=\"/path\"'",
            )
        return load_silo(lease, settings.data_dir)
    shard = message.content.array_records.get(SHARD)
    if shard is None or FILE not in shard:
        raise Unfit("the message carries no shard for a shared-mode lease")
    path = state.shards / f"{lease.shard_fingerprint[:16]}.safetensors"
    with atomic_path(path) as tmp:
        tmp.write_bytes(shard[FILE].data)
    return load_dataset_file(path, expect_fingerprint=lease.shard_fingerprint)


@contextmanager
def expert_lock(state: IslandState, expert_id: int):
    """One training of an expert at a time in a state folder: a message of a rerun that finds
    the previous run's training still going waits for it, then answers its checkpoint."""
    path = state.root / f"expert-{expert_id}.lock"
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train(message: Message, lease: pb.Lease, state: IslandState, settings: NodeSettings) -> Path:
    """The lease's finished checkpoint: trained now, resumed, or found already trained."""
    data = node_data(message, lease, state, settings)
    with expert_lock(state, lease.expert_id):
        out, done = finished_checkpoint(lease, state, data)
        if done is not None:
            log.info("expert %d: already trained, answering %s", lease.expert_id, done.name)
            return done
        if settings.threads:
            torch.set_num_threads(settings.threads)
        job = expert_job(lease, state, data, out, settings.device, settings.threads, share_counts=settings.share_counts)
        log.info(
            "expert %d: training on %d images (resume state in %s)", lease.expert_id, len(data), job.checkpoint_dir
        )
        return run_job(job, data)


def upload_through_port(message: Message, lease: pb.Lease, state: IslandState, checkpoint: Path) -> str | None:
    """Upload through ddm's port when the message offers one; the sha256 the coordinator signed,
    or None when the port cannot be reached (the checkpoint then goes in the reply)."""
    offer = message.content.config_records.get(UPLOAD)
    if offer is None:
        return None
    address, credential = str(offer["address"]), str(offer["credential"])
    public_key = bytes.fromhex(str(offer["public-key"]))
    pinned = str(offer.get("tls-fingerprint", ""))
    tls = TlsSettings(fingerprint=pinned) if pinned else TlsSettings(insecure=True)
    identity = Identity(
        coordinator=address,
        island_id=credential.split(".", 1)[0],
        credential=credential,
        role="island",
        public_key_hex=public_key.hex(),
        key_fingerprint=key_fingerprint(public_key),
        tls=tls.to_json(),
    )
    conn = Connection(address, credential, attempts=PORT_ATTEMPTS, tls=tls)
    try:
        return upload_lease(conn, lease, identity, checkpoint, state)
    except ClientError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            log.warning("ddm's port at %s cannot be reached (%s); answering with the checkpoint", address, exc)
            return None
        raise
    finally:
        conn.close()


app = ClientApp()


@app.train("expert")
def train_expert(message: Message, context: Context) -> Message:
    log_to_stderr(log)
    try:
        settings = NodeSettings.from_node_config(dict(context.node_config))
        lease = received_lease(message)
        state = IslandState(settings.state_dir)
        checkpoint = train(message, lease, state, settings)
        if settings.upload == "port":
            signed = upload_through_port(message, lease, state, checkpoint)
            if signed is not None:
                log.info("expert checkpoint %s uploaded through ddm's port and signed", signed[:12])
                return reply(message, uploaded=signed)
    except Unfit as exc:
        log.warning("refusing the lease: %s", exc)
        return reply(message, refused=exc.reason[:MAX_REASON_CHARS])
    except (ClientError, DDMError, DataError, ValueError, OSError) as exc:
        # The site's own problem (a missing folder, a bad setting): details stay in its log.
        log.error("cannot train the expert: %s", exc)
        return reply(message, refused=f"the node cannot train ({type(exc).__name__}; its operator's log says why)")
    data = checkpoint.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    log.info("expert checkpoint %s (%d bytes) answered", sha256[:12], len(data))
    content = RecordDict(
        {
            RECORD: ConfigRecord({"format": FORMAT, "sha256": sha256}),
            CHECKPOINT: ArrayRecord({FILE: Array(dtype="uint8", shape=(len(data),), stype=RAW, data=data)}),
        }
    )
    return Message(content, reply_to=message)
