"""The dashboard served by uvicorn in a thread of the coordinator's own process, beside gRPC,
with the sample-grid thread; ``dashboard_settings`` holds the rules `serve` applies to
``--dashboard``: loopback serves plain HTTP without a login, any other address only HTTPS (the
coordinator's own certificate) with an operator's login."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from protocol.address import is_loopback, split_address

from ..home import HomeError
from ..server import Coordinator
from .app import LOOPBACK_HOSTS, Logins, create_app
from .data import DashboardData
from .samples import SampleGrids

log = logging.getLogger("ddm.coordinator.dashboard")


class DashboardError(HomeError):
    """A --dashboard that cannot be served as asked; the message says what to do."""


@dataclass(frozen=True)
class DashboardSettings:
    host: str
    port: int
    login: bool  # an operator token is needed (any address but loopback)
    cert: Path | None = None  # HTTPS with this certificate chain and key (PEM files)
    key: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.cert else "http"


def loopback_default(address: str) -> str:
    """A dashboard address: a port alone means that port on 127.0.0.1."""
    return f"127.0.0.1:{address}" if address.isdigit() else address


def dashboard_settings(address: str, cert: Path | None, key: Path | None) -> DashboardSettings:
    """``--dashboard HOST:PORT`` (a PORT alone: on 127.0.0.1) as `serve` will serve it:
    ``cert``/``key`` are the files the gRPC server's TLS comes from (None with --no-tls)."""
    address = loopback_default(address)
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise DashboardError(f"--dashboard {exc}") from None
    if is_loopback(host):
        return DashboardSettings(host, port, login=False)
    if cert is None or key is None:
        raise DashboardError(
            f"refusing to serve the dashboard on {address}, which is not a loopback address, without TLS: serve"
            " without --no-tls (the dashboard then speaks HTTPS with the coordinator's certificate and asks for"
            " an operator token), or keep it on 127.0.0.1 and reach it through an SSH tunnel"
        )
    return DashboardSettings(host, port, login=True, cert=cert, key=key)


class DashboardServer:
    """The dashboard of a running ``Coordinator``: ``start`` returns once it listens (``port``
    is then the real one, also for port 0); ``stop`` ends it and the sample thread."""

    def __init__(self, coordinator: Coordinator, settings: DashboardSettings):
        self.settings = settings
        data = DashboardData(coordinator.home, coordinator.config, coordinator.registry, coordinator.key.fingerprint)
        logins = Logins(coordinator.registry) if settings.login else None
        hosts = None if settings.login else LOOPBACK_HOSTS
        app = create_app(data, logins, tls=settings.cert is not None, hosts=hosts)
        self.samples = SampleGrids(coordinator)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                ssl_certfile=settings.cert,
                ssl_keyfile=settings.key,
                lifespan="off",
                ws="none",  # no websockets: the page polls
                access_log=False,
                log_level="warning",
                timeout_graceful_shutdown=2,
            )
        )
        self.port = settings.port
        self._thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"{self.settings.scheme}://{host}:{self.port}/"

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's way of failing to start: start() says so
            asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise DashboardError(
                    f"cannot serve the dashboard on {self.settings.host}:{self.settings.port}; is the address valid"
                    " and the port free?"
                )
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.samples.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.samples.stop()
