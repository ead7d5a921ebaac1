"""diffusers for the tests that measure ddm against it (bench/train_speed.py): it is no
dependency of ddm, only a yardstick, installed beside the bench's requirements.

Where it is missing those tests are skipped, saying how to install it; with
``DDM_REQUIRE_DIFFUSERS=1`` they fail instead, so that nothing is hidden where it should be there.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REQUIRED = "DDM_REQUIRE_DIFFUSERS"


def require_diffusers() -> None:
    """Call at the top of a test module, before anything imports diffusers."""
    if importlib.util.find_spec("diffusers") is not None:
        return
    why = "diffusers is not installed; the training-speed bench compares against it: pip install diffusers"
    if os.environ.get(REQUIRED):
        pytest.fail(f"{REQUIRED} is set but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)
