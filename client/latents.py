"""A latent lease's autoencoder on the island: fetched once from the coordinator (verified by
sha256 and by its own identity), kept in the state folder, and used to encode the island's
cluster (its shard, its index list's samples or its siloed data) to the latents the expert
trains on, once: the latents are cached beside it, named after the pixels' fingerprint and the
autoencoder's identity."""

from __future__ import annotations

from ddm_model.autoencoder import Autoencoder, latent_dataset, load_packed
from ddm_model.data import ImageDataset
from ddm_model.progress import transfer_bar
from protocol import ddm_pb2 as pb
from protocol.trust import is_sha256

from .connection import ClientError, Connection
from .state import IslandState
from .transfer import bar_callback, download_artifact


def lease_autoencoder(conn: Connection, lease: pb.Lease, state: IslandState, device: str = "cpu") -> Autoencoder | None:
    """The autoencoder a latent lease names (None for a pixel lease), fetched if not yet here."""
    if not lease.HasField("autoencoder"):
        return None
    sha = lease.autoencoder.sha256
    if not is_sha256(sha):
        raise ClientError("the coordinator sent a malformed autoencoder address")
    path = state.latents / f"autoencoder-{sha}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with transfer_bar() as bar:
            on_bytes = bar_callback(bar, f"autoencoder {sha[:12]}", lease.autoencoder.size)
            download_artifact(conn, sha, path, lease.autoencoder.size, on_bytes)
    return load_packed(path, device=device)


def in_model_space(data: ImageDataset, autoencoder: Autoencoder | None, state: IslandState) -> ImageDataset:
    """The data the expert trains on: ``data``'s latents for a latent lease, else ``data``."""
    if autoencoder is None:
        return data
    return latent_dataset(data, autoencoder, state.latents)
