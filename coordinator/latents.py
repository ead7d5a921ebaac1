"""A latent home's autoencoder and the coordinator's own data in the experts' space.

The coordinator encodes what it trains or judges on itself, the clustered dataset for the
router and distillation and each cluster's probe slice, with the autoencoder packed into its
store at init, once: the latents are cached under HOME/work/latents, named after the pixels'
fingerprint and the autoencoder's identity. A pixel home's data passes through unchanged.
"""

from __future__ import annotations

import threading

from ddm_model.autoencoder import Autoencoder, latent_dataset, load_packed
from ddm_model.data import ImageDataset

from .home import CoordinatorConfig, Home

_loaded: dict[tuple[str, str], Autoencoder] = {}
_lock = threading.Lock()


def home_autoencoder(home: Home, config: CoordinatorConfig) -> Autoencoder | None:
    """The home's autoencoder, checked against the identity init recorded (None: a pixel home)."""
    described = config.autoencoder
    if not described:
        return None
    key = (str(home.root), described["sha256"])
    with _lock:
        if key not in _loaded:
            path = home.artifacts / described["sha256"]
            _loaded[key] = load_packed(path, expect_identity=described["identity"])
        return _loaded[key]


def in_model_space(home: Home, config: CoordinatorConfig, data: ImageDataset) -> ImageDataset:
    """``data`` as the experts see it: its latents in a latent home, else itself."""
    autoencoder = home_autoencoder(home, config)
    if autoencoder is None:
        return data
    return latent_dataset(data, autoencoder, home.work / "latents")
