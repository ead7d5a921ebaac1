"""The machine a benchmark ran on, for its report: CPU model, cores, memory, OS, and the
versions of what it measured (``version``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from pathlib import Path


def version(dist: str) -> str:
    """An installed distribution's version, or "absent"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def describe(software: str) -> dict:
    """{cpu, cores, ram, os, software}: ``software`` names the versions that matter to the bench."""
    import psutil

    return {
        "cpu": cpu_model(),
        "cores": f"{psutil.cpu_count(logical=True)} logical ({psutil.cpu_count(logical=False)} physical)",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "software": software,
    }
