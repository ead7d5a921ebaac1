"""diffusers for the tests of latent experts and the speed bench: it comes with the ``latent``
(and ``bench``) extra, which ./ddm.sh test installs.

Where it is missing those tests are skipped, saying how to install it; with
``DDM_REQUIRE_DIFFUSERS=1`` (CI sets it) they fail instead, so that nothing is hidden there.
"""

from __future__ import annotations

from tests.helpers import require_module

REQUIRED = "DDM_REQUIRE_DIFFUSERS"


def require_diffusers() -> None:
    """Call at the top of a test module, before importing diffusers."""
    why = "diffusers is not installed; these tests need the latent extra: pip install -e '.[test,latent]'"
    require_module("diffusers", REQUIRED, why)
