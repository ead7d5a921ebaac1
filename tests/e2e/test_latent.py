"""Latent experts end to end, with real processes, class-conditional: `init --latent
--class-conditional` on a small AutoencoderKL the test saves itself, two islands that fetch it
and train on their shards' latents, the probe check and the router on latents, the router's
FLOPs-share budget, the clusters' class shares in the signed manifest, a manifest that names the
autoencoder, `download` that verifies it and `sample --class N --cfg S` that decodes with it;
then a distilled student, decoded the same way. (Class conditioning acts the same in pixel and
latent space, so this run stands for both.)"""

import json

import numpy as np
import pytest
import torch

from ddm_model.clustering import Clustering
from ddm_model.data import load_digits
from ddm_model.router import DEFAULT_ROUTER_SHARE, router_steps_for
from tests.diffusers_support import require_diffusers
from tests.helpers import one_line_exit

require_diffusers()

from client.sample import SampleOptions, sample_images  # noqa: E402
from coordinator.distill import DistillOptions, distill  # noqa: E402
from coordinator.home import Home  # noqa: E402
from ddm_model.autoencoder import read_folder  # noqa: E402
from ddm_model.errors import UsageError  # noqa: E402
from tests.autoencoders import save_small_autoencoder  # noqa: E402


def decoded(images, n: int) -> None:
    """Samples decoded by the autoencoder: n 8x8 RGB images in [-1, 1], not 4x4x4 latents."""
    images = np.asarray(images)
    assert images.shape == (n, 3, 8, 8) and np.isfinite(images).all() and np.abs(images).max() <= 1.0
    assert images.std() > 0


