"""Partitioning a dataset into K clusters, one per expert.

Two-stage k-means (as in Decentralized Diffusion Models): k-means into M fine centroids,
then the fine centroids are merged into K coarse clusters of balanced size, and each sample
goes with its nearest fine centroid. ``random_partition`` is the baseline. Both are
deterministic under a seed. A clustering is saved as safetensors (centroids, assignment,
sizes) with its JSON description in the header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset
from .errors import DDMError
from .features import make_extractor
from .tensorfile import read_tensor_file, write_tensor_file

FORMAT = "ddm.clustering/1"


class ClusteringError(DDMError, ValueError):
    """Bad clustering arguments or an unreadable clustering file."""


@dataclass
class Clustering:
    k: int
    sample_ids: np.ndarray  # int64 (N,)
    assignment: np.ndarray  # int64 (N,) coarse cluster of each sample, in [0, k)
    fine_centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (M, D)
    fine_to_coarse: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (M,)
    method: str = "kmeans2"
    seed: int = 0
    features: str = "pixels"
    dataset_fingerprint: str = ""

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=self.k)

    def members(self, cluster: int) -> np.ndarray:
        """Sample ids of one cluster, sorted."""
        if not 0 <= cluster < self.k:
            raise ClusteringError(f"cluster {cluster} does not exist; clusters are 0..{self.k - 1}")
        return np.sort(self.sample_ids[self.assignment == cluster])

    def labels_for(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cluster of each given sample id."""
        lookup = dict(zip(self.sample_ids.tolist(), self.assignment.tolist(), strict=True))
        try:
            return np.array([lookup[i] for i in np.asarray(ids).tolist()], dtype=np.int64)
        except KeyError as exc:
            raise ClusteringError(f"sample id {exc.args[0]} is not in the clustering") from None

    def describe(self) -> dict:
        return {
            "format": FORMAT,
            "k": self.k,
            "method": self.method,
            "seed": self.seed,
            "features": self.features,
            "dataset_fingerprint": self.dataset_fingerprint,
            "num_samples": int(self.sample_ids.shape[0]),
            "num_fine": int(self.fine_centroids.shape[0]),
        }

    def save(self, path: str | Path) -> None:
        tensors = {
            "sample_ids": torch.from_numpy(self.sample_ids.astype(np.int64)),
            "assignment": torch.from_numpy(self.assignment.astype(np.int64)),
            "sizes": torch.from_numpy(self.sizes.astype(np.int64)),
            "fine_centroids": torch.from_numpy(np.ascontiguousarray(self.fine_centroids, dtype=np.float32)),
            "fine_to_coarse": torch.from_numpy(self.fine_to_coarse.astype(np.int64)),
        }
        write_tensor_file(path, tensors, self.describe())

    @classmethod
    def load(cls, path: str | Path) -> Clustering:
        meta, tensors = read_tensor_file(path, FORMAT, "clustering", ClusteringError)
        needed = {"sample_ids", "assignment", "sizes", "fine_centroids", "fine_to_coarse"}
        if set(tensors) != needed:
            raise ClusteringError(f"{path} holds arrays {sorted(tensors)}, expected {sorted(needed)}")
        for name in ("sample_ids", "assignment", "sizes", "fine_to_coarse"):
            if tensors[name].dtype != torch.int64 or tensors[name].dim() != 1:
                raise ClusteringError(f"{path}: array {name} must be one-dimensional int64")
        if tensors["fine_centroids"].dtype != torch.float32 or tensors["fine_centroids"].dim() != 2:
            raise ClusteringError(f"{path}: array fine_centroids must be two-dimensional float32")
        fields = {"k": int, "method": str, "seed": int, "features": str, "dataset_fingerprint": str}
        for name, kind in fields.items():
            if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
                raise ClusteringError(f"{path}: description field {name!r} is missing or not a {kind.__name__}")
        clustering = cls(
            k=meta["k"],
            sample_ids=tensors["sample_ids"].numpy(),
            assignment=tensors["assignment"].numpy(),
            fine_centroids=tensors["fine_centroids"].numpy(),
            fine_to_coarse=tensors["fine_to_coarse"].numpy(),
            method=meta["method"],
            seed=meta["seed"],
            features=meta["features"],
            dataset_fingerprint=meta["dataset_fingerprint"],
        )
        k = clustering.k

        def within_k(values: np.ndarray) -> bool:
            return values.size == 0 or (values.min() >= 0 and values.max() < k)

        if k < 1 or clustering.assignment.shape != clustering.sample_ids.shape or not within_k(clustering.assignment):
            raise ClusteringError(f"{path}: assignment does not match its {k} clusters")
        if clustering.fine_to_coarse.shape[0] != clustering.fine_centroids.shape[0] or not within_k(
            clustering.fine_to_coarse
        ):
            raise ClusteringError(f"{path}: fine_to_coarse does not match its fine centroids and {k} clusters")
        if not np.array_equal(tensors["sizes"].numpy(), clustering.sizes):
            raise ClusteringError(f"{path}: stored cluster sizes disagree with the assignment")
        return clustering


