"""A channel to the coordinator: credentials on every call, limits from protocol.limits,
retries while the coordinator is unreachable or asks for a retry later, and one-line errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

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


class Connection:
    def __init__(
        self,
        address: str,
        credential: str | None = None,
        attempts: int = RETRY_ATTEMPTS,
        tls_ca: Path | None = None,
    ):
        """``tls_ca``: a PEM file of the certificate authority (or the self-signed certificate) that
        the coordinator's TLS certificate must chain to; None speaks plaintext gRPC."""
        self.address = address
        if tls_ca is None:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            try:
                roots = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise ClientError(f"cannot read the TLS certificate authority {tls_ca}: {exc.strerror}") from None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self.stub = ddm_pb2_grpc.CoordinatorStub(self.channel)
        self.metadata = auth.metadata(credential) if credential else ()
        self.attempts = attempts

    def close(self) -> None:
        self.channel.close()

    def error(self, err: grpc.RpcError, method: str) -> ClientError:
        code = err.code()
        if tls_failure(err):
            return ClientError(
                f"the TLS handshake with {self.address} failed: its certificate does not chain to --tls-ca"
                " (or it does not speak TLS)",
                code,
            )
        if code in TRANSIENT:
            return ClientError(
                f"the coordinator at {self.address} is unreachable; is `ddm-coordinator serve` running there?", code
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClientError(f"{method} to {self.address} timed out", code)
        return ClientError(f"{method} refused ({code.name.lower()}): {err.details()}", code, asked_to_wait(err))

    def _retrying(self, method: str, call, retry: bool):
        delay = RETRY_BACKOFF_S
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            try:
                return call()
            except grpc.RpcError as err:
                wait = asked_to_wait(err)
                transient = err.code() in TRANSIENT and not tls_failure(err)
                if not (transient or wait is not None) or attempt == attempts - 1:
                    raise self.error(err, method) from None
                if wait is not None:
                    console.print(f"[yellow]{err.details()}; waiting[/yellow]", highlight=False)
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
        rpc = getattr(self.stub, method)
        return self._retrying(method, lambda: rpc(request, timeout=timeout, metadata=self.metadata), retry)

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
