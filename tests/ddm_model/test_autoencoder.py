"""Latent space: reading a diffusers AutoencoderKL from a local folder, its identity, the packed
file that carries it, encoding and decoding, and the latents' cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddm_model.autoencoder import (
    AutoencoderError,
    latent_dataset,
    load_packed,
    pack,
    read_folder,
    verify_packed,
)
from ddm_model.data import ImageDataset, load_digits
from tests.diffusers_support import require_diffusers

require_diffusers()

from tests.autoencoders import save_small_autoencoder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_small_autoencoder(tmp_path_factory.mktemp("vae") / "small")


@pytest.fixture(scope="module")
def autoencoder(folder):
    return read_folder(folder)


def test_the_identity_names_config_and_weights_whatever_file_holds_them(folder, autoencoder, tmp_path):
    assert read_folder(folder).identity == autoencoder.identity  # stable across reads
    assert autoencoder.factor == 2 and autoencoder.latent_channels == 4 and autoencoder.in_channels == 3
    packed = tmp_path / "ae.safetensors"
    pack(autoencoder, packed)
    again = tmp_path / "again.safetensors"
    pack(load_packed(packed, expect_identity=autoencoder.identity), again)
    assert packed.read_bytes() == again.read_bytes()  # the same autoencoder, the same bytes
    assert verify_packed(packed) == autoencoder.identity
    # Another autoencoder (other weights) has another identity, and is refused where one is expected.
    other = read_folder(save_small_autoencoder(tmp_path / "other", seed=1))
    assert other.identity != autoencoder.identity
    with pytest.raises(AutoencoderError, match="not the expected"):
        verify_packed(packed, expect_identity=other.identity)


def test_a_packed_file_whose_weights_or_config_changed_is_refused(autoencoder, tmp_path):
    packed = tmp_path / "ae.safetensors"
    pack(autoencoder, packed)
    with safe_open(str(packed), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # one weight nudged, the header's identity kept
    save_file(tensors, str(tmp_path / "weights.safetensors"), metadata=meta)
    with pytest.raises(AutoencoderError, match="do not match the identity"):
        verify_packed(tmp_path / "weights.safetensors")
    description = json.loads(meta["ddm"])
    description["config"]["scaling_factor"] = 1.0  # the config changed, the identity kept
    with safe_open(str(packed), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "config.safetensors"), metadata={"ddm": json.dumps(description)})
    with pytest.raises(AutoencoderError, match="do not match the identity"):
        load_packed(tmp_path / "config.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AutoencoderError, match="not a ddm autoencoder file"):
        verify_packed(tmp_path / "junk.safetensors")


def test_encode_and_decode_shapes_grey_images_and_sizes(autoencoder):
    grey = torch.rand(5, 1, 8, 8) * 2 - 1
    latents = autoencoder.encode(grey, batch_size=2)
    assert latents.shape == (5, 4, 4, 4) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, autoencoder.encode(grey.expand(-1, 3, -1, -1)))  # grey is read as RGB
    assert torch.equal(autoencoder.encode(grey), autoencoder.encode(grey))  # the posterior mean: no randomness
    # The scaling: latents are the encoder's mean times the scaling factor.
    mean = autoencoder.model.encode(grey.expand(-1, 3, -1, -1)).latent_dist.mean
    torch.testing.assert_close(latents, mean * autoencoder.scaling_factor)
    images = autoencoder.decode(latents)
    assert images.shape == (5, 3, 8, 8) and images.abs().max() <= 1.0
    with pytest.raises(AutoencoderError, match="multiple of 2"):
        autoencoder.encode(torch.zeros(1, 3, 7, 7))
    with pytest.raises(AutoencoderError, match="2 channels"):
        autoencoder.encode(torch.zeros(1, 2, 8, 8))


def test_latents_are_cached_by_pixels_and_autoencoder(autoencoder, tmp_path, monkeypatch):
    digits = load_digits()
    small = digits.subset(digits.ids[:40], name="some digits")
    latents = latent_dataset(small, autoencoder, tmp_path)
    assert latents.images.shape == (40, 4, 4, 4)
    assert torch.equal(latents.ids, small.ids) and torch.equal(latents.labels, small.labels)
    assert len(list(tmp_path.iterdir())) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(type(autoencoder), "encode", no_encoding)
    cached = latent_dataset(small, autoencoder, tmp_path)
    assert cached.fingerprint() == latents.fingerprint()
    # Other pixels miss the cache.
    other = ImageDataset(small.images.flip(-1), small.ids, small.labels, 10, "flipped")
    with pytest.raises(AssertionError, match="encoded again"):
        latent_dataset(other, autoencoder, tmp_path)
    # A damaged cache file is encoded again, not trusted.
    monkeypatch.undo()
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(cache.read_bytes()[:100])
    assert latent_dataset(small, autoencoder, tmp_path).fingerprint() == latents.fingerprint()


def test_a_folder_that_is_not_a_local_autoencoder_is_one_clear_error(folder, tmp_path):
    with pytest.raises(AutoencoderError, match=r"no autoencoder at .*nothing is downloaded"):
        read_folder(tmp_path / "absent")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    (bare / "diffusion_pytorch_model.bin").write_bytes(b"a pickle is never read")
    with pytest.raises(AutoencoderError, match="safetensors weights only"):
        read_folder(bare)
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(AutoencoderError, match="UNet2DModel, not an AutoencoderKL"):
        read_folder(unet)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    (wrong / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(AutoencoderError, match="cannot read the autoencoder"):
        read_folder(wrong)


def test_without_diffusers_the_error_says_what_to_install(folder):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from ddm_model.autoencoder import AutoencoderError, read_folder\n"
        "try:\n"
        f"    read_folder({str(folder)!r})\n"
        "except AutoencoderError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "latent experts need diffusers, which is not installed: pip install 'ddm[latent]'"
