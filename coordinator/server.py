"""`ddm-coordinator serve`: the gRPC server, its reaper (heartbeats, leases, traffic counters,
stale uploads) and the assembly trigger.

A home whose registry is SQLite is served by one process (an flock on HOME/serve.lock). A home
on PostgreSQL may be served by several processes at once, on one machine or several, sharing
the database and the home folder (on shared storage): each takes any call, and the registry's
locks (coordinator/registry/core.py) make one of them assemble at a time. Rate and stream
limits are each process's own.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from protocol import ddm_pb2_grpc
from protocol.limits import SERVER_MAX_CONCURRENT_RPCS, SERVER_OPTIONS, SERVER_WORKERS

from .assemble import Assembler
from .auth import AuthInterceptor, DecodingInterceptor
from .clock import Clock, SystemClock
from .home import Home, HomeError, HomeLock
from .keys import SigningKey
from .reconcile import reconcile
from .registry import Registry
from .service import CoordinatorService
from .store import Store
from .tls import ServerTls

log = logging.getLogger("ddm.coordinator")
REAP_EVERY_S = 1.0  # also how often buffered heartbeats are written
ORPHANS_EVERY_S = 5.0  # how often a process looks for an assembly whose process ended
CLEAN_STAGING_EVERY_S = 60.0
CURVE_RESOLUTION = 500  # points of an expert's training curve kept per lease, at most about


class Coordinator:
    """A home opened for work, with no network of its own: the registry, the signing key, the
    store (reconciled before anything else), the upload path (``service``), the assembler and
    the reaper. ``CoordinatorServer`` serves it over gRPC; the Flower ServerApp drives it
    through Flower messages."""

    def __init__(self, home: Home, clock: Clock | None = None):
        """``clock``: the time the registry and the reaper go by (a ManualClock in tests: its
        reaper runs only when ``reap`` is called)."""
        self.home = home
        self.clock = clock or SystemClock()
        self.config = home.load_config()
        self.registry = Registry(
            home.database_url(self.config), lease_seconds=self.config.lease_seconds, clock=self.clock
        )
        # Training curves keep about CURVE_RESOLUTION points per lease, whatever the run's length.
        self.registry.curve_every_steps = max(1, self.config.train["steps"] // CURVE_RESOLUTION)
        # SQLite: one process serves a home; released when it ends, however it ends.
        self.lock = None if self.registry.shared else HomeLock(home)
        try:
            self.key = SigningKey.load(home.key_path)
            self.store = Store(home.artifacts, home.staging)
            self.reconciliation = reconcile(home, self.registry, self.store)  # before anything is served
        except BaseException:
            self._release()
            raise
        log.info("reconciled the home: %s", self.reconciliation.summary())
        self.assembler = Assembler(home, self.config, self.registry, self.store, self.key)
        self.service = CoordinatorService(
            home, self.config, self.registry, self.store, self.key, on_all_signed=self.assembler.request
        )
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_every, name="lease-reaper", daemon=True)
        self.clean_staging_every_s = CLEAN_STAGING_EVERY_S
        self._cleaned = float("-inf")  # the first round cleans staging: a restart may find what a crash left
        self._orphans_checked = float("-inf")

    def start(self) -> None:
        self._reaper.start()
        self._resume_assembly()

    def _resume_assembly(self) -> None:
        """After a start, and every ORPHANS_EVERY_S: take over an assembly whose process ended,
        or start one that is due. The assembler holds the lock that makes this one process's
        job; a process that finds it held does nothing."""
        if self.assembler.running:
            return
        if self.registry.assemblies_in_training() or self.registry.assembly_due():
            self.assembler.request()

    def _reap_every(self) -> None:
        while not self.clock.wait(self._stop, REAP_EVERY_S):
            try:
                self.reap()
            except Exception:
                log.exception("lease reaper")

    def reap(self) -> None:
        """One round of the reaper: write buffered heartbeats (and traffic counters), expire
        silent leases, look for an orphaned assembly and, every ``clean_staging_every_s``,
        abandon stale uploads and delete unowned staged bytes."""
        self.registry.flush_heartbeats()
        self._flush_traffic()
        expired = self.registry.expire_leases()
        if expired:
            log.info("%d lease(s) expired; their experts are open again", expired)
        now = self.clock.monotonic()
        if now - self._orphans_checked >= ORPHANS_EVERY_S:
            self._orphans_checked = now
            self._resume_assembly()
        if now - self._cleaned >= self.clean_staging_every_s and self.service.clean_staging():
            self._cleaned = now

    def _flush_traffic(self) -> None:
        """Counters of calls kept in memory, written by the reaper; a server has some."""

    def stop(self) -> None:
        self._stop.set()
        self.registry.flush_heartbeats()
        self._flush_traffic()
        self.registry.close()
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()


class CoordinatorServer(Coordinator):
    """The coordinator served over gRPC on ``listen``."""

    def __init__(self, home: Home, listen: str, tls: ServerTls | None = None, clock: Clock | None = None):
        """``tls``: the certificate (and, for mutual TLS, the client CA) to serve TLS with; None
        serves plaintext (in-process tests, loopback)."""
        super().__init__(home, clock)
        self.auth = AuthInterceptor(self.registry)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=SERVER_WORKERS),
            interceptors=[DecodingInterceptor(), self.auth],
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=SERVER_MAX_CONCURRENT_RPCS,
        )
        ddm_pb2_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(listen)
            else:
                self.port = self.server.add_secure_port(listen, tls.credentials())
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.registry.close()
            self._release()
            raise HomeError(f"cannot listen on {listen}; is the address valid and the port free?")

    def start(self) -> None:
        self.server.start()
        super().start()

    def _flush_traffic(self) -> None:
        self.auth.flush()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
        super().stop()
