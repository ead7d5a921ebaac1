"""Who may import whom (../DESIGN.md): client -> protocol <- coordinator, both -> ddm_model;
ddm_model and protocol import neither side; protocol needs no torch; flwr is imported only by
the two Flower apps, which nothing else imports, so the default install runs without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "client", "ddm_model", "protocol")
FLOWER_APPS = {"coordinator/flower_server.py", "client/flower_client.py"}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in it (a function's own
    imports too), with relative imports resolved to their package."""
    package = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(f"{package}.{node.module}" if node.module else package)
            else:
                found.add(node.module)
    return found


def modules() -> dict[str, set[str]]:
    return {
        str(path.relative_to(ROOT)): imports_of(path)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts and not path.name.startswith("ddm_pb2")
    }


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_arrows_run_one_way():
    allowed = {
        "ddm_model": {"ddm_model"},
        "protocol": {"protocol"},
        "client": {"client", "protocol", "ddm_model"},
        "coordinator": {"coordinator", "protocol", "ddm_model"},
    }
    for module, names in modules().items():
        package = module.split("/")[0]
        ours = {top(n) for n in names if top(n) in PACKAGES}
        assert ours <= allowed[package], f"{module} imports {sorted(ours - allowed[package])}"


def test_protocol_needs_no_torch():
    for module, names in modules().items():
        if module.startswith("protocol/"):
            assert "torch" not in {top(n) for n in names}, module


def test_only_the_flower_apps_import_flwr_and_nothing_imports_them():
    apps = {"coordinator.flower_server", "client.flower_client"}
    found = modules()
    for app in FLOWER_APPS:  # the check reads imports for real: the apps' own are seen
        assert "flwr" in {top(n) for n in found[app]}, app
    for module, names in found.items():
        if module not in FLOWER_APPS:
            assert "flwr" not in {top(n) for n in names}, f"{module} imports flwr"
        assert not names & apps, f"{module} imports a Flower app"


def test_the_command_lines_and_the_server_load_without_flwr():
    code = (
        "import sys\n"
        "import coordinator.cli, coordinator.server, coordinator.flower_project, client.cli, client.island\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
