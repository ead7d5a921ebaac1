"""What `pip install .` ships: every ddm package, subpackages included (an explicit list of the
top-level packages would leave coordinator.registry out of a wheel; an editable install hides it)."""

import sys
from pathlib import Path

import pytest
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_every_package_with_an_init_is_shipped():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(where=REPO, include=config["include"]))
    present = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("coordinator", "client", "ddm_model", "protocol")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert "coordinator.registry" in present
    assert present <= shipped, f"not shipped: {sorted(present - shipped)}"
    assert not {p for p in shipped if p.split(".")[0] in ("tests", "bench")}
