"""A channel to the coordinator: TLS as client.tls says, credentials on every call, limits from
protocol.limits, retries while the coordinator is unreachable or asks for a retry later, and
one-line errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from ddm_model.errors import DDMError
from ddm_model.progress import console
from protocol import auth, ddm_pb2_grpc
from protocol.limits import (
    CHANNEL_OPTIONS,
    RETRY_ATTEMPTS,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    UNARY_DEADLINE_S,
    retry_after,
)

from .tls import TlsError, TlsSettings, handshake, load_material, open_channel

TRANSIENT = (grpc.StatusCode.UNAVAILABLE,)


def tls_failure(err: grpc.RpcError) -> bool:
    """A certificate that does not check out: retrying will not help."""
    details = (err.details() or "").lower()
    return err.code() == grpc.StatusCode.UNAVAILABLE and ("handshake" in details or "certificate" in details)


def asked_to_wait(err: grpc.RpcError) -> float | None:
    """Seconds the coordinator asked to wait before a retry (a rate limit, no upload slot free):
    the one refusal that is worth retrying. None for every other error."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return retry_after(err.trailing_metadata())


class ClientError(DDMError):
    """A call the coordinator refused, or a coordinator that cannot be reached. ``retry_after``:
    seconds the coordinator asked to wait before trying again, if it refused for now only."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Unreachable, or asked to come back later: what was committed stays committed."""
        return self.code in TRANSIENT or self.retry_after is not None


class Unreachable(ClientError):
    """The coordinator could not be contacted to open the channel; worth retrying."""


class Connection:
    def __init__(
        self,
        address: str,
        credential: str | None = None,
        attempts: int = RETRY_ATTEMPTS,
        *,
        tls: TlsSettings | None = None,
    ):
        """``tls``: how to reach the coordinator (client.tls); None speaks plaintext, as the
        in-process tests on loopback do. The channel opens on the first call (a pinned
        certificate is fetched and checked then), so a coordinator that is not up yet is retried
        like any other unreachable one."""
        self.address = address
        self.tls = tls or TlsSettings(insecure=True)
        try:
            self._material = load_material(self.tls)
        except TlsError as exc:
            raise ClientError(str(exc)) from None
        self.metadata = auth.metadata(credential) if credential else ()
        self.attempts = attempts
        self._channel: grpc.Channel | None = None
        self._stub: ddm_pb2_grpc.CoordinatorStub | None = None
        self._lock = threading.Lock()

    @property
    def stub(self) -> ddm_pb2_grpc.CoordinatorStub:
        with self._lock:
            if self._stub is None:
                try:
                    self._channel = open_channel(self.address, self.tls, self._material, CHANNEL_OPTIONS)
                except TlsError as exc:
                    raise ClientError(str(exc)) from None
                except OSError:
                    raise Unreachable(self.unreachable(), grpc.StatusCode.UNAVAILABLE) from None
                self._stub = ddm_pb2_grpc.CoordinatorStub(self._channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def unreachable(self) -> str:
        return f"the coordinator at {self.address} is unreachable; is `ddm-coordinator serve` running there?"

    def error(self, err: grpc.RpcError, method: str) -> ClientError:
        code = err.code()
        if tls_failure(err):
            if self.tls.fingerprint:
                why = f"it no longer presents the pinned certificate {self.tls.fingerprint} (it may be impersonated)"
            elif self.tls.ca:
                why = f"its certificate does not chain to {self.tls.ca} or does not name this address"
            else:
                why = "it does not speak TLS"
            return ClientError(f"the TLS handshake with {self.address} failed: {why}", code)
        if code in TRANSIENT:
            return ClientError(self.unreachable(), code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClientError(f"{method} to {self.address} timed out", code)
        return ClientError(f"{method} refused ({code.name.lower()}): {err.details()}", code, asked_to_wait(err))

    def check_not_tls(self) -> None:
        """A plaintext call that could not connect: if the coordinator speaks TLS, say so at once
        instead of retrying."""
        if not self.tls.insecure:
            return
        try:
            handshake(self.address, timeout=2.0)
        except (OSError, TlsError):
            return
        raise ClientError(
            f"the coordinator at {self.address} speaks TLS, but this client speaks plaintext (--insecure); pass "
            "--tls-fingerprint with the fingerprint printed by `ddm-coordinator init` (or shown by "
            "`ddm-coordinator status`)",
            grpc.StatusCode.UNAVAILABLE,
        )

    def _retrying(self, method: str, call, retry: bool):
        delay = RETRY_BACKOFF_S
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            try:
                return call()
            except grpc.RpcError as err:
                wait, detail = asked_to_wait(err), err.details()
                transient = err.code() in TRANSIENT and not tls_failure(err)
                if transient and attempt == 0:
                    self.check_not_tls()
                if not (transient or wait is not None) or attempt == attempts - 1:
                    raise self.error(err, method) from None
            except Unreachable:
                if attempt == attempts - 1:
                    raise
                wait = None
            if wait is not None:
                console.print(f"[yellow]{detail}; waiting[/yellow]", highlight=False)
            elif attempt == 0:
                console.print(
                    f"[yellow]the coordinator at {self.address} is unreachable; retrying "
                    f"{attempts - 1} more times[/yellow]",
                    highlight=False,
                )
            time.sleep(max(delay, wait or 0.0))
            delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
        raise AssertionError("unreachable")

    def unary(self, method: str, request, timeout: float = UNARY_DEADLINE_S, retry: bool = True):
        return self._retrying(
            method, lambda: getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata), retry
        )

    def stream_in(self, method: str, requests: Iterator, timeout: float):
        """A client-streaming call; not retried here (the caller resumes from the committed offset)."""
        rpc = getattr(self.stub, method)
        try:
            return rpc(requests, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise self.error(err, method) from None

    def stream_out(self, method: str, request, timeout: float) -> Iterator:
        """A server-streaming call; errors surface as ClientError while iterating."""
        rpc = getattr(self.stub, method)
        try:
            yield from rpc(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise self.error(err, method) from None
