"""The coordinator's sense of time, injectable so that tests move it instead of sleeping.

The registry stamps rows and judges deadlines (leases, stale uploads, silent assemblies) by
``clock.now()``; the server's reaper waits for its next round with ``clock.wait`` and spaces
its staging clean-ups by ``clock.monotonic()``. A
``ManualClock`` stands still until a test calls ``advance``, and its reaper never wakes on its
own: the test runs a round with ``CoordinatorServer.reap()`` when it wants one.
"""

from __future__ import annotations

import threading
import time


class SystemClock:
    """Wall-clock time (unix seconds); waiting sleeps for real."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        """Seconds that only move forward, for intervals (the wall clock may be set back)."""
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Sleep ``seconds`` or until ``stop`` is set; True if it was set."""
        return stop.wait(seconds)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float | None = None):
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; the new time."""
        if seconds < 0:
            raise ValueError("a clock does not run backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait for ``stop`` alone: a manual clock's rounds are run by whoever moves it."""
        return stop.wait()


Clock = SystemClock | ManualClock
