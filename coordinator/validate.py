"""What an uploaded expert checkpoint must pass before the coordinator signs it.

The header is parsed without executing anything, the expected model is rebuilt from the
coordinator's own config, and keys, shapes, dtypes and finiteness are checked, then the
provenance: cluster, data fingerprint, steps, metrics and any data counts the island reported.
In shared mode the expert must also beat an untrained model on its cluster's held-out probe
slice, which no island trains on (``training_ids`` is the cluster less that slice).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ddm_model.checkpoint import CheckpointError, load_checkpoint, verify_checkpoint
from ddm_model.clustering import Clustering
from ddm_model.data import ImageDataset, load_dataset_file
from ddm_model.privacy import Guarantee, PrivacyError
from ddm_model.probe import Probe, probe_seed
from protocol.limits import MAX_METRICS_BYTES
from protocol.shares import COUNTS_KEY, SharesError, check_counts
from protocol.trust import canonical_json, sha256_file

from .bootstrap import lease_train_config
from .home import CoordinatorConfig, Home, HomeError
from .latents import in_model_space

log = logging.getLogger("ddm.coordinator")
# Errors of a bad value: raised while checking what an island sent, they are its fault. Not here:
# OSError, MemoryError, the database's errors, DiskFull, RegistryError (the coordinator's own).
CONTENT_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError)


class Rejected(Exception):
    """Why an upload fails a check."""


class Validator:
    def __init__(self, home: Home, config: CoordinatorConfig):
        self.home = home
        self.config = config
        # Shared mode only: a siloed coordinator holds no data and no clustering.
        self.clustering = None if config.mode == "siloed" else Clustering.load(home.clustering_path)
        # Shared mode: each cluster's held-out probe slice (no island trains on it), read and
        # scored by an untrained model once. A home made before probe slices existed has none.
        self._probe_summary = config.clustering.get("probe") if self.clustering is not None else None
        if self._probe_summary is not None:
            for k in range(config.experts):
                if not home.probe_path(k).is_file():
                    raise HomeError(f"{home.probe_path(k)} is missing; restore the home from a backup")
        elif self.clustering is not None:
            log.warning("this home has no held-out probe slices: uploads are checked but not scored")
        self._held_out: dict[int, ImageDataset] = {}
        self._probes: dict[int, Probe] = {}
        self._probe_lock = threading.Lock()

    def _held_out_slice(self, cluster: int) -> ImageDataset | None:
        """The cluster's probe slice as init stored it (checked against its fingerprint), in the
        experts' space (its latents in a latent home)."""
        if self._probe_summary is None:
            return None
        with self._probe_lock:
            if cluster not in self._held_out:
                held = load_dataset_file(
                    self.home.probe_path(cluster), expect_fingerprint=self._probe_summary["fingerprints"][cluster]
                )
                self._held_out[cluster] = in_model_space(self.home, self.config, held)
            return self._held_out[cluster]

    def training_ids(self, cluster: int) -> np.ndarray:
        """A cluster's sample ids less its probe slice: what an island trains on."""
        held = self._held_out_slice(cluster)
        members = self.clustering.members(cluster)
        return members if held is None else np.setdiff1d(members, held.ids.numpy())

    def _probe(self, cluster: int) -> Probe | None:
        held = self._held_out_slice(cluster)
        if held is None or len(held) == 0:
            return None
        with self._probe_lock:
            if cluster not in self._probes:
                seed = probe_seed(self.config.clustering["seed"], cluster)
                self._probes[cluster] = Probe.build(self.config.model, held.images, seed)
            return self._probes[cluster]

    def validate(self, path, upload, expert) -> tuple[str | None, dict]:
        """(why a received checkpoint is refused or None, the provenance of an accepted one).

        The header is parsed without executing anything, the expected model is rebuilt from
        the coordinator's own config, and keys, shapes, dtypes and finiteness are checked. In
        shared mode the expert must then beat an untrained model on its cluster's probe slice.

        Whatever the island sent, a check of it ends in a reason: an error of a bad value that
        no check names (CONTENT_ERRORS) is one too, and is logged as a gap in the checks. The
        coordinator's own faults (its disk, its database, its probe slice) are not caught."""
        if path.stat().st_size != upload.size or sha256_file(path) != upload.sha256:
            return "sha256 of the received bytes differs from the one declared at BeginUpload", {}
        probe = self._probe(expert.cluster_id)
        steps = lease_train_config(self.config, expert.id).steps
        try:
            provenance, model = self._judge(path, expert, probe is not None, steps)
        except Rejected as refusal:
            return str(refusal), {}
        except CONTENT_ERRORS as exc:
            log.warning("expert %d: no check of the upload names this error; rejected", expert.id, exc_info=exc)
            return f"its content could not be checked ({type(exc).__name__})", {}
        if probe is None:
            return None, provenance
        # The probe runs the coordinator's own code on its own slice: a fault there is its own.
        verdict = probe.judge(model, self.config.probe_margin)
        log.info("expert %d: %s", expert.id, verdict.reason)
        if not verdict.passed:
            return verdict.reason, {}
        return None, {**provenance, "probe": verdict.to_dict()}

    def _judge(self, path, expert, load: bool, steps: int) -> tuple[dict, torch.nn.Module | None]:
        """The checks of ``validate`` that read what the island sent: its provenance and, with
        ``load``, its model; ``Rejected`` with the reason it fails."""
        try:
            if load:
                model, info = load_checkpoint(path, expect_kind="expert", expect_config=self.config.model)
            else:
                model, info = None, verify_checkpoint(path, expect_kind="expert", expect_config=self.config.model)
        except CheckpointError as exc:
            raise Rejected(str(exc).replace(str(path), "the upload")) from None
        if info.cluster_id != expert.cluster_id:
            lease = expert.cluster_id
            raise Rejected(f"it was trained for cluster {info.cluster_id}, the lease is for cluster {lease}")
        if info.data_fingerprint != expert.shard_fingerprint:
            raise Rejected("it names a data fingerprint other than its cluster's")
        if info.steps != steps:
            raise Rejected(f"it was trained for {info.steps} steps, the lease asks for {steps}")
        try:
            metrics_size = len(canonical_json(info.metrics))
        except UnicodeError:
            raise Rejected("its metrics hold text that is not valid Unicode (a lone surrogate)") from None
        except ValueError:
            raise Rejected("its metrics hold NaN or infinite numbers") from None
        if metrics_size > MAX_METRICS_BYTES:
            raise Rejected(f"its metrics take {metrics_size} bytes; at most {MAX_METRICS_BYTES} are accepted")
        metrics, counts = dict(info.metrics), info.metrics.get(COUNTS_KEY)
        if counts is not None:  # an island's opt-in report of its data counts (join --share-counts)
            try:
                counts = check_counts(counts, self.config.model.get("num_classes", 0))
            except SharesError as exc:
                raise Rejected(f"its reported data counts are refused: {exc}") from None
            del metrics[COUNTS_KEY]
        provenance = {
            "kind": "expert",
            "config": info.model,
            "steps": info.steps,
            "flops": info.flops,
            "data_fingerprint": info.data_fingerprint,
            "metrics": metrics,
        }
        if counts is not None:
            provenance["counts"] = counts
        privacy = self._privacy(info, expert)
        if privacy is not None:
            provenance["privacy"] = privacy
        return provenance, model

    def _privacy(self, info, expert) -> dict | None:
        """The checkpoint's differential-privacy guarantee, if it declares one: its epsilon
        must be what its accountant gives for its own figures, and with ``require_dp_epsilon``
        at most that, with a delta below 1/N. What this cannot check is that the island trained
        as declared: the signature binds the declaration to these weights, no more."""
        required = self.config.require_dp_epsilon
        if info.privacy is None:
            if required is None:
                return None
            raise Rejected(
                "it declares no differential-privacy guarantee, and this coordinator signs only experts private"
                f" to epsilon <= {required:g} (ddm-client join --dp-epsilon {required:g})"
            )
        try:
            guarantee = Guarantee.from_dict(info.privacy).verify()
        except PrivacyError as exc:
            raise Rejected(f"its privacy guarantee is refused: {exc}") from None
        if required is not None:
            if guarantee.epsilon > required:
                raise Rejected(
                    f"it is private to epsilon {guarantee.epsilon:.3g}; this coordinator signs only experts"
                    f" private to epsilon <= {required:g}"
                )
            samples = lease_train_config(self.config, expert.id).batch_size / guarantee.sample_rate
            if guarantee.delta * samples >= 1:
                raise Rejected(
                    f"its delta {guarantee.delta:.2g} is not below 1/N for the {samples:.0f} samples its sample rate"
                    " implies (such a delta allows publishing a sample in the clear)"
                )
        return guarantee.to_dict()