@pytest.mark.slow
def test_a_class_conditional_latent_ensemble_trains_publishes_and_decodes(coordinator, spawn, run, tmp_path):
    folder = save_small_autoencoder(tmp_path / "vae")
    identity = read_folder(folder).identity
    coord = coordinator(
        *("--latent", folder, "--experts", "2", "--preset", "tiny", "--steps", "30", "--class-conditional"),
        *("--heartbeat-seconds", "1", "--lease-seconds", "30"),
    )
    config = json.loads((coord.home / "config.json").read_text())
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (4, 4)  # 8x8 digits, factor 2
    assert config["autoencoder"]["identity"] == identity and config["autoencoder"]["image"] == [1, 8, 8]
    assert coord.status()["coordinator"]["latent"]["shape"] == [4, 4, 4]

    islands = [
        spawn(
            "ddm-client",
            "join",
            *coord.connect_args,
            *("--token", coord.invite(), "--state-dir", tmp_path / f"island-{k}", "--once", "--threads", "1"),
            label=f"island-{k}",
        )
        for k in range(2)
    ]
    for island in islands:
        assert island.wait(timeout=240) == 0, island.stderr()[-2000:]
    coord.wait_published(180)
    for k in range(2):  # each island keeps the autoencoder it fetched and its shard's latents
        cached = sorted(p.name for p in (tmp_path / f"island-{k}" / "latents").iterdir())
        assert cached[0] == f"autoencoder-{config['autoencoder']['sha256']}.safetensors"
        assert cached[1].startswith("latents-") and len(cached) == 2

    ensemble, reader = tmp_path / "ensemble", tmp_path / "reader"
    reader_token = coord.invite("reader")

    def download():
        return run(
            "ddm-client",
            "download",
            *coord.connect_args,
            *("--out", ensemble, "--fingerprint", coord.fingerprint),
            *("--token", reader_token, "--state-dir", reader),
        )

    got = download()
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert manifest["autoencoder"]["identity"] == identity
    assert manifest["autoencoder"]["sha256"] == config["autoencoder"]["sha256"]
    router = manifest["router"]
    assert router["config"]["in_channels"] == 4
    assert router["config"]["num_classes"] == 10 and router["config"]["preset"] == "tiny"  # the experts' preset
    for item in manifest["experts"]:  # the probe check ran on the probe slices' latents, with the null label
        entry = item["entry"]
        assert entry["config"]["in_channels"] == 4 and entry["config"]["image_size"] == 4
        assert entry["config"]["num_classes"] == 10
        assert entry["probe"]["loss"] <= 0.95 * entry["probe"]["untrained_loss"]
    assert (ensemble / "autoencoder.safetensors").is_file()

    # The router's steps cost the default share of the signed experts' training FLOPs.
    budget = router["budget"]
    expert_flops = sum(item["entry"]["flops"] for item in manifest["experts"])
    assert budget["rule"] == "share" and budget["share"] == DEFAULT_ROUTER_SHARE
    assert budget["expert_flops"] == expert_flops and budget["step_flops"] > 0
    assert router["steps"] == router_steps_for(DEFAULT_ROUTER_SHARE, expert_flops, budget["step_flops"])
    assert router["flops"] == router["steps"] * budget["step_flops"]
    status = coord.status()["router"]
    assert status["step"] == status["steps"] == router["steps"]

    # The shares are the clusters' sizes and their digits' classes, in the manifest's order.
    clustering = Clustering.load(coord.home / "clustering.safetensors")
    digits = load_digits()
    shares = manifest["shares"]
    assert shares["source"] == "clusters"
    assert shares["clusters"] == [int(clustering.sizes[c]) for c in router["clusters"]]
    for c, row in zip(router["clusters"], shares["classes"], strict=True):
        labels = digits.labels[digits.positions(clustering.members(c))]
        assert row == torch.bincount(labels, minlength=10).tolist()

    def sample(*args):
        return run("ddm-client", "sample", ensemble, "--state-dir", reader, "--out", tmp_path / "s.png", *args)

    npz = tmp_path / "ensemble.npz"
    drawn = sample("--n", "6", "--class", "3", "--cfg", "2", "--npz", npz)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    with np.load(npz) as saved:  # decoded: 8x8 RGB images, not 4x4x4 latents
        decoded(saved["images"], 6)

    # The same sampling in this process (each `sample` process pays diffusers' import): the
    # class's bounds, per-step routing, where the router sees the class too, and the student.
    trusted = {coord.fingerprint}
    with pytest.raises(UsageError, match="--class 10 is out of range: this model has classes 0 to 9"):
        sample_images(ensemble, trusted, SampleOptions(n=2, class_label=10))
    with pytest.raises(UsageError, match="give --class N too"):
        sample_images(ensemble, trusted, SampleOptions(n=2, cfg=2.0))
    decoded(sample_images(ensemble, trusted, SampleOptions(n=4, routing="top2", class_label=3)), 4)
    # Distilled in this process too (a `distill` process would pay diffusers' import again; the
    # command line itself is test_distill.py's): published as a new manifest version.
    distilled = distill(Home(coord.home), DistillOptions(steps=20), progress=False)
    assert distilled.published and (distilled.steps, distilled.teacher_ensemble_id) == (20, manifest["ensemble_id"])
    assert download().returncode == 0
    assert json.loads((ensemble / "manifest.json").read_text())["student"]["config"]["in_channels"] == 4
    decoded(sample_images(ensemble, trusted, SampleOptions(n=6, model="student", class_label=3, cfg=2.0)), 6)

    # An autoencoder swapped in the downloaded folder is refused before anything is decoded.
    other = tmp_path / "other.safetensors"
    from ddm_model.autoencoder import pack

    pack(read_folder(save_small_autoencoder(tmp_path / "other-vae", seed=1)), other)
    (ensemble / "autoencoder.safetensors").write_bytes(other.read_bytes())
    one_line_exit(sample("--n", "2"), "does not match the signed manifest")


@pytest.mark.slow
def test_latent_init_refuses_a_missing_autoencoder_in_one_line(run, tmp_path):
    home = tmp_path / "home"
    result = run("ddm-coordinator", "init", "--home", home, "--latent", tmp_path / "absent", "--preset", "tiny")
    one_line_exit(result, "no autoencoder at", "nothing is downloaded")
    assert not home.exists()
