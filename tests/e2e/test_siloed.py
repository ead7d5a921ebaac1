"""Siloed mode end to end: islands train on data only they hold, and nothing of it reaches the
coordinator but the trained weights, heartbeats and bookkeeping, all counted."""

import json
import signal

import numpy as np
import pytest
from safetensors import safe_open
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from coordinator.distill import DistillError, DistillOptions, distill
from coordinator.home import Home

SILOS = 3
STEPS = 30


def make_silos(tmp_path) -> list:
    """Digits split by clusters computed here, each silo (images and their class labels) in a
    folder only its island knows. Returns (path, images, labels) per silo."""
    digits = load_digits()
    pixels = (digits.images / 16 * 255).round().astype(np.uint8)
    labels = KMeans(SILOS, n_init=4, random_state=0).fit_predict(pixels.reshape(len(pixels), -1))
    silos = []
    for k in range(SILOS):
        folder = tmp_path / f"site-{k}" / "private"
        folder.mkdir(parents=True)
        path = folder / "images.npz"
        np.savez(path, images=pixels[labels == k], labels=digits.target[labels == k])
        silos.append((path, pixels[labels == k], digits.target[labels == k]))
    return silos


def fingerprints_of(images: np.ndarray) -> list[bytes]:
    """Byte patterns that would betray the silo's images if any copy reached the coordinator:
    raw uint8 pixels, and the float32 values the island trains on."""
    patterns = []
    for image in images[:5]:
        patterns.append(image.tobytes())
        patterns.append((image.astype(np.float32) / 255.0 * 2.0 - 1.0).astype("<f4").tobytes())
    return patterns


