"""What the dashboard serves: ``build_status`` and ``build_events``, the same functions that
`ddm-coordinator status --json` and `events --json` print, read from the coordinator's own
registry. A status is built at most once per ``max_age`` seconds however many pages poll."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from ..home import CoordinatorConfig, Home
from ..registry import Registry
from ..status import build_events, build_status

MAX_EVENTS = 500  # the most events one request returns
GRID_NAME = re.compile(r"[0-9a-f]{64}\.png")


class DashboardData:
    def __init__(
        self, home: Home, config: CoordinatorConfig, registry: Registry, key_fingerprint: str, max_age: float = 1.0
    ):
        self.home, self.config, self.registry = home, config, registry
        self.key_fingerprint = key_fingerprint
        self.max_age = max_age
        self._lock = threading.Lock()
        self._status: dict | None = None
        self._built = float("-inf")

    def status(self) -> dict:
        with self._lock:
            if self._status is None or time.monotonic() - self._built >= self.max_age:
                self._status = build_status(self.home, self.config, self.registry, self.key_fingerprint)
                self._built = time.monotonic()
            return self._status

    def events(self, limit: int, island_id: str | None = None, kind: str | None = None) -> list[dict]:
        return build_events(self.registry, limit=max(1, min(limit, MAX_EVENTS)), island_id=island_id, kind=kind)

    def grid(self, name: str) -> Path | None:
        """The sample grid file ``name`` (as status names it), if it is one and exists."""
        if not GRID_NAME.fullmatch(name):
            return None
        path = self.home.samples / name
        return path if path.is_file() else None
