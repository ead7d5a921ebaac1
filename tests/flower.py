"""flwr for the tests of ddm's Flower apps: it comes with the ``flower`` extra, on Python 3.11
and newer (./ddm.sh test installs it there).

Where it is missing those tests are skipped, saying how to install it; with
``DDM_REQUIRE_FLOWER=1`` (CI sets it) they fail instead, so that nothing is hidden there.
"""

from __future__ import annotations

import sys

from tests.helpers import require_module

REQUIRED = "DDM_REQUIRE_FLOWER"


def require_flower() -> None:
    """Call at the top of a test module, before importing flwr or ddm's Flower apps."""
    why = (
        f"flwr is not installed (Python {sys.version_info.major}.{sys.version_info.minor}); the Flower tests need"
        " the flower extra on Python >= 3.11: pip install -e '.[test,flower]'"
    )
    require_module("flwr", REQUIRED, why)
