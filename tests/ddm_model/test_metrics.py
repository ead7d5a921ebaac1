"""Fréchet distance and the dataset's own feature network."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddm_model.data import ImageDataset, load_dataset, load_digits
from ddm_model.grid import save_grid
from ddm_model.metrics import Evaluator, default_epochs, frechet_distance


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    n = 200_000
    a = rng.normal([0.0, 1.0], [1.0, 2.0], size=(n, 2))
    b = rng.normal([3.0, 1.0], [0.5, 2.0], size=(n, 2))
    # |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 for diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(9.0 + 0.25, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.build(load_digits(), epochs=10)


def test_feature_network_classifies_digits(evaluator):
    assert evaluator.held_out_accuracy > 0.9


def test_frechet_ranks_real_above_degraded(evaluator):
    digits = load_digits()
    g = torch.Generator().manual_seed(0)
    real = evaluator.frechet(digits.images)
    noisy = evaluator.frechet(digits.images + 0.5 * torch.randn(digits.images.shape, generator=g))
    noise = evaluator.frechet(torch.randn(digits.images.shape, generator=g).clamp(-1, 1))
    assert real == pytest.approx(0.0, abs=1e-6)
    assert 0 < evaluator.real_vs_real() < noisy < noise


def test_class_histogram_sees_mode_collapse(evaluator):
    digits = load_digits()
    balanced = evaluator.class_histogram(digits.images)
    assert balanced.sum() == pytest.approx(1.0)
    assert np.abs(balanced - evaluator.real_histogram).max() < 0.03
    only_zeros = evaluator.class_histogram(digits.images[digits.labels == 0])
    assert only_zeros.argmax() == 0 and only_zeros[0] > 0.9


def test_default_epochs_adapt_to_the_training_set_size():
    assert default_epochs(1527) == 30  # digits' 85% split keeps its 30 passes
    assert default_epochs(60_000) == 5  # Fashion-MNIST: 300,000 samples
    assert default_epochs(51_000) == 6
    assert default_epochs(10_000_000) == 1
    assert default_epochs(0) == 30


def test_evaluator_reports_accuracy_on_a_held_out_test_set():
    """Trained on all of a Fashion-MNIST slice, scored on a slice of the test split."""
    train = load_dataset("fashion-mnist").subset(range(1500))
    test = load_dataset("fashion-mnist-test").subset(range(60_000, 60_400))
    evaluator = Evaluator.build(train, epochs=2, test=test)
    on_test = (evaluator.predict(test.images) == test.labels).float().mean().item()
    assert evaluator.held_out_accuracy == pytest.approx(on_test)
    assert evaluator.held_out_accuracy > 0.4  # ten classes: chance is 0.1
    assert evaluator.reference.shape == (1500, 64)  # features of every training image
    assert evaluator.real_histogram.sum() == pytest.approx(1.0)


def test_evaluator_refuses_a_test_set_it_cannot_score(digits):
    unlabelled = digits.without_labels()
    with pytest.raises(ValueError, match="class labels"):
        Evaluator.build(digits, test=unlabelled)
    wrong_shape = ImageDataset(torch.zeros(2, 1, 4, 4), torch.arange(2), torch.zeros(2, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="shaped like"):
        Evaluator.build(digits, test=wrong_shape)
    with pytest.raises(ValueError, match="cluster ids"):
        Evaluator.build(digits, labels=torch.zeros(len(digits)), test=digits)


def test_grid_png_has_the_expected_layout(tmp_path):
    images = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 1, 8, 8)
    path = save_grid(images, tmp_path / "g.png", columns=5, scale=2, padding=1)
    with Image.open(path) as img:
        assert img.size == (5 * 17 + 1, 2 * 17 + 1) and img.mode == "L"
        pixels = np.asarray(img)
    assert pixels[1, 1] == 0 and pixels[18 + 1, 4 * 17 + 1] == 255  # first tile black, last white
    assert pixels[0, 0] == 255  # padding
    rgb = save_grid(torch.zeros(3, 3, 4, 4), tmp_path / "rgb.png")
    with Image.open(rgb) as img:
        assert img.mode == "RGB"
    with pytest.raises(ValueError):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
