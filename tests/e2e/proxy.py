"""A TCP proxy for the fault tests: it sits between an island and the coordinator and, once
armed, cuts or stalls a connection after a number of bytes in one direction.

    proxy = Proxy("127.0.0.1:50051")
    proxy.arm("up", 600_000, "drop")    # the next 600 kB island -> coordinator, then close both sides
    proxy.arm("down", 20_000, "stall")  # ... coordinator -> island, then forward nothing more

Given several upstreams it is also a TCP load balancer, as operators put in front of several
`ddm-coordinator serve` processes: each new connection goes to the next upstream that accepts
it ("round-robin"), or to the first one that does ("failover"); one that is down is skipped.

    balancer = Proxy(["127.0.0.1:50051", "127.0.0.1:50052"], order="round-robin")

A trigger fires once; every later byte and connection passes through untouched, so a client
that reconnects carries on. "drop" closes both sockets at once (the peers see a reset
connection); "stall" keeps the connection open but forwards nothing more, so the peers hang
until one of them goes away, which then closes the other side too, or until ``cut()`` drops
it: a test can stall a stream, wait for the server to settle, then cut it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

ORDERS = ("round-robin", "failover")
DIRECTIONS = ("up", "down")  # up: client -> server; down: server -> client
ACTIONS = ("drop", "stall")


@dataclass
class _Trigger:
    direction: str
    after: int
    action: str
    seen: int = 0


class _Link:
    """One proxied connection: a socket pair and what happened to it."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client = client
        self.server = server
        self.stalled = False
        self.closed = threading.Event()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Proxy:
    def __init__(self, upstream: str | list[str], order: str = "round-robin"):
        assert order in ORDERS
        upstreams = [upstream] if isinstance(upstream, str) else upstream
        self.upstreams = [(host, int(port)) for host, port in (u.rsplit(":", 1) for u in upstreams)]
        self.order = order
        self.served = [0] * len(self.upstreams)  # connections made to each upstream
        self._next = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tripped = threading.Event()
        self.connections = 0
        self._lock = threading.Lock()
        self._trigger: _Trigger | None = None
        self._links: list[_Link] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self, direction: str, after: int, action: str) -> None:
        assert direction in DIRECTIONS and action in ACTIONS and after >= 0
        with self._lock:
            self._trigger = _Trigger(direction, after, action)
            self.tripped.clear()

    def cut(self) -> int:
        """Drop every stalled connection; returns how many there were."""
        stalled = [link for link in self._links if link.stalled and not link.closed.is_set()]
        for link in stalled:
            link.close()
        return len(stalled)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for link in list(self._links):
            link.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = self._upstream()
            if server is None:
                client.close()  # every upstream down: the client sees a refused connection, as it would
                continue
            link = _Link(client, server)
            with self._lock:
                self.connections += 1
                self._links.append(link)
            for direction, src, dst in (("up", client, server), ("down", server, client)):
                threading.Thread(target=self._pump, args=(link, direction, src, dst), daemon=True).start()

    def _upstream(self) -> socket.socket | None:
        """A connection to the upstream whose turn it is, skipping those that refuse."""
        first = self._next if self.order == "round-robin" else 0
        for i in range(len(self.upstreams)):
            k = (first + i) % len(self.upstreams)
            try:
                server = socket.create_connection(self.upstreams[k], timeout=5)
            except OSError:
                continue
            server.settimeout(None)
            self._next = k + 1
            self.served[k] += 1
            return server
        return None

    def _pump(self, link: _Link, direction: str, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if link.stalled:
                    continue  # read and discard, so that the peer closing is still noticed
                data, fire = self._pass(direction, data)
                if data:
                    dst.sendall(data)
                if fire == "drop":
                    break
                if fire == "stall":
                    link.stalled = True
        except OSError:
            pass
        link.close()

    def _pass(self, direction: str, data: bytes) -> tuple[bytes, str | None]:
        """The part of ``data`` to forward, and the action that fires at its end (if any)."""
        with self._lock:
            trigger = self._trigger
            if trigger is None or trigger.direction != direction:
                return data, None
            left = trigger.after - trigger.seen
            if len(data) <= left:
                trigger.seen += len(data)
                return data, None
            self._trigger = None
            self.tripped.set()
            return data[:left], trigger.action
