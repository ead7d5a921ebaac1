"""`ddm-coordinator distill` end to end: real islands build an ensemble, the coordinator distills
it into a student published beside it, and a reader downloads, verifies and samples it."""

import json

import numpy as np
import pytest
import torch

from coordinator.distill import DistillError, DistillOptions, distill, siloed_data
from coordinator.home import CoordinatorConfig, Home
from ddm_model.dit import DiT, DiTConfig
from ddm_model.train import seeded
from protocol.trust import verify_signature
from tests.e2e.conftest import sha256_of, wait_for


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def one_thread():
    """Float sums depend on the thread count: runs compared bit for bit use one thread, as the
    CLI runs below do (--threads 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_distill_publishes_a_signed_student_that_resumes_and_samples(coordinator, spawn, run, tmp_path, one_thread):
    coord = coordinator(
        "--experts", "2", "--preset", "tiny", "--steps", "30", "--router-preset", "tiny", "--router-steps", "20"
    )
    islands = [
        spawn(
            "ddm-client",
            "join",
            *coord.connect_args,
            "--token",
            coord.invite(),
            "--state-dir",
            tmp_path / f"island-{k}",
            "--once",
            "--threads",
            "1",
            label=f"island-{k}",
        )
        for k in range(2)
    ]
    for island in islands:
        assert island.wait(timeout=120) == 0, island.stderr()[-2000:]
    done = wait_for(
        lambda: coord.db("SELECT state, reason FROM ensembles WHERE state IN ('published', 'failed')"),
        120,
        "the ensemble to be published",
        every=0.2,
    )
    assert done[0]["state"] == "published", done
    (teacher,) = coord.db("SELECT id, manifest_json, signature FROM ensembles WHERE state = 'published'")

    def published():
        rows = coord.db("SELECT id, manifest_json FROM ensembles WHERE state = 'published' ORDER BY id")
        return [(row["id"], json.loads(row["manifest_json"])) for row in rows]

    # The command line: 10 steps, published as a new manifest version.
    result = run("ddm-coordinator", "distill", "--home", coord.home, "--steps", "10", "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "published ensemble 2 with a student distilled from ensemble 1: 10 steps" in result.stdout

    # The Python API: 20 steps resume the first 10 (their resume state is kept under HOME/work).
    home = Home(coord.home)
    resumed = distill(home, DistillOptions(steps=20), progress=False)
    assert (resumed.ensemble_id, resumed.teacher_ensemble_id, resumed.steps, resumed.published) == (3, 1, 20, True)
    # A finished run is not trained again, and a fresh run from nothing gives the very same bytes.
    assert distill(home, DistillOptions(steps=20), progress=False).published is False
    for state in coord.home.glob("work/student-*/*"):
        state.unlink()
    fresh = distill(home, DistillOptions(steps=20), progress=False)
    assert (fresh.sha256, fresh.ensemble_id, fresh.published) == (resumed.sha256, 3, False)
    versions = published()
    assert [v for v, _ in versions] == [1, 2, 3]

    base, latest = versions[0][1], versions[-1][1]
    student = latest["student"]
    assert student["sha256"] == resumed.sha256 and student["steps"] == 20 and student["teacher_ensemble_id"] == 1
    assert student["config"] == base["experts"][0]["entry"]["config"]
    metrics = student["metrics"]
    assert metrics["data_weight"] == 0.25 and metrics["trained_on"] == "the clustered dataset"
    assert 0 < metrics["teacher_mse"] < 10 and metrics["final_loss"] > 0
    # Its FLOPs count the teacher passes: more than as many expert steps, which have none.
    expert = base["experts"][0]["entry"]
    assert student["flops"] == resumed.flops > 20 * expert["flops"] / expert["steps"]
    # The new version names the very same router and experts, and the old one still verifies.
    unchanged = ("ensemble_id", "created_at", "student")
    assert {k: v for k, v in latest.items() if k not in unchanged} == {
        k: v for k, v in base.items() if k not in unchanged
    }

    # A reader downloads it all, the student included, and samples the student alone.
    ensemble = tmp_path / "ensemble"
    reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
    download = ["download", *coord.connect_args, "--out", ensemble, "--fingerprint", coord.fingerprint, *reader]
    got = run("ddm-client", *download)
    assert got.returncode == 0, got.stderr[-2000:]
    assert sha256_of(ensemble / "student.safetensors") == student["sha256"]
    key = (ensemble / "coordinator.pub").read_bytes()
    verify_signature(key, (ensemble / "manifest.json").read_bytes(), (ensemble / "manifest.sig").read_bytes(), "v3")
    verify_signature(key, teacher["manifest_json"], teacher["signature"], "v1")

    npz = tmp_path / "student.npz"
    sample = ["sample", ensemble, "--n", "16", "--out", tmp_path / "s.png", "--state-dir", tmp_path / "reader"]
    sampled = run("ddm-client", *sample, "--model", "student", "--npz", npz)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with np.load(npz) as saved:
        images = saved["images"]
    assert images.shape == (16, 1, 8, 8) and np.isfinite(images).all() and images.std() > 0.05

    # A tampered student is refused, by the student's sampler and the ensemble's alike.
    path = ensemble / "student.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    for model in ("student", "ensemble"):
        refused = run("ddm-client", *sample, "--model", model)
        assert refused.returncode == 2
        assert "student.safetensors does not match the signed manifest" in one_line(refused.stderr)

    # The coordinator distills only from experts whose stored bytes still match what it signed.
    stored = coord.home / "artifacts" / expert["sha256"]
    stored.chmod(0o644)  # the store keeps artifacts read-only
    stored.write_bytes(stored.read_bytes()[:-1] + bytes([stored.read_bytes()[-1] ^ 0x01]))
    with pytest.raises(DistillError, match=r"expert-0\.safetensors does not match the signed manifest"):
        distill(home, DistillOptions(steps=30), progress=False)
    bad = run("ddm-coordinator", "distill", "--home", coord.home, "--steps", "30")
    assert bad.returncode == 2 and "does not match the signed manifest" in one_line(bad.stderr)


def siloed_config(model: dict, per_expert: int) -> CoordinatorConfig:
    return CoordinatorConfig(
        dataset="",
        dataset_fingerprint="",
        image_size=8,
        experts=2,
        clustering={},
        model=model,
        train={},
        router_model={},
        router_train={"seed": 3},
        mode="siloed",
        router_samples=per_expert,
        router_sampling_steps=2,
    )


def test_siloed_distillation_draws_from_the_experts_by_the_manifest_shares():
    """No islands needed: the data a siloed coordinator distills on, from real class-conditional
    experts and a manifest's ``shares`` (None: an older manifest without them)."""
    cfg = DiTConfig("tiny", 8, 1, num_classes=3)
    experts = [seeded(DiT, cfg, 10 + k).eval() for k in range(2)]
    config = siloed_config(cfg.to_dict(), per_expert=20)
    shares = {"source": "islands", "clusters": [30, 10], "classes": [[0, 20, 10], [10, 0, 0]]}
    data, teacher_of, source = siloed_data(config, shares, experts, cfg.num_classes, "cpu")
    assert torch.bincount(teacher_of).tolist() == [30, 10]
    assert set(data.labels[teacher_of == 0].tolist()) == {1, 2} and data.labels[teacher_of == 1].tolist() == [0] * 10
    assert data.num_classes == 3 and data.images.shape == (40, 1, 8, 8)
    assert source == (
        "40 samples drawn from the experts, split by the cluster shares (islands),"
        " classes by each expert's class counts (2 Euler steps)"
    )
    # An older manifest without shares: equal counts, classes drawn uniformly.
    data, teacher_of, source = siloed_data(config, None, experts, cfg.num_classes, "cpu")
    assert torch.bincount(teacher_of).tolist() == [20, 20] and set(data.labels.tolist()) == {0, 1, 2}
    assert "split equally, classes uniformly" in source
    # Unusable shares are refused in one line before any sampling.
    for bad in ({"clusters": [1, 2, 3]}, {"clusters": [1, 1], "classes": [[1, 1, 1, 1], [1]]}, []):
        with pytest.raises(DistillError, match="shares") as refused:
            siloed_data(config, bad, experts, cfg.num_classes, "cpu")
        assert "\n" not in str(refused.value)
