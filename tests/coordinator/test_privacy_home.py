"""A siloed coordinator that requires differentially private experts (`init --require-dp-epsilon`),
on a real loopback server: its leases say so, it refuses in one line a checkpoint that declares
no guarantee, a larger epsilon, a delta of 1/N or more, or an epsilon its own figures do not
give, and signs one that fits, with the guarantee in the signed entry, `status` and the
published manifest."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from client.island import dp_requirement_error, private_as_asked
from client.transfer import upload_checkpoint
from coordinator.bootstrap import InitOptions, init_home
from coordinator.cli import app as coordinator_app
from coordinator.home import Home, HomeError
from coordinator.status import build_status
from ddm_model.checkpoint import save_checkpoint
from ddm_model.dit import DiTConfig
from ddm_model.privacy import DPConfig, Guarantee, plan
from ddm_model.probe import untrained_model
from protocol.manifest import Manifest

from .test_service import complete_rejected, enroll, lease_for

STEPS = 5
SILO = 640  # samples on each island: above the lease's batch of 64


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("private") / "home"
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
            require_dp_epsilon=4.0,
        )
    )
    return root


# `server` (tests/coordinator/conftest.py) serves a copy of this module's template.


def checkpoint(tmp_path, lease, privacy: dict | None):
    model = untrained_model(DiTConfig.from_dict(json.loads(lease.model_config_json)), init_seed=lease.expert_id)
    path = tmp_path / f"expert-{lease.expert_id}.safetensors"
    save_checkpoint(path, model, cluster_id=lease.cluster_id, steps=STEPS, privacy=privacy)
    return path


def loose_delta(guarantee: dict, delta: float) -> dict:
    """A declaration whose arithmetic holds but whose delta is 1/N or more (``plan`` refuses to
    make one; a hand-made header can still say it)."""
    loose = Guarantee(**{**guarantee, "delta": delta})
    return {**loose.to_dict(), "epsilon": loose.accounted_epsilon()}


@pytest.mark.slow  # a real server signing two experts and assembling their ensemble
def test_only_experts_private_to_the_required_epsilon_are_signed(server, tmp_path):
    conn, _ = enroll(server)
    lease = lease_for(conn)
    assert lease.require_dp_epsilon == 4.0
    # An island started without --dp-epsilon (or with a larger one) gives the lease back at once.
    told, shown = dp_requirement_error(lease, None)
    assert "rejoin with --dp-epsilon 4" in shown and "epsilon" in told
    assert dp_requirement_error(lease, DPConfig(epsilon=8.0)) is not None
    assert dp_requirement_error(lease, DPConfig(epsilon=4.0)) is None

    fits = plan(DPConfig(epsilon=4.0), SILO, 64, STEPS).to_dict()
    for privacy, words in (
        (None, ["declares no differential-privacy guarantee", "epsilon <= 4"]),
        (plan(DPConfig(epsilon=8.0), SILO, 64, STEPS).to_dict(), ["it is private to epsilon", "epsilon <= 4"]),
        ({**fits, "epsilon": 1.0}, ["not what the rdp accountant gives"]),
        (loose_delta(fits, 0.01), ["not below 1/N", "640 samples"]),
    ):
        data = checkpoint(tmp_path, lease, privacy).read_bytes()
        complete_rejected(server, conn, lease, data, *words)

    entries = []
    for k in range(2):
        lease = lease if k == 0 else lease_for(conn)
        report = upload_checkpoint(conn, lease.lease_id, checkpoint(tmp_path, lease, fits))
        entries.append(json.loads(report.reply.entry_json))
        assert entries[-1]["privacy"] == fits  # signed with the weights it describes

    status = build_status(server.home, server.config, server.registry, server.key.fingerprint)
    assert status["coordinator"]["require_dp_epsilon"] == 4.0
    assert [e["privacy"] for e in status["experts"]] == [fits, fits]

    server.assembler.join(60)  # the last signature started the assembly
    manifest = Manifest.parse(server.registry.latest_published().manifest_json)
    assert [e["privacy"] for e in manifest.entries] == [fits, fits]
    assert manifest.privacy == {
        "epsilon": fits["epsilon"],
        "delta": fits["delta"],
        "unit": "one sample of one island's data",
        "experts": 2,
    }


def test_a_requirement_is_for_siloed_homes_and_not_served_over_flower(template, tmp_path):
    with pytest.raises(HomeError, match="--require-dp-epsilon is for siloed mode"):
        init_home(InitOptions(home=tmp_path / "shared", preset="tiny", require_dp_epsilon=4.0))
    with pytest.raises(HomeError, match="positive number"):
        init_home(
            InitOptions(
                home=tmp_path / "zero", mode="siloed", image_size=8, channels=1, preset="tiny", require_dp_epsilon=0.0
            )
        )
    assert not (tmp_path / "shared").exists() and not (tmp_path / "zero").exists()
    home = tmp_path / "home"
    shutil.copytree(template, home)
    assert Home(home).load_config().require_dp_epsilon == 4.0
    result = CliRunner().invoke(coordinator_app, ["flower-app", str(tmp_path / "app"), "--home", str(home)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "requires differentially private experts" in result.output
    assert not (tmp_path / "app").exists()


def test_a_finished_private_checkpoint_is_uploaded_again_only_for_the_same_ask():
    """An island restarted after training reuses its finished checkpoint only if it is private as
    the restart asks (or not private, without --dp-epsilon); else it trains again."""
    done = plan(DPConfig(epsilon=4.0, clip=0.5), SILO, 64, STEPS).to_dict()
    assert private_as_asked(done, DPConfig(epsilon=4.0, clip=0.5))
    assert private_as_asked(done, DPConfig(epsilon=6.0, clip=0.5))  # already stricter than asked
    assert private_as_asked(None, None)
    for asked in (
        None,
        DPConfig(epsilon=2.0, clip=0.5),
        DPConfig(epsilon=4.0, clip=1.0),
        DPConfig(epsilon=4.0, clip=0.5, noise_pairs=2),
        DPConfig(epsilon=4.0, clip=0.5, delta=1e-6),
        DPConfig(epsilon=4.0, clip=0.5, accountant="prv"),
    ):
        assert not private_as_asked(done, asked)
    assert not private_as_asked(None, DPConfig(epsilon=4.0))
