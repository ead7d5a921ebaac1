"""Data counts and shares on a real siloed coordinator (class-conditional, 10 classes): an island
may report its sample and class counts with its checkpoint; bad reports are refused at upload;
the manifest's shares are the islands' counts when every signed expert reported them, else
uniform. Also: how the router's steps are chosen, and homes made before the FLOPs share."""

import json
import shutil

import pytest

from client.transfer import upload_checkpoint
from coordinator.assemble import router_budget
from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from ddm_model.checkpoint import save_checkpoint
from ddm_model.dit import DiTConfig
from ddm_model.probe import untrained_model
from ddm_model.router import RouterConfig
from ddm_model.train import TrainConfig
from protocol.manifest import members
from protocol.shares import check_counts

from .test_service import complete_rejected, enroll, lease_for

pytestmark = pytest.mark.slow  # in-process coordinators that train and assemble: tens of seconds

STEPS = 5  # a siloed coordinator has no data to score an expert on: any well-formed one is signed
COUNTS = [{"samples": 30, "class_counts": [3] * 10}, {"samples": 12, "class_counts": [0] * 9 + [12]}]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("siloed") / "home"
    init_home(
        InitOptions(
            home=root,
            mode="siloed",
            image_size=8,
            channels=1,
            experts=2,
            preset="tiny",
            steps=STEPS,
            router_steps=3,
            router_samples=8,
            class_conditional=True,
            classes=10,
        )
    )
    return root


# `server` (tests/coordinator/conftest.py) serves a copy of this module's class-conditional template.


def checkpoint(tmp_path, lease, counts) -> bytes:
    model = untrained_model(DiTConfig.from_dict(json.loads(lease.model_config_json)), init_seed=lease.expert_id)
    path = tmp_path / f"expert-{lease.expert_id}.safetensors"
    metrics = {"final_loss": 0.5} if counts is None else {"final_loss": 0.5, "counts": counts}
    save_checkpoint(path, model, cluster_id=lease.cluster_id, steps=STEPS, data_fingerprint="", metrics=metrics)
    return path


def published_manifest(server) -> dict:
    server.assembler.join(60)  # the last signature started the assembly
    return json.loads(server.registry.latest_published().manifest_json)


@pytest.mark.parametrize("reported", [2, 1], ids=["every-island", "one-island"])
def test_shares_are_the_islands_counts_when_every_island_reported_them(server, tmp_path, reported):
    conn, enrolled = enroll(server)
    entries = []
    for k in range(2):
        lease = lease_for(conn)
        path = checkpoint(tmp_path, lease, COUNTS[k] if k < reported else None)
        report = upload_checkpoint(conn, lease.lease_id, path)
        entry = json.loads(report.reply.entry_json)
        assert entry.get("counts") == (COUNTS[k] if k < reported else None)  # signed, out of the metrics
        assert "counts" not in entry["metrics"] and entry["metrics"]["final_loss"] == 0.5
        entries.append(entry)
    manifest = published_manifest(server)
    members(manifest, enrolled.coordinator_public_key)  # the shares pass the downloader's checks
    order = [item["entry"]["expert_id"] for item in manifest["experts"]]
    by_expert = {e["expert_id"]: e for e in entries}
    trained_on = manifest["router"]["metrics"]["trained_on"]
    kl = manifest["router"]["metrics"]["kl_by_t"]  # calibration against the exact posterior, by t
    assert len(kl) == 5 and all(value >= 0 for _, value in kl)
    if reported == 2:
        assert manifest["shares"] == {
            "source": "islands",
            "clusters": [by_expert[i]["counts"]["samples"] for i in order],
            "classes": [by_expert[i]["counts"]["class_counts"] for i in order],
        }
        # The router learns from the experts' samples in proportion to the islands' counts.
        per_expert = [round(16 * by_expert[i]["counts"]["samples"] / 42) for i in order]
        assert f"{sum(per_expert)} samples drawn from the experts in proportion" in trained_on
        assert str(per_expert) in trained_on
    else:
        assert manifest["shares"] == {"source": "uniform", "clusters": [1, 1], "classes": None}
        assert "8 samples drawn from each expert" in trained_on
    assert manifest["router"]["config"]["num_classes"] == 10
    assert manifest["router"]["budget"] == {
        "rule": "fixed",
        "share": None,
        "expert_flops": sum(e["flops"] for e in entries),
        "step_flops": None,
    }
    assert manifest["router"]["steps"] == 3


@pytest.mark.parametrize(
    "counts,words",
    [
        ({"samples": -3, "class_counts": [0] * 10}, "sample count must be an integer in [0,"),
        ({"samples": 10, "class_counts": [1] * 9}, "holds 9 counts, 10 expected"),
        ({"samples": 10, "class_counts": [2] * 10}, "sum to 20, not to the 10 samples"),
        ({"samples": 10, "class_counts": [1] * 9 + [-1 + 2]}, None),  # fine: sums to 10
        ({"samples": True, "class_counts": [0] * 10}, "sample count must be an integer"),
        ({"samples": 10**13, "class_counts": [10**12] * 10}, "sample count must be an integer in [0,"),
        ({"samples": 10}, "no class counts were reported"),
        ({"samples": 10, "class_counts": [1] * 10, "hospital": "x"}, "must be an object with 'samples'"),
        ([10], "must be an object with 'samples'"),
    ],
    ids=["negative", "wrong-length", "sum-mismatch", "good", "bool", "unbounded", "missing", "extra", "list"],
)
def test_bad_counts_in_a_checkpoint_header_are_refused_at_upload(server, tmp_path, counts, words):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    path = checkpoint(tmp_path, lease, counts)
    if words is None:
        assert json.loads(upload_checkpoint(conn, lease.lease_id, path).reply.entry_json)["counts"] == counts
        return
    message = complete_rejected(server, conn, lease, path.read_bytes(), "reported data counts are refused", words)
    assert len(message) < 500


def test_counts_for_an_unconditional_model_carry_no_classes():
    assert check_counts({"samples": 7}, 0) == {"samples": 7}
    with pytest.raises(ValueError, match="for a model without classes"):
        check_counts({"samples": 7, "class_counts": [7]}, 0)


def test_router_steps_follow_the_share_and_old_homes_keep_their_fixed_steps(template, tmp_path):
    config = Home(template).load_config()
    router_cfg = RouterConfig.from_dict({**config.router_model, "num_clusters": 2})
    train = TrainConfig.from_dict(config.router_train)
    entries = [{"flops": 10**12}, {"flops": 3 * 10**12}]
    assert router_budget(config, router_cfg, train, entries)["steps"] == 3  # --router-steps 3: fixed
    config.router_share = 0.04
    budget = router_budget(config, router_cfg, train, entries)
    assert budget["rule"] == "share" and budget["expert_flops"] == 4 * 10**12
    assert budget["steps"] == round(0.04 * 4 * 10**12 / budget["step_flops"])
    # A home whose config.json predates the share loads with fixed steps, as it trained before.
    home = tmp_path / "old"
    shutil.copytree(template, home)
    data = json.loads((home / "config.json").read_text())
    del data["router_share"]
    (home / "config.json").write_text(json.dumps(data))
    old = Home(home).load_config()
    assert old.router_share == 0 and router_budget(old, router_cfg, train, entries)["rule"] == "fixed"