@pytest.mark.slow
def test_siloed_islands_build_an_ensemble_without_their_data_leaving(coordinator, spawn, run, tmp_path):
    silos = make_silos(tmp_path)
    coord = coordinator(
        "--mode",
        "siloed",
        "--image-size",
        "8",
        "--channels",
        "1",
        "--experts",
        str(SILOS),
        "--preset",
        "tiny",
        "--steps",
        str(STEPS),
        "--router-steps",
        "30",
        "--router-samples",
        "128",
        "--heartbeat-seconds",
        "1",
        "--lease-seconds",
        "30",
    )
    islands = [
        spawn(
            "ddm-client",
            "join",
            *coord.connect_args,
            "--token",
            coord.invite(),
            "--state-dir",
            tmp_path / f"site-{k}" / "state",
            "--data",
            path,
            "--once",
            "--threads",
            "1",
            "--share-counts",  # each island opts in to report its sample count
            "--name",
            f"site-{k}",
            label=f"island-{k}",
        )
        for k, (path, _, _) in enumerate(silos)
    ]
    for island in islands:
        assert island.wait(timeout=240) == 0, island.stderr()[-2000:]
        assert "signed by the coordinator" in island.stderr()
    coord.wait_published(180)

    status = coord.status()
    assert status["coordinator"]["mode"] == "siloed" and status["coordinator"]["dataset"] == ""
    assert [e["state"] for e in status["experts"]] == ["signed"] * SILOS

    # The ensemble downloads, verifies and samples like any other.
    ensemble = tmp_path / "ensemble"
    reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
    got = run(
        "ddm-client",
        "download",
        *coord.connect_args,
        "--out",
        ensemble,
        "--fingerprint",
        coord.fingerprint,
        *reader,
    )
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = json.loads((ensemble / "manifest.json").read_text())
    trained_on = manifest["router"]["metrics"]["trained_on"]
    assert manifest["mode"] == "siloed" and "samples drawn from the experts in proportion to" in trained_on
    # The islands' reported counts are the shares: each silo's size, in expert order (the model
    # is unconditional, so no class counts are reported even though the silos hold labels).
    order = [item["entry"]["island_id"] for item in manifest["experts"]]
    silo_of = {i["id"]: int(i["name"].removeprefix("site-")) for i in status["islands"] if i["role"] == "island"}
    sizes = [len(silos[silo_of[i]][1]) for i in order]
    assert manifest["shares"] == {"source": "islands", "clusters": sizes, "classes": None}
    npz = tmp_path / "samples.npz"
    sampled = run(
        "ddm-client",
        "sample",
        ensemble,
        "--n",
        "16",
        "--out",
        tmp_path / "s.png",
        "--npz",
        npz,
        "--state-dir",
        tmp_path / "reader",
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with np.load(npz) as saved:
        assert saved["images"].shape == (16, 1, 8, 8)

    # Stop the coordinator so that its last traffic counts are written, then audit what it got.
    coord.proc.signal(signal.SIGTERM)
    assert coord.proc.wait(timeout=30) == 0
    checkpoints = {}
    for item in manifest["experts"]:
        entry = item["entry"]
        checkpoints[entry["island_id"]] = entry["size"]
        with safe_open(str(ensemble / f"expert-{entry['cluster_id']}.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["ddm"])["data_fingerprint"] == ""  # not even a hash of the data
    total_received, total_checkpoints, messages = 0, 0, 0
    for island in coord.status()["islands"]:
        if island["role"] != "island":
            continue
        sent = island["sent"]
        size = checkpoints[island["id"]]
        chunks = sent["checkpoint"]["messages"]
        # the file, plus per chunk its upload id, offset and sha256 (about 90 bytes)
        assert size <= sent["checkpoint"]["bytes"] <= size + 128 * chunks
        assert sent["heartbeats"]["bytes"] <= 48 * sent["heartbeats"]["messages"]
        assert sent["control"]["messages"] <= 6 and sent["control"]["bytes"] <= 128 * sent["control"]["messages"]
        total_received += sent["checkpoint"]["bytes"] + sent["heartbeats"]["bytes"] + sent["control"]["bytes"]
        total_checkpoints += size
        messages += chunks + sent["heartbeats"]["messages"] + sent["control"]["messages"]
    assert total_checkpoints <= total_received <= total_checkpoints + 128 * messages

    # The coordinator's home and database hold no image data: no shard or clustering artifact,
    # and no byte pattern of any silo's images in any file, nor the silos' paths.
    kinds = {row["kind"] for row in coord.db("SELECT kind FROM artifacts")}
    assert kinds == {"expert", "router"}
    files = [p for p in coord.home.rglob("*") if p.is_file()]
    assert not any("shard" in p.name or "clustering" in p.name for p in files)
    blobs = [p.read_bytes() for p in files]
    for path, images, _ in silos:
        for pattern in fingerprints_of(images):
            assert not any(pattern in blob for blob in blobs)
        assert not any(str(path.parent).encode() in blob for blob in blobs)

    # Without data the coordinator still distills a student: from samples of the experts, by
    # their velocity alone, as many from each as the islands' reported shares say.
    report = distill(Home(coord.home), DistillOptions(steps=5), progress=False)
    (row,) = coord.db("SELECT manifest_json FROM ensembles WHERE id = ?", report.ensemble_id)
    student = json.loads(row["manifest_json"])["student"]
    assert student["metrics"]["data_weight"] == 0 and student["metrics"]["data_sampling_flops"] > 0
    want = f"{128 * SILOS} samples drawn from the experts, split by the cluster shares (islands)"
    assert want in student["metrics"]["trained_on"]
    with safe_open(str(coord.home / "artifacts" / student["sha256"]), "pt") as f:
        assert json.loads(f.metadata()["ddm"])["data_fingerprint"] == ""
    with pytest.raises(DistillError, match="holds no real data"):
        distill(Home(coord.home), DistillOptions(steps=5, data_weight=0.5), progress=False)


@pytest.mark.slow
def test_an_island_whose_data_does_not_fit_refuses_before_training(coordinator, run, tmp_path):
    coord = coordinator(
        "--mode",
        "siloed",
        "--image-size",
        "16",
        "--channels",
        "1",
        "--experts",
        "2",
        "--preset",
        "tiny",
        "--steps",
        "5",
    )
    data = tmp_path / "eights.npz"
    np.savez(data, images=np.zeros((10, 8, 8), dtype=np.uint8))
    result = run(
        "ddm-client",
        "join",
        *coord.connect_args,
        "--token",
        coord.invite(),
        "--state-dir",
        tmp_path / "state",
        "--data",
        data,
        "--once",
    )
    assert result.returncode == 2
    assert "holds 1x8x8 images; this coordinator's model needs 1x16x16" in result.stderr
    assert not (tmp_path / "state" / "work").exists() and not (tmp_path / "state" / "outbox").exists()
    leases = coord.status()["leases"]
    assert [lease["state"] for lease in leases] == ["released"]
    assert [e["state"] for e in coord.status()["experts"]] == ["open", "open"]
    reason = coord.db("SELECT detail FROM events WHERE kind = 'lease_released'")[0]["detail"]
    assert "does not fit" in reason and "8x8" not in reason  # the coordinator is not told the island's shape
    missing = run("ddm-client", "join", *coord.connect_args, "--state-dir", tmp_path / "state", "--once")
    assert missing.returncode == 2 and "siloed mode: pass --data" in missing.stderr


@pytest.mark.slow
def test_class_conditional_silos_need_labels_that_fit_and_may_report_their_counts(coordinator, run, tmp_path):
    coord = coordinator(
        *("--mode", "siloed", "--image-size", "8", "--channels", "1", "--experts", "2", "--preset", "tiny"),
        *("--steps", "5", "--class-conditional", "--classes", "3"),
    )
    images = np.zeros((12, 8, 8), dtype=np.uint8)

    def join(name: str, **arrays):
        data = tmp_path / f"{name}.npz"
        np.savez(data, images=images, **arrays)
        state = tmp_path / name
        args = ["--data", data, "--once", "--share-counts", "--threads", "1"]
        return run("ddm-client", "join", *coord.connect_args, "--token", coord.invite(), "--state-dir", state, *args)

    unlabelled = join("unlabelled")
    assert unlabelled.returncode == 2 and "has no class labels" in unlabelled.stderr
    too_many = join("ten-classes", labels=np.arange(12) % 10)
    assert too_many.returncode == 2 and "has labels up to 9; this coordinator's model has classes 0 to 2" in (
        too_many.stderr
    )
    for result in (unlabelled, too_many):  # after the island's own progress lines, one error line
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.strip().endswith(errors[0][-40:]), result.stderr
        assert "Traceback" not in result.stderr
    assert [lease["state"] for lease in coord.status()["leases"]] == ["released", "released"]
    reasons = [row["detail"] for row in coord.db("SELECT detail FROM events WHERE kind = 'lease_released'")]
    assert "no class labels" in reasons[0] and "do not fit the model's 3 classes" in reasons[1]

    labels = np.array([0] * 7 + [2] * 5)
    good = join("good", labels=labels)
    assert good.returncode == 0, good.stderr[-2000:]
    (entry_file,) = (tmp_path / "good" / "signed").glob("expert-*.entry.json")
    entry = json.loads(entry_file.read_text())
    assert entry["counts"] == {"samples": 12, "class_counts": [7, 0, 5]}
    assert entry["config"]["num_classes"] == 3
