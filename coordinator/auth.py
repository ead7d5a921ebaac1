"""The server interceptor that authenticates every RPC but Enroll.

It reads ``authorization: Bearer <island id>.<secret>`` from the call's metadata, checks it
against the registry (constant-time hash comparison), checks the caller's role, and hands the
servicer an ``AuthedContext`` that carries the island. Refusals are UNAUTHENTICATED or
PERMISSION_DENIED with a message that says what to do. It also counts what every island
sends (serialized request sizes, by kind), so that status can show exactly what left it.

``DecodingInterceptor``, outside it, ends a request that does not parse as its message type
in INVALID_ARGUMENT, where gRPC itself would answer INTERNAL.
"""

from __future__ import annotations

import threading
import time

import grpc

from protocol import auth

from .registry import Island, Registry, RegistryError

SERVICE = "/ddm.v1.Coordinator/"
PUBLIC = {SERVICE + "Enroll"}
READER_ALLOWED = {SERVICE + name for name in ("GetManifest", "Download", "Status")}
TOUCH_EVERY_S = 2.0
# What each RPC's requests carry, for the per-island traffic counters: checkpoint chunks,
# heartbeats, or control messages (leases, upload bookkeeping, downloads requested, status).
TRAFFIC_KIND = {SERVICE + "UploadChunks": "checkpoint", SERVICE + "Heartbeat": "heartbeat"}


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
        self._touched: dict[str, float] = {}
        self._traffic: dict[tuple[str, str], tuple[int, int]] = {}  # (island, kind) -> (messages, bytes)
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in PUBLIC:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        parsed = auth.parse(metadata.get(auth.METADATA_KEY))
        island = self.registry.authenticate(*parsed) if parsed else None
        if island is None:
            return self._refuse(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid credential; enroll with an invite token (ddm-client join --token ...)",
            )
        if island.role != "island" and method not in READER_ALLOWED:
            return self._refuse(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"a {island.role} identity may not call {method}"
            )
        self._touch(island.id)
        behaviour = _inner(handler)
        kind = TRAFFIC_KIND.get(method, "control")

        def authed(request, context):
            if handler.request_streaming:
                request = self._counted(request, island.id, kind)
            else:
                self._count(island.id, kind, request.ByteSize())
            return behaviour(request, AuthedContext(context, island))

        return _same_kind(handler, authed)

    def _counted(self, requests, island_id: str, kind: str):
        for message in requests:
            self._count(island_id, kind, message.ByteSize())
            yield message

    def _count(self, island_id: str, kind: str, nbytes: int) -> None:
        with self._lock:
            messages, total = self._traffic.get((island_id, kind), (0, 0))
            self._traffic[(island_id, kind)] = (messages + 1, total + nbytes)

    def flush(self) -> None:
        """Write the traffic counted since the last flush into the registry."""
        with self._lock:
            counts, self._traffic = self._traffic, {}
        if counts:
            self.registry.add_traffic(counts)

    def _touch(self, island_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(island_id, 0.0) < TOUCH_EVERY_S:
                return
            self._touched[island_id] = now
        self.registry.touch(island_id)

    @staticmethod
    def _refuse(handler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        def refuse(request, context):
            context.abort(code, message)

        return _same_kind(handler, refuse)


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
