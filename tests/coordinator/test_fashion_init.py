"""`init --dataset fashion-mnist:FOLDER --class-conditional` on a slice of the real photographs."""

import json

import numpy as np
import pytest
import torch

from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from ddm_model.data import load_dataset, load_dataset_file, load_fashion_mnist
from tests.ddm_model.test_data import write_idx

pytestmark = pytest.mark.slow  # in-process coordinators that train and assemble: tens of seconds


def test_a_class_conditional_home_on_a_fashion_mnist_slice(tmp_path):
    real = load_fashion_mnist()  # Debian's dataset-fashion-mnist (.ci/run installs it)
    pixels = ((real.images[:400, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    labels = real.labels[:400].numpy().astype(np.uint8)
    folder = tmp_path / "fashion"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", pixels)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    write_idx(folder / "t10k-images-idx3-ubyte", pixels[:10])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[:10])

    source = f"fashion-mnist:{folder}"
    home, _ = init_home(
        InitOptions(home=tmp_path / "home", dataset=source, experts=2, preset="tiny", steps=5, class_conditional=True)
    )
    config = json.loads((tmp_path / "home" / "config.json").read_text())
    assert config["dataset"] == source and config["model"]["num_classes"] == 10
    assert config["router_model"]["num_classes"] == 10 and config["model"]["image_size"] == 28
    # the stored source reloads the same data; every shard carries its images' labels
    assert load_dataset(source).fingerprint() == config["dataset_fingerprint"]
    home = Home(tmp_path / "home")
    shards = [p for p in home.artifacts.iterdir() if p.stat().st_size > 100_000]
    assert len(shards) == 2
    held = sum(config["clustering"]["probe"]["sizes"])
    counts = []
    for path in shards:
        shard = load_dataset_file(path)
        assert shard.labels is not None and shard.images.shape[1:] == (1, 28, 28)
        counts.append(len(shard))
    assert sum(counts) + held == 400
