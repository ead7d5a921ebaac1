"""Fixtures shared by the whole suite."""

import pytest

from ddm_model.data import ImageDataset, load_digits


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    """A fresh copy of the built-in digits per test module (tests must not mutate it)."""
    return load_digits()
