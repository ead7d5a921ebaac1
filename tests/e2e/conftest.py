import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cli(name: str) -> list[str]:
    """The installed console script when there is one, else the same entry point via -m."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"ddm-coordinator": "coordinator.cli", "ddm-client": "client.cli"}[name]]


@pytest.fixture
def run():
    def run(name, *args, cwd=None, timeout=300):
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        return subprocess.run(
            [*cli(name), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
        )

    return run
