"""Feature extractors: PCA of pixels, and DINOv2's clear errors when its local weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm_model.errors import DDMError
from ddm_model.features import DinoV2Features, FeatureError, PixelFeatures, make_extractor
from tests.helpers import one_line_error


@pytest.fixture(scope="module")
def digit_features(digits):
    return PixelFeatures(seed=0)(digits.images)


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


# ---------------------------------------------------------------------------------------------
# pixels


def test_pixel_features_shape_and_finiteness(digits, digit_features):
    assert isinstance(digit_features, np.ndarray)
    assert digit_features.shape == (1797, 32)
    assert np.issubdtype(digit_features.dtype, np.floating)
    assert np.isfinite(digit_features).all()
    # PCA output: centred, components ordered by decreasing variance, not all zero.
    np.testing.assert_allclose(digit_features.mean(0), 0.0, atol=1e-9)
    variances = digit_features.var(0)
    assert (np.diff(variances) <= 1e-9).all()
    assert variances[0] > variances[-1] > 0


def test_pixel_features_are_deterministic(digits, digit_features):
    again = PixelFeatures(seed=0)(digits.images)
    assert np.array_equal(again, digit_features)
    assert np.array_equal(PixelFeatures(seed=5)(digits.images[:200]), PixelFeatures(seed=5)(digits.images[:200]))


def test_pixel_features_with_all_components_preserve_distances(digits):
    """With as many components as pixels, PCA is a rotation: pairwise distances are unchanged."""
    images = digits.images[:60]
    features = PixelFeatures(size=8, components=64)(images)
    assert features.shape == (60, 60)  # capped by the number of samples
    flat = images.flatten(1).numpy()
    np.testing.assert_allclose(pairwise_sq_distances(features), pairwise_sq_distances(flat), rtol=1e-5, atol=1e-5)


def test_pixel_features_average_over_areas(digits):
    """A 16x16 image made of 2x2 blocks averages back to the 8x8 image it came from."""
    images = digits.images[:100]
    upsampled = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert upsampled.shape == (100, 1, 16, 16)
    small = PixelFeatures(size=8, components=10)(images)
    large = PixelFeatures(size=8, components=10)(upsampled)
    np.testing.assert_allclose(large, small, atol=1e-5)
    # At full resolution the 16x16 images carry the same information: same distances again.
    full = PixelFeatures(size=16, components=100)(upsampled)
    np.testing.assert_allclose(
        pairwise_sq_distances(full), 4 * pairwise_sq_distances(images.flatten(1).numpy()), rtol=1e-5, atol=1e-4
    )


def test_pixel_features_components_capped_by_samples_and_dimensions():
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert PixelFeatures(size=8, components=32)(images).shape == (5, 5)  # size capped at the image's 4
    many = torch.rand(50, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert PixelFeatures(size=8, components=32)(many).shape == (50, 4)


# ---------------------------------------------------------------------------------------------
# make_extractor and DINOv2


def test_make_extractor_pixels():
    extractor = make_extractor("pixels", seed=3)
    assert isinstance(extractor, PixelFeatures)
    assert extractor.name == "pixels"
    assert extractor.seed == 3


@pytest.mark.parametrize("name", ["nope", "Pixels", "dino", ""])
def test_make_extractor_unknown_name(name):
    with pytest.raises(FeatureError) as err:
        make_extractor(name)
    message = one_line_error(err)
    assert repr(name) in message and "pixels" in message and "dinov2" in message


def test_dinov2_without_weights():
    with pytest.raises(FeatureError) as err:
        DinoV2Features(None)
    message = one_line_error(err)
    assert "config.json" in message and "model.safetensors" in message
    with pytest.raises(FeatureError) as err:
        make_extractor("dinov2")
    assert one_line_error(err) == message


def test_dinov2_missing_folder(tmp_path):
    missing = tmp_path / "dinov2-small"
    with pytest.raises(FeatureError) as err:
        DinoV2Features(missing)
    message = one_line_error(err)
    assert str(missing) in message and "does not exist" in message
    with pytest.raises(FeatureError) as err:
        make_extractor("dinov2", weights=str(missing))
    assert one_line_error(err) == message


def test_dinov2_path_that_is_a_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FeatureError) as err:
        DinoV2Features(file)
    assert "does not exist" in one_line_error(err)


def test_dinov2_folder_without_model_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "dinov2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not used: only safetensors is accepted")
    with pytest.raises(FeatureError) as err:
        DinoV2Features(tmp_path)
    message = one_line_error(err)
    assert str(tmp_path) in message and "model.safetensors" in message and "config.json" not in message


def test_dinov2_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FeatureError) as err:
        DinoV2Features(tmp_path)
    assert "config.json" in one_line_error(err)


def test_feature_error_is_a_ddm_error():
    assert issubclass(FeatureError, DDMError)
