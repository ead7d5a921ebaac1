"""The server interceptor that authenticates every RPC but Enroll, limits rates and bounds fields.

It reads ``authorization: Bearer <island id>.<secret>`` from the call's metadata and, in the
call's worker thread (gRPC's one dispatch thread only parses), checks it against the registry
(constant-time hash comparison) on every call, with nothing cached, checks
that the coordinator has not revoked the island and the caller's role, and hands the servicer
an ``AuthedContext`` that carries the island. Refusals are UNAUTHENTICATED (no valid
credential) or PERMISSION_DENIED (revoked, or the wrong role) with a message that says what to
do. A stream already open when its island is revoked is refused at its next chunk by the
registry (``Registry.commit_chunk``, ``Registry.still_readable``). It also counts what every
island sends (serialized request sizes, by kind), so that status can show exactly what left it.

Every request, Enroll's and each message of a stream included, must be within the bounds of
protocol/bounds.py (INVALID_ARGUMENT otherwise). Each identity may make CALLS_PER_SECOND calls
(bursts of CALL_BURST), and each peer address ENROLL_FAILURES_PER_MINUTE failed enrollments;
past either the call is RESOURCE_EXHAUSTED with a retry-after in its trailing metadata.

``DecodingInterceptor``, outside it, ends a request that does not parse as its message type
in INVALID_ARGUMENT, where gRPC itself would answer INTERNAL.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time

import grpc

from protocol import auth, bounds
from protocol.limits import (
    CALL_BURST,
    CALLS_PER_SECOND,
    ENROLL_FAILURE_BURST,
    ENROLL_FAILURES_PER_MINUTE,
    retry_after_metadata,
)

from .refusals import Refused
from .registry import Island, Registry, RegistryError, revoked_message

SERVICE = "/ddm.v1.Coordinator/"
PUBLIC = {SERVICE + "Enroll"}
READER_ALLOWED = {SERVICE + name for name in ("GetManifest", "Download", "Status")}
# What each RPC's requests carry, for the per-island traffic counters: checkpoint chunks,
# heartbeats, or control messages (leases, upload bookkeeping, downloads requested, status).
TRAFFIC_KIND = {SERVICE + "UploadChunks": "checkpoint", SERVICE + "Heartbeat": "heartbeat"}


class RateLimiter:
    """A token bucket per key: ``per_second`` tokens flow in, at most ``burst`` are held."""

    MAX_KEYS = 100_000  # past this many keys, those with a full bucket are forgotten

    def __init__(self, per_second: float, burst: int):
        self.per_second = per_second
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.per_second)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token (0.0: it has one now); takes nothing."""
        with self._lock:
            tokens = self._tokens(key, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def take(self, key: str) -> float:
        """Take a token if ``key`` has one (returns 0.0), else the seconds until it will."""
        with self._lock:
            now = time.monotonic()
            tokens = self._tokens(key, now)
            if tokens < 1:
                return (1 - tokens) / self.per_second
            self._put(key, tokens - 1, now)
            return 0.0

    def spend(self, key: str) -> None:
        """Take a token even if there is none: the bucket goes into debt."""
        with self._lock:
            now = time.monotonic()
            self._put(key, self._tokens(key, now) - 1, now)

    def _put(self, key: str, tokens: float, now: float) -> None:
        if len(self._buckets) >= self.MAX_KEYS and key not in self._buckets:
            self._buckets = {k: v for k, v in self._buckets.items() if self._tokens(k, now) < self.burst}
        self._buckets[key] = (tokens, now)


def peer_address(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:1.2.3.4:5678" -> "1.2.3.4"); an IPv6 host counts by its /64."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%")[0]
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return peer


class AuthedContext:
    """A servicer context that also names the authenticated island."""

    def __init__(self, context: grpc.ServicerContext, island: Island):
        self._context = context
        self.island = island

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _same_kind(handler: grpc.RpcMethodHandler, behaviour, deserializer=None) -> grpc.RpcMethodHandler:
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner(handler: grpc.RpcMethodHandler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, registry: Registry):
        self.registry = registry
        self.calls = RateLimiter(CALLS_PER_SECOND, CALL_BURST)  # per identity
        self.enroll_failures = RateLimiter(ENROLL_FAILURES_PER_MINUTE / 60, ENROLL_FAILURE_BURST)  # per address
        self._seen: dict[str, float] = {}  # island -> when it last called, not yet written
        self._traffic: dict[tuple[str, str], tuple[int, int]] = {}  # (island, kind) -> (messages, bytes)
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        # This runs on gRPC's one dispatch thread, for every call: it only parses the metadata.
        # The credential's database read and everything after it run in the call's worker thread.
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method in PUBLIC:
            return self._public(handler)
        metadata = dict(handler_call_details.invocation_metadata or ())
        parsed = auth.parse(metadata.get(auth.METADATA_KEY))
        behaviour = _inner(handler)
        kind = TRAFFIC_KIND.get(method, "control")

        def authed(request, context):
            island = self._admit(parsed, method, context)
            if handler.request_streaming:
                request = self._counted(request, island.id, kind)
            else:
                self._count(island.id, kind, request.ByteSize())
                _check_bounds(request, context)
            return behaviour(request, AuthedContext(context, island))

        return _same_kind(handler, authed)

    def _admit(self, parsed: tuple[str, str] | None, method: str, context) -> Island:
        """The caller's island, read afresh from the registry (a revocation holds from the next
        call on); the call ends here, with a status that says what to do, if it may not go on."""
        island = self.registry.authenticate(*parsed) if parsed else None
        if island is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid credential; enroll with an invite token (ddm-client join --token ...)",
            )
        if island.revoked_at is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked_message(island.revoked_reason))
        if island.role != "island" and method not in READER_ALLOWED:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"a {island.role} identity may not call {method}")
        wait = self.calls.take(island.id)
        if wait:
            limits = self.calls
            context.set_trailing_metadata(retry_after_metadata(wait))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit: at most {limits.per_second:g} calls per second per island (bursts of {limits.burst});"
                f" retry after {wait:.2f} s",
            )
        self._touch(island.id)
        return island

    def _public(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Enroll: bounds, and a limit on failed attempts per peer address against token guessing.

        Only failures are charged, after the fact (the bucket may go into debt), so that many
        islands behind one address can enroll at once while guesses soon wait for minutes."""
        behaviour = _inner(handler)
        limits = self.enroll_failures

        def public(request, context):
            _check_bounds(request, context)
            address = peer_address(context.peer())
            wait = limits.wait(address)
            if wait:
                context.set_trailing_metadata(retry_after_metadata(wait))
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit: at most {limits.per_second * 60:g} failed enrollments per minute from one address"
                    f" (bursts of {limits.burst}); retry after {math.ceil(wait)} s with a valid invite token",
                )
            try:
                return behaviour(request, context)
            except Exception:
                limits.spend(address)
                raise

        return _same_kind(handler, public)

    def _counted(self, requests, island_id: str, kind: str):
        for message in requests:
            self._count(island_id, kind, message.ByteSize())
            reason = bounds.check(message)
            if reason is not None:
                raise Refused("invalid_argument", reason)
            yield message

    def _count(self, island_id: str, kind: str, nbytes: int) -> None:
        with self._lock:
            messages, total = self._traffic.get((island_id, kind), (0, 0))
            self._traffic[(island_id, kind)] = (messages + 1, total + nbytes)

    def flush(self) -> None:
        """Write the traffic counted and the islands seen since the last flush into the registry."""
        with self._lock:
            counts, self._traffic = self._traffic, {}
            seen, self._seen = self._seen, {}
        if counts:
            self.registry.add_traffic(counts)
        if seen:
            self.registry.touch(seen)

    def _touch(self, island_id: str) -> None:
        # Kept in memory and written by flush(): a call need not wait for the registry's write lock.
        with self._lock:
            self._seen[island_id] = self.registry.clock.now()


def _check_bounds(request, context) -> None:
    reason = bounds.check(request)
    if reason is not None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)


UNDECODABLE_MESSAGE = "the request is not a valid ddm.v1 message; use a ddm client that speaks this protocol"


class _Undecodable:
    """Stands for a request that did not parse (gRPC takes None for a failed parse)."""


UNDECODABLE = _Undecodable()


def _tolerant(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # protobuf's DecodeError, or whatever else a malformed message raises
            return UNDECODABLE

    return parse


def _decoded(requests):
    for message in requests:
        if message is UNDECODABLE:  # the servicer turns a RegistryError into its status
            raise RegistryError("invalid_argument", UNDECODABLE_MESSAGE)
        yield message


class DecodingInterceptor(grpc.ServerInterceptor):
    """Refuse, as INVALID_ARGUMENT, requests whose bytes are not their message type."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        behaviour = _inner(handler)
        if handler.request_streaming:

            def checked(requests, context):
                return behaviour(_decoded(requests), context)

        else:

            def checked(request, context):
                if request is UNDECODABLE:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
                return behaviour(request, context)

        return _same_kind(handler, checked, _tolerant(handler.request_deserializer))
