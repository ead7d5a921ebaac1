"""Differentially private islands end to end: a siloed coordinator that requires epsilon <= 8
(`init --require-dp-epsilon 8`), an island started without --dp-epsilon that gives its lease
back in one line, and islands that train with `join --dp-epsilon` (real processes): their
experts are signed with the guarantee, their heartbeats carry no loss, `status` and the
downloaded manifest state the ensemble's guarantee."""

import json

import pytest

from ddm_model.privacy import Guarantee

from .test_siloed import make_silos

EXPERTS = 2
STEPS = 20


@pytest.mark.slow
def test_private_islands_are_signed_with_their_guarantee_and_others_are_turned_away(coordinator, spawn, run, tmp_path):
    silos = make_silos(tmp_path)
    coord = coordinator(
        "--mode",
        "siloed",
        "--image-size",
        "8",
        "--channels",
        "1",
        "--experts",
        str(EXPERTS),
        "--preset",
        "tiny",
        "--steps",
        str(STEPS),
        "--batch-size",
        "32",
        "--router-steps",
        "10",
        "--router-samples",
        "32",
        "--heartbeat-seconds",
        "1",
        "--lease-seconds",
        "30",
        "--require-dp-epsilon",
        "8",
    )

    def join(k: int, *extra) -> list:
        state, data = tmp_path / f"site-{k}" / "state", silos[k][0]
        once = ["--data", data, "--once", "--threads", "1", *extra]
        return ["ddm-client", "join", *coord.connect_args, "--token", coord.invite(), "--state-dir", state, *once]

    refused = run(*join(2), timeout=240)  # no --dp-epsilon: the lease goes back before any training
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = refused.stderr.strip().splitlines()[-1]  # after the enrollment's and the lease's notes
    assert error.startswith("error: ") and "signs only experts private to epsilon <= 8" in error
    assert "rejoin with --dp-epsilon 8" in error
    assert [e["state"] for e in coord.status()["experts"]] == ["open"] * EXPERTS
    private = ["--dp-epsilon", "8", "--dp-noise-pairs", "2"]
    islands = [spawn(*join(k, *private), label=f"island-{k}") for k in range(EXPERTS)]
    for island in islands:
        assert island.wait(timeout=240) == 0, island.stderr()[-2000:]
        assert "signed by the coordinator" in island.stderr()
    coord.wait_published(180)

    status = coord.status()
    assert status["coordinator"]["require_dp_epsilon"] == 8
    for expert in status["experts"]:
        assert expert["state"] == "signed" and expert["step"] == STEPS
        assert expert["loss"] is None  # the islands' heartbeats carried no loss
        g = Guarantee.from_dict(expert["privacy"]).verify()
        assert g.epsilon <= 8 and g.steps == STEPS and g.noise_pairs == 2 and g.delta == 1e-5

    ensemble = tmp_path / "ensemble"
    reader = ["--token", coord.invite("reader"), "--state-dir", tmp_path / "reader"]
    got = run("ddm-client", "download", *coord.connect_args, "--out", ensemble, *reader)
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = json.loads((ensemble / "manifest.json").read_text())
    guarantees = [item["entry"]["privacy"] for item in manifest["experts"]]
    assert manifest["privacy"]["epsilon"] == max(g["epsilon"] for g in guarantees)
    said = f"differentially private: epsilon {manifest['privacy']['epsilon']:.3g}, delta 1e-05"
    assert said in got.stdout and f"{EXPERTS} experts" in got.stdout
    for item in manifest["experts"]:
        assert "final_loss" not in item["entry"]["metrics"]  # a loss is a statistic of the silo
        sizes = len(silos[0][1]), len(silos[1][1]), len(silos[2][1])
        assert round(32 / item["entry"]["privacy"]["sample_rate"]) in sizes  # the silo's N, as stated
