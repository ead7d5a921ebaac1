"""The Flower app directory that `flwr run` takes: a pyproject.toml alone, naming ddm's installed
ServerApp (coordinator/flower_server.py) and ClientApp (client/flower_client.py) and the run
config keys with their defaults. ``ddm-coordinator flower-app DIR --home HOME`` writes it; no
code goes in the directory, so both sides run the ddm their machine has installed.

This module does not import flwr: the command works without the ``flower`` extra.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ddm_model import __version__
from ddm_model.fsutil import atomic_path

from .home import HomeError

SERVER_APP = "coordinator.flower_server:app"
CLIENT_APP = "client.flower_client:app"


@dataclass(frozen=True)
class RunSettings:
    home: Path
    expert_timeout_s: float = 43200.0
    poll_s: float = 2.0
    wait_for_nodes_s: float = 600.0
    listen: str = ""  # also serve ddm's gRPC port here, for nodes that can reach it to upload through
    address: str = ""  # the address nodes dial; default: listen
    no_tls: bool = False

    @classmethod
    def from_run_config(cls, config: dict) -> RunSettings:
        home = config.get("home") or os.environ.get("DDM_HOME")
        if not home:
            raise HomeError("no coordinator home: pass --run-config 'home=\"/path/to/home\"' (or set DDM_HOME)")
        try:
            return cls(
                home=Path(str(home)),
                expert_timeout_s=float(config.get("expert-timeout-s", cls.expert_timeout_s)),
                poll_s=float(config.get("poll-s", cls.poll_s)),
                wait_for_nodes_s=float(config.get("wait-for-nodes-s", cls.wait_for_nodes_s)),
                listen=str(config.get("listen", "")),
                address=str(config.get("address", "") or config.get("listen", "")),
                no_tls=str(config.get("no-tls", "false")).lower() in ("true", "1", "yes"),
            )
        except (TypeError, ValueError) as exc:
            raise HomeError(f"a run config value is not a number: {exc}") from None

    def to_run_config(self) -> dict:
        """The run config keys, as `flwr run --run-config` names them."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        values["home"] = str(self.home)
        return values


def app_pyproject(settings: RunSettings) -> str:
    config = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.to_run_config().items())
    return f"""# The ddm Flower app: `flwr run DIR FEDERATION [--run-config 'key=value ...']`.
# Every machine of the federation needs ddm with its flower extra installed
# (pip install 'ddm[flower]'); the SuperLink runs with --disable-runtime-dependency-installation.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ddm-flower"
version = "{__version__}"
description = "Train a ddm ensemble over this Flower federation"
dependencies = []

[tool.flwr.app]
publisher = "ddm"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
{config}
"""


def write_app(directory: Path, settings: RunSettings) -> Path:
    """Write DIR/pyproject.toml; refuses a directory holding anything else (a .py file there
    would shadow the installed ddm on both sides)."""
    directory = Path(directory)
    if directory.exists() and any(p.name != "pyproject.toml" for p in directory.iterdir()):
        raise HomeError(f"{directory} holds other files; give an empty or new directory for the Flower app")
    target = directory / "pyproject.toml"
    with atomic_path(target) as tmp:
        tmp.write_text(app_pyproject(settings))
    return target


