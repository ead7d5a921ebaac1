"""How an RPC of the coordinator ends when it does not succeed.

A refusal (``Refused``, a ``RegistryError``, a full disk) ends the call in the gRPC status its
code names, with its one-line message and, when it asks the caller to come back, a retry-after
in the trailing metadata. A stream that gRPC itself ended (the client cancelled, or a message
was over gRPC's size limit) has its status already. Anything else is a fault of the coordinator:
INTERNAL, with the traceback in the coordinator's log. ``rpc`` and ``streaming_rpc`` wrap the
servicer's methods so that every call ends one of these ways.
"""

from __future__ import annotations

import logging
import sqlite3

import grpc
from sqlalchemy.exc import OperationalError

from protocol.limits import retry_after_metadata

from .registry import RegistryError
from .store import DiskFull

log = logging.getLogger("ddm.coordinator")

CODES = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "data_loss": grpc.StatusCode.DATA_LOSS,
    "out_of_range": grpc.StatusCode.OUT_OF_RANGE,
}


class Refused(Exception):
    """A refusal; ``retry_after`` (seconds) asks the caller to try again then."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


def refuse(context, code: str, message: str):
    raise Refused(code, message)


def abort(context, method: str, exc: Exception):
    """End the call with the status a refusal names; anything unexpected is INTERNAL and logged.
    Never returns: gRPC would take a returned None for the reply and fail to serialize it."""
    island = getattr(context, "island", None)
    who = f" (island {island.id})" if island else ""
    if _disk_full(exc):
        exc = DiskFull(f"the coordinator's disk is full ({exc.orig}); nothing was recorded; try again later")
    if isinstance(exc, (Refused, RegistryError, DiskFull)):
        log.warning("%s refused%s: %s", method, who, exc)
        if getattr(exc, "retry_after", None):
            context.set_trailing_metadata(retry_after_metadata(exc.retry_after))
        context.abort(CODES[exc.code], str(exc))
    if isinstance(exc, grpc.RpcError):
        # Raised by gRPC's request iterator: the call is over and the client has its status.
        # Raised again, gRPC knows it as its own and ends the call without a word in its log.
        # What the stream committed before stays committed.
        log.info("%s ended early by gRPC%s (the client cancelled, or a message was over the size limit)", method, who)
        raise exc
    log.error("%s failed%s", method, who, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator; its log has the details")


def _disk_full(exc: Exception) -> bool:
    """SQLite could not write (a full disk); its transaction was rolled back."""
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def rpc(method):
    """Run an RPC; refusals become their gRPC status, unexpected errors INTERNAL."""

    def wrapped(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            abort(context, method.__name__, exc)

    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


def streaming_rpc(method):
    """The same for an RPC that streams its reply (a generator)."""

    def wrapped(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:
            abort(context, method.__name__, exc)

    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped
