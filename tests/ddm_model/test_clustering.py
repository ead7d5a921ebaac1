"""Two-stage k-means and the random baseline: determinism, balance, purity, and the file format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddm_model.clustering import (
    FORMAT,
    Clustering,
    ClusteringError,
    cluster_dataset,
    default_fine_count,
    merge_balanced,
    random_partition,
    two_stage_kmeans,
)
from ddm_model.errors import DDMError
from ddm_model.features import FeatureError, PixelFeatures
from tests.helpers import one_line_error

K = 4
TOLERANCE = 0.1  # two_stage_kmeans's default, which cluster_dataset uses


@pytest.fixture(scope="module")
def clustered(digits):
    return cluster_dataset(digits, k=K, seed=0)


@pytest.fixture(scope="module")
def features(digits):
    return PixelFeatures(seed=0)(digits.images)


def majority_share(clustering: Clustering, labels: np.ndarray) -> float:
    shares = []
    for c in range(clustering.k):
        members = labels[clustering.assignment == c]
        shares.append(np.bincount(members, minlength=10).max() / len(members))
    return float(np.mean(shares))


# ---------------------------------------------------------------------------------------------
# two-stage k-means


def test_kmeans2_is_deterministic_under_a_seed(digits, clustered):
    again = cluster_dataset(digits, k=K, seed=0)
    assert np.array_equal(again.assignment, clustered.assignment)
    assert np.array_equal(again.fine_centroids, clustered.fine_centroids)
    assert np.array_equal(again.fine_to_coarse, clustered.fine_to_coarse)
    assert np.array_equal(again.sample_ids, clustered.sample_ids)


def test_kmeans2_describes_itself(digits, clustered):
    n = len(digits)
    m = default_fine_count(n, K)
    assert m == 128  # 32 per cluster, below one per ten samples (179)
    assert clustered.k == K
    assert clustered.method == "kmeans2"
    assert clustered.features == "pixels"
    assert clustered.seed == 0
    assert clustered.dataset_fingerprint == digits.fingerprint()
    assert clustered.sample_ids.dtype == np.int64 and np.array_equal(clustered.sample_ids, np.arange(n))
    assert clustered.assignment.dtype == np.int64 and clustered.assignment.shape == (n,)
    assert clustered.fine_centroids.shape == (m, 32)
    assert clustered.fine_centroids.dtype == np.float32
    assert clustered.fine_to_coarse.shape == (m,)
    assert clustered.describe() == {
        "format": FORMAT,
        "k": K,
        "method": "kmeans2",
        "seed": 0,
        "features": "pixels",
        "dataset_fingerprint": digits.fingerprint(),
        "num_samples": n,
        "num_fine": m,
    }


def test_kmeans2_assigns_every_sample_to_a_non_empty_cluster(digits, clustered):
    assert clustered.assignment.min() >= 0 and clustered.assignment.max() < K
    sizes = clustered.sizes
    assert sizes.shape == (K,)
    assert sizes.sum() == len(digits)
    assert (sizes > 0).all()
    # Every coarse cluster owns at least one fine centroid, and every fine centroid one cluster.
    assert set(clustered.fine_to_coarse.tolist()) == set(range(K))


def test_kmeans2_sizes_are_balanced(digits, clustered):
    n = len(digits)
    cap = math.ceil(n / K * (1 + TOLERANCE))  # merge_balanced's cap: 495 for digits, K=4
    assert cap == 495
    sizes = clustered.sizes
    assert sizes.max() <= cap, sizes
    # With every cluster at most `cap`, none can be smaller than what the others leave.
    assert sizes.min() >= n - (K - 1) * cap, sizes


def test_each_sample_follows_its_nearest_fine_centroid(clustered, features):
    centroids = clustered.fine_centroids.astype(np.float64)
    dist = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    nearest = dist.argmin(axis=1)
    assert np.array_equal(clustered.fine_to_coarse[nearest], clustered.assignment)
    # The check is not vacuous: the fine centroids split the samples into many groups that cross
    # coarse-cluster boundaries only through fine_to_coarse.
    assert len(np.unique(nearest)) > 100


def test_kmeans2_clusters_are_purer_than_random(digits, clustered):
    labels = digits.labels.numpy()
    random = random_partition(digits.ids.numpy(), K, seed=0)
    kmeans_purity = majority_share(clustered, labels)
    random_purity = majority_share(random, labels)
    assert random_purity < 0.16, random_purity  # ten balanced classes: about 1/10
    assert kmeans_purity > random_purity + 0.15, (kmeans_purity, random_purity)


def test_kmeans2_keeps_arbitrary_sample_ids(digits):
    sub = digits.subset(np.arange(1796, -1, -3))  # descending, non-contiguous ids
    clustering = cluster_dataset(sub, k=3, seed=1)
    assert np.array_equal(clustering.sample_ids, sub.ids.numpy())
    assert clustering.seed == 1
    assert clustering.dataset_fingerprint == sub.fingerprint() != digits.fingerprint()
    members = [clustering.members(c) for c in range(3)]
    assert sorted(np.concatenate(members).tolist()) == sorted(sub.ids.tolist())
    assert all(len(m) > 0 for m in members)


def test_bad_k_raises(digits):
    small = digits.subset(range(30))
    for k in (1, 0, -2, 31):
        with pytest.raises(ClusteringError) as err:
            cluster_dataset(small, k=k)
        one_line_error(err)
        with pytest.raises(ClusteringError) as err:
            cluster_dataset(small, k=k, method="random")
        one_line_error(err)
        with pytest.raises(ClusteringError) as err:
            random_partition(small.ids.numpy(), k)
        one_line_error(err)
    # K = N is the largest legal split.
    assert (random_partition(small.ids.numpy(), 30).sizes == 1).all()


def test_bad_fine_count_method_and_features_raise(digits, features):
    ids = digits.ids.numpy()
    with pytest.raises(ClusteringError) as err:
        two_stage_kmeans(features, ids, k=4, fine=3)
    one_line_error(err)
    with pytest.raises(ClusteringError) as err:
        two_stage_kmeans(features[:20], ids[:20], k=4, fine=21)
    one_line_error(err)
    with pytest.raises(ClusteringError, match="method") as err:
        cluster_dataset(digits, k=4, method="spectral")
    one_line_error(err)
    with pytest.raises(FeatureError):
        cluster_dataset(digits, k=4, features="nope")
    assert issubclass(ClusteringError, DDMError)


def test_merge_balanced_respects_the_cap_and_fills_every_cluster():
    rng = np.random.default_rng(3)
    centroids = np.concatenate([rng.normal(0, 0.1, (10, 2)), rng.normal(5, 0.1, (2, 2))])
    counts = np.array([10] * 10 + [10, 10])  # 100 samples near 0, 20 near 5
    out = merge_balanced(centroids, counts, k=2, seed=0, tolerance=0.1)
    assert out.shape == (12,) and out.dtype == np.int64
    load = np.bincount(out, weights=counts, minlength=2)
    assert load.sum() == 120
    assert load.max() <= math.ceil(120 / 2 * 1.1)  # 66
    assert (load > 0).all()
    # The two far-away centroids stay together, with the nearest ones to them filling up the rest.
    assert out[10] == out[11]


# ---------------------------------------------------------------------------------------------
# random partition


def test_random_partition_is_deterministic_and_balanced(digits):
    ids = digits.ids.numpy()
    a = random_partition(ids, K, seed=7)
    b = random_partition(ids, K, seed=7)
    assert np.array_equal(a.assignment, b.assignment)
    assert a.sizes.tolist() == [450, 449, 449, 449]
    assert a.sizes.max() - a.sizes.min() <= 1
    assert (a.method, a.seed, a.features, a.k) == ("random", 7, "none", K)
    assert a.fine_centroids.shape[0] == 0 and a.fine_to_coarse.shape == (0,)
    other = random_partition(ids, K, seed=8)
    assert not np.array_equal(a.assignment, other.assignment)
    assert other.sizes.tolist() == [450, 449, 449, 449]


@pytest.mark.parametrize("n, k, sizes", [(10, 3, [4, 3, 3]), (7, 7, [1] * 7), (9, 2, [5, 4])])
def test_random_partition_sizes_differ_by_at_most_one(n, k, sizes):
    ids = np.arange(1000, 1000 + n)[::-1].copy()
    clustering = random_partition(ids, k, seed=0)
    assert clustering.sizes.tolist() == sizes
    assert np.array_equal(clustering.sample_ids, ids)


def test_cluster_dataset_random_method(digits):
    clustering = cluster_dataset(digits, k=3, method="random", seed=2)
    assert clustering.method == "random"
    assert clustering.dataset_fingerprint == digits.fingerprint()
    assert np.array_equal(clustering.assignment, random_partition(digits.ids.numpy(), 3, seed=2).assignment)


# ---------------------------------------------------------------------------------------------
# members and labels_for


def test_members_and_labels_for():
    ids = np.array([50, 10, 40, 20, 30, 60])
    clustering = Clustering(k=3, sample_ids=ids, assignment=np.array([2, 0, 2, 1, 0, 1]))
    assert clustering.members(0).tolist() == [10, 30]
    assert clustering.members(1).tolist() == [20, 60]
    assert clustering.members(2).tolist() == [40, 50]
    assert clustering.labels_for([30, 50, 10]).tolist() == [0, 2, 0]
    assert clustering.labels_for(torch.tensor([60, 20])).tolist() == [1, 1]
    assert clustering.labels_for(np.array([40])).dtype == np.int64
    for bad in (3, -1):
        with pytest.raises(ClusteringError) as err:
            clustering.members(bad)
        one_line_error(err)
    with pytest.raises(ClusteringError) as err:
        clustering.labels_for([10, 99])
    assert "99" in one_line_error(err)


def test_labels_for_all_ids_matches_assignment(digits, clustered):
    assert np.array_equal(clustered.labels_for(digits.ids), clustered.assignment)
    shuffled = np.random.default_rng(0).permutation(len(digits))
    assert np.array_equal(clustered.labels_for(shuffled), clustered.assignment[shuffled])


# ---------------------------------------------------------------------------------------------
# save / load


def assert_same_clustering(a: Clustering, b: Clustering) -> None:
    assert b.k == a.k
    assert b.method == a.method
    assert b.seed == a.seed
    assert b.features == a.features
    assert b.dataset_fingerprint == a.dataset_fingerprint
    for name in ("sample_ids", "assignment", "fine_centroids", "fine_to_coarse"):
        left, right = getattr(a, name), getattr(b, name)
        assert right.dtype == left.dtype, name
        assert np.array_equal(left, right), name
    assert np.array_equal(a.sizes, b.sizes)


def test_save_load_round_trip_kmeans2(tmp_path, clustered):
    path = tmp_path / "clusters.safetensors"
    clustered.save(path)
    assert_same_clustering(clustered, Clustering.load(path))
    assert_same_clustering(clustered, Clustering.load(str(path)))
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.safetensors"]  # no temporary left over


def test_save_load_round_trip_random(tmp_path, digits):
    clustering = cluster_dataset(digits.subset(range(100, 160)), k=5, method="random", seed=11)
    path = tmp_path / "deep" / "er" / "random.safetensors"
    clustering.save(path)
    assert_same_clustering(clustering, Clustering.load(path))


def test_saved_file_is_safetensors_with_json_header(tmp_path, clustered):
    path = tmp_path / "clusters.safetensors"
    clustered.save(path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["ddm"]) == clustered.describe()
    with safe_open(str(path), framework="np") as f:
        assert sorted(f.keys()) == ["assignment", "fine_centroids", "fine_to_coarse", "sample_ids", "sizes"]
        assert np.array_equal(f.get_tensor("sizes"), clustered.sizes)
        assert f.get_tensor("assignment").dtype == np.int64
        assert f.get_tensor("fine_centroids").dtype == np.float32


def read_clustering_file(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, json.loads(metadata["ddm"])


@pytest.fixture
def saved(tmp_path):
    clustering = Clustering(
        k=3,
        sample_ids=np.array([5, 6, 7, 8, 9, 10], np.int64),
        assignment=np.array([0, 1, 2, 0, 1, 2], np.int64),
        fine_centroids=np.arange(8, dtype=np.float32).reshape(4, 2),
        fine_to_coarse=np.array([0, 1, 2, 2], np.int64),
        seed=3,
        dataset_fingerprint="abc",
    )
    path = tmp_path / "good.safetensors"
    clustering.save(path)
    return path


def rewrite(src, dst, tensors=None, meta=None, drop=(), metadata_override=None):
    original, description = read_clustering_file(src)
    original.update(tensors or {})
    for name in drop:
        original.pop(name)
    description.update(meta or {})
    metadata = {"ddm": json.dumps(description)} if metadata_override is None else metadata_override
    save_file(original, str(dst), metadata=metadata)
    return dst


def expect_refused(path, needle=None) -> str:
    with pytest.raises(ClusteringError) as err:
        Clustering.load(path)
    message = one_line_error(err)
    if needle is not None:
        assert needle in message, message
    return message


def test_fixture_file_loads(saved):
    loaded = Clustering.load(saved)
    assert loaded.sizes.tolist() == [2, 2, 2]
    assert loaded.dataset_fingerprint == "abc"


def test_load_refuses_inconsistent_sizes(saved, tmp_path):
    path = rewrite(saved, tmp_path / "t.safetensors", tensors={"sizes": torch.tensor([3, 2, 1])})
    expect_refused(path, "sizes")


def test_load_refuses_assignment_out_of_range(saved, tmp_path):
    bad = torch.tensor([0, 1, 3, 0, 1, 2])
    path = rewrite(saved, tmp_path / "t.safetensors", tensors={"assignment": bad})
    expect_refused(path, "assignment")
    negative = torch.tensor([0, -1, 2, 0, 1, 2])
    path = rewrite(saved, tmp_path / "n.safetensors", tensors={"assignment": negative})
    expect_refused(path)


def test_load_refuses_assignment_of_the_wrong_length(saved, tmp_path):
    path = rewrite(
        saved,
        tmp_path / "t.safetensors",
        tensors={"assignment": torch.tensor([0, 1, 2, 0, 1]), "sizes": torch.tensor([2, 2, 1])},
    )
    expect_refused(path, "assignment")


def test_load_refuses_wrong_k(saved, tmp_path):
    expect_refused(rewrite(saved, tmp_path / "t.safetensors", meta={"k": 2}))
    expect_refused(rewrite(saved, tmp_path / "u.safetensors", meta={"k": 4}))


@pytest.mark.parametrize("fmt", ["ddm.clustering/2", "ddm.checkpoint/1", None])
def test_load_refuses_wrong_format(saved, tmp_path, fmt):
    expect_refused(rewrite(saved, tmp_path / "t.safetensors", meta={"format": fmt}), "format")


@pytest.mark.parametrize("metadata", [{}, {"ddm": "null"}, {"ddm": "[1, 2]"}, {"ddm": "{not json"}, {"other": "x"}])
def test_load_refuses_missing_or_bad_description(saved, tmp_path, metadata):
    expect_refused(rewrite(saved, tmp_path / "t.safetensors", metadata_override=metadata))


def test_load_refuses_missing_and_extra_arrays(saved, tmp_path):
    expect_refused(rewrite(saved, tmp_path / "a.safetensors", drop=["fine_to_coarse"]), "fine_to_coarse")
    extra = rewrite(saved, tmp_path / "b.safetensors", tensors={"payload": torch.zeros(3)})
    expect_refused(extra, "payload")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04\x95hello pickle", b"PK\x03\x04zipfile", np.random.default_rng(1).bytes(512)],
    ids=["empty", "pickle", "zip", "random"],
)
def test_load_refuses_files_that_are_not_safetensors(tmp_path, content):
    path = tmp_path / "not.safetensors"
    path.write_bytes(content)
    expect_refused(path)


def test_load_refuses_missing_file(tmp_path):
    expect_refused(tmp_path / "missing.safetensors")


def test_load_refuses_description_missing_a_field(saved, tmp_path):
    """A header with the right format but without 'k' (or 'method', ...) is a tampered file too."""
    _, description = read_clustering_file(saved)
    for field in ("k", "method", "seed", "features", "dataset_fingerprint"):
        broken = {key: value for key, value in description.items() if key != field}
        path = rewrite(saved, tmp_path / f"no-{field}.safetensors", metadata_override={"ddm": json.dumps(broken)})
        expect_refused(path)


def test_load_refuses_arrays_of_the_wrong_dtype(saved, tmp_path):
    path = rewrite(saved, tmp_path / "t.safetensors", tensors={"assignment": torch.tensor([0.0, 1, 2, 0, 1, 2])})
    expect_refused(path)


def test_load_refuses_fine_to_coarse_inconsistent_with_k_or_centroids(saved, tmp_path):
    out_of_range = rewrite(saved, tmp_path / "a.safetensors", tensors={"fine_to_coarse": torch.tensor([0, 1, 2, 7])})
    expect_refused(out_of_range)
    wrong_length = rewrite(saved, tmp_path / "b.safetensors", tensors={"fine_to_coarse": torch.tensor([0, 1, 2])})
    expect_refused(wrong_length)
