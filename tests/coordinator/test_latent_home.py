"""A latent home in siloed mode, on a real loopback server: init sizes the model for the
autoencoder's latents and stores the packed autoencoder; any enrolled identity may fetch it;
a siloed island's data is checked against the images the latents come from, and the
coordinator hears only that it does not fit."""

import json

import numpy as np
import pytest

from tests.diffusers_support import require_diffusers

require_diffusers()

from client.connection import Connection  # noqa: E402
from client.island import Unfit, load_silo  # noqa: E402
from client.latents import in_model_space, lease_autoencoder  # noqa: E402
from client.state import IslandState  # noqa: E402
from coordinator.bootstrap import InitOptions, init_home  # noqa: E402
from coordinator.clock import ManualClock  # noqa: E402
from coordinator.home import Home, HomeError  # noqa: E402
from coordinator.server import CoordinatorServer  # noqa: E402
from ddm_model.autoencoder import AutoencoderError, read_folder  # noqa: E402
from protocol import ddm_pb2 as pb  # noqa: E402
from tests.autoencoders import save_small_autoencoder  # noqa: E402


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_small_autoencoder(tmp_path_factory.mktemp("vae") / "small")


def test_a_siloed_latent_home_leases_the_autoencoder_and_checks_the_silo(vae, tmp_path):
    opts = InitOptions(
        home=tmp_path / "home", mode="siloed", image_size=8, channels=1, experts=2, preset="tiny", latent=str(vae)
    )
    home, _ = init_home(opts)
    config = home.load_config()
    assert (config.model["in_channels"], config.model["image_size"]) == (4, 4)
    assert (config.router_model["in_channels"], config.router_model["image_size"]) == (4, 4)
    assert config.autoencoder["identity"] == read_folder(vae).identity and config.autoencoder["image"] == [1, 8, 8]

    server = CoordinatorServer(Home(home.root), "127.0.0.1:0", clock=ManualClock())
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        token = server.registry.create_invite("island", 60)
        enrolled = Connection(address).unary("Enroll", pb.EnrollRequest(token=token, name="silo"))
        conn = Connection(address, enrolled.credential, attempts=1)
        lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
        assert lease.autoencoder.sha256 == config.autoencoder["sha256"]
        state = IslandState(tmp_path / "island")
        autoencoder = lease_autoencoder(conn, lease, state)
        assert autoencoder.identity == config.autoencoder["identity"]

        fits = tmp_path / "fits.npz"
        np.savez(fits, images=np.random.default_rng(0).integers(0, 255, (30, 8, 8), dtype=np.uint8))
        data = load_silo(lease, str(fits), autoencoder)
        latents = in_model_space(data, autoencoder, state)
        assert latents.images.shape == (30, 4, 4, 4)

        too_big = tmp_path / "big.npz"
        np.savez(too_big, images=np.zeros((30, 16, 16), dtype=np.uint8))
        with pytest.raises(Unfit) as refused:
            load_silo(lease, str(too_big), autoencoder)
        assert "16" not in refused.value.reason and "3x8x8" in refused.value.reason  # what fits, not what it holds
        assert "holds 3x16x16 images" in str(refused.value)

        # A reader, who holds no lease, may fetch the autoencoder too: every sample is decoded with it.
        token = server.registry.create_invite("reader", 60)
        reader = Connection(address).unary("Enroll", pb.EnrollRequest(token=token, name="reader"))
        fake = pb.Lease(autoencoder=pb.Shard(sha256=config.autoencoder["sha256"], size=config.autoencoder["size"]))
        as_reader = Connection(address, reader.credential, attempts=1)
        fetched = lease_autoencoder(as_reader, fake, IslandState(tmp_path / "reader"))
        assert fetched.identity == autoencoder.identity
    finally:
        server.stop()


def test_an_rgb_autoencoder_refuses_images_of_other_channels(vae, tmp_path):
    opts = InitOptions(home=tmp_path / "home", mode="siloed", image_size=8, channels=2, experts=2, latent=str(vae))
    with pytest.raises(HomeError, match=r"the images have 2 channels; the autoencoder .* reads 3"):
        init_home(opts)
    assert not (tmp_path / "home").exists()
    assert json.loads((vae / "config.json").read_text())["in_channels"] == 3


def test_images_the_autoencoder_cannot_downsample_are_refused(tmp_path):
    folder = save_small_autoencoder(tmp_path / "vae", levels=3)  # downsamples by 4
    opts = InitOptions(home=tmp_path / "home", image_size=10, experts=2, latent=str(folder))
    with pytest.raises(AutoencoderError, match=r"10x10 images do not fit this autoencoder.*multiple of 4"):
        init_home(opts)
    assert not (tmp_path / "home").exists()


def test_the_flower_app_refuses_a_latent_home_in_one_line(vae, tmp_path):
    from typer.testing import CliRunner

    from coordinator.cli import app

    home, _ = init_home(
        InitOptions(home=tmp_path / "home", mode="siloed", image_size=8, channels=1, experts=2, latent=str(vae))
    )
    result = CliRunner().invoke(app, ["flower-app", str(tmp_path / "app"), "--home", str(home.root)])
    assert result.exit_code == 2 and "trains latent experts" in result.output
    assert not (tmp_path / "app").exists()
