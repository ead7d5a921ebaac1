"""`ddm-coordinator serve`: the gRPC server, its reaper (leases, traffic counters, stale uploads)
and the assembly trigger."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from protocol import ddm_pb2_grpc
from protocol.limits import SERVER_MAX_CONCURRENT_RPCS, SERVER_OPTIONS, SERVER_WORKERS
from protocol.manifest import Manifest

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
REAP_EVERY_S = 1.0
CLEAN_STAGING_EVERY_S = 60.0


class CoordinatorServer:
    def __init__(self, home: Home, listen: str, tls: ServerTls | None = None, clock: Clock | None = None):
        """``tls``: the certificate (and, for mutual TLS, the client CA) to serve TLS with; None
        serves plaintext (in-process tests, loopback). ``clock``: the time the registry and the
        reaper go by (a ManualClock in tests: its reaper runs only when ``reap`` is called)."""
        self.home = home
        self.clock = clock or SystemClock()
        self.config = home.load_config()
        self.lock = HomeLock(home)  # one process serves a home; released when it ends, however it ends
        try:
            self.key = SigningKey.load(home.key_path)
            self.registry = Registry(
                home.database_url(self.config), lease_seconds=self.config.lease_seconds, clock=self.clock
            )
            self.store = Store(home.artifacts, home.staging)
            self.reconciliation = reconcile(home, self.registry, self.store)  # before anything is served
        except BaseException:
            self.lock.release()
            raise
        log.info("reconciled the home: %s", self.reconciliation.summary())
        self.assembler = Assembler(home, self.config, self.registry, self.store, self.key)
        self.service = CoordinatorService(
            home, self.config, self.registry, self.store, self.key, on_all_signed=self.assembler.request
        )
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
            self.lock.release()
            raise HomeError(f"cannot listen on {listen}; is the address valid and the port free?")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_every, name="lease-reaper", daemon=True)
        self.clean_staging_every_s = CLEAN_STAGING_EVERY_S
        self._cleaned = float("-inf")  # the first round cleans staging: a restart may find what a crash left

    def start(self) -> None:
        self.server.start()
        self._reaper.start()
        self._resume_assembly()

    def _resume_assembly(self) -> None:
        """After a restart: finish an interrupted assembly, or start one that is due."""
        snapshot = self.registry.snapshot()
        interrupted = [e for e in snapshot["ensembles"] if e["state"] == "training"]
        for e in interrupted:
            self.registry.fail_ensemble(e["id"], "interrupted by a coordinator restart; assembling again")
        all_signed = all(e["state"] == "signed" for e in snapshot["experts"])
        signed = {e["checkpoint_sha256"] for e in snapshot["experts"]}
        # Published already: an ensemble of exactly the signed experts (after `revoke --exclude`,
        # a retrained expert is not in the ensemble published without it).
        published = any(
            e["state"] == "published" and set(Manifest.stored(e["manifest_json"]).checkpoints) == signed
            for e in snapshot["ensembles"]
        )
        if all_signed and (interrupted or not published):
            self.assembler.request()

    def _reap_every(self) -> None:
        while not self.clock.wait(self._stop, REAP_EVERY_S):
            try:
                self.reap()
            except Exception:
                log.exception("lease reaper")

    def reap(self) -> None:
        """One round of the reaper: flush traffic counters, expire silent leases and, every
        ``clean_staging_every_s``, abandon stale uploads and delete unowned staged bytes."""
        self.auth.flush()
        expired = self.registry.expire_leases()
        if expired:
            log.info("%d lease(s) expired; their experts are open again", expired)
        now = self.clock.monotonic()
        if now - self._cleaned >= self.clean_staging_every_s and self.service.clean_staging():
            self._cleaned = now

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
        self.auth.flush()
        self.registry.close()
        self.lock.release()