def default_fine_count(n: int, k: int) -> int:
    """M: about 32 fine centroids per cluster, at least k, at most one per ten samples."""
    return max(k, min(32 * k, n // 10))


def two_stage_kmeans(
    features: np.ndarray,
    sample_ids: np.ndarray,
    k: int,
    fine: int | None = None,
    seed: int = 0,
    tolerance: float = 0.1,
) -> Clustering:
    """K balanced clusters from M fine k-means centroids; samples follow their fine centroid.

    ``tolerance`` bounds the size of each coarse cluster to (1 + tolerance) * N / K where the
    granularity of the fine clusters allows.
    """
    from sklearn.cluster import KMeans

    n = features.shape[0]
    if not 1 < k <= n:
        raise ClusteringError(f"cannot split {n} samples into {k} clusters; need 2 <= K <= N")
    m = default_fine_count(n, k) if fine is None else fine
    if not k <= m <= n:
        raise ClusteringError(f"need K <= M <= N fine centroids, got K={k}, M={m}, N={n}")
    x = np.asarray(features, dtype=np.float64)
    fine_km = KMeans(n_clusters=m, n_init=4, random_state=seed).fit(x)
    nearest_fine = fine_km.labels_.astype(np.int64)
    counts = np.bincount(nearest_fine, minlength=m)
    fine_to_coarse = merge_balanced(fine_km.cluster_centers_, counts, k, seed, tolerance)
    return Clustering(
        k=k,
        sample_ids=np.asarray(sample_ids, dtype=np.int64),
        assignment=fine_to_coarse[nearest_fine],
        fine_centroids=fine_km.cluster_centers_.astype(np.float32),
        fine_to_coarse=fine_to_coarse,
        method="kmeans2",
        seed=seed,
    )


def merge_balanced(centroids: np.ndarray, counts: np.ndarray, k: int, seed: int, tolerance: float) -> np.ndarray:
    """Assign M fine centroids (with sample counts) to k coarse clusters of balanced size.

    Coarse centres come from count-weighted k-means over the fine centroids. Fine centroids
    are then placed greedily, most constrained first (largest gap between their best and
    second-best centre), each into its nearest centre that still has room under the cap.
    """
    from sklearn.cluster import KMeans

    coarse = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(centroids, sample_weight=counts).cluster_centers_
    dist = ((centroids[:, None, :] - coarse[None, :, :]) ** 2).sum(-1)  # (M, k)
    cap = math.ceil(counts.sum() / k * (1 + tolerance))
    ranked = np.argsort(dist, axis=1, kind="stable")
    regret = np.take_along_axis(dist, ranked[:, 1:2], 1)[:, 0] - np.take_along_axis(dist, ranked[:, :1], 1)[:, 0]
    load = np.zeros(k, dtype=np.int64)
    out = np.full(centroids.shape[0], -1, dtype=np.int64)
    for i in np.lexsort((np.arange(len(counts)), -counts, -regret)):
        room = [c for c in ranked[i] if load[c] + counts[i] <= cap]
        c = room[0] if room else int(np.argmin(load))
        out[i] = c
        load[c] += counts[i]
    # Every coarse cluster must own at least one fine centroid (and so at least one sample).
    for empty in np.flatnonzero(np.bincount(out, weights=counts, minlength=k) == 0):
        donors = [i for i in np.argsort(dist[:, empty], kind="stable") if np.sum(out == out[i]) > 1 and counts[i] > 0]
        out[donors[0]] = empty
    return out


def random_partition(sample_ids: np.ndarray, k: int, seed: int = 0) -> Clustering:
    """The baseline: a uniformly random split into k clusters of equal size (+-1)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    if not 1 < k <= ids.shape[0]:
        raise ClusteringError(f"cannot split {ids.shape[0]} samples into {k} clusters; need 2 <= K <= N")
    order = np.random.default_rng(seed).permutation(ids.shape[0])
    assignment = np.empty(ids.shape[0], dtype=np.int64)
    assignment[order] = np.arange(ids.shape[0]) % k
    return Clustering(k=k, sample_ids=ids, assignment=assignment, method="random", seed=seed, features="none")


def cluster_dataset(
    dataset: ImageDataset,
    k: int,
    method: str = "kmeans2",
    features: str = "pixels",
    fine: int | None = None,
    seed: int = 0,
    weights: str | Path | None = None,
) -> Clustering:
    """Cluster a dataset by the named method ('kmeans2' or 'random') and feature extractor."""
    ids = dataset.ids.numpy()
    if method == "random":
        clustering = random_partition(ids, k, seed)
    elif method == "kmeans2":
        extractor = make_extractor(features, weights=weights, seed=seed)
        clustering = two_stage_kmeans(extractor(dataset.images), ids, k, fine=fine, seed=seed)
        clustering.features = extractor.name
    else:
        raise ClusteringError(f"unknown clustering method {method!r}; use 'kmeans2' or 'random'")
    clustering.dataset_fingerprint = dataset.fingerprint()
    return clustering
