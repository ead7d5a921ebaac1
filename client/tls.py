"""How an island reaches the coordinator: TLS pinned by fingerprint, TLS verified by a CA, or
plaintext, chosen explicitly.

- Pinned (``--tls-fingerprint sha256:...``, printed by `ddm-coordinator init`): the client
  fetches the certificate the coordinator presents, compares its fingerprint (SHA-256 of the
  DER encoding) with the pin, and then trusts exactly that certificate as the only root of the
  gRPC channel, so a coordinator that cannot prove it holds that certificate's key is refused.
- CA (``--tls-ca FILE``): ordinary verification; the certificate must chain to FILE and name
  the host the island connects to (a CA-issued certificate given to `serve --tls-cert`).
- Plaintext (``--insecure``): only when asked for by name.

Either TLS way can present a client certificate (``--tls-client-cert/--tls-client-key``) to a
coordinator that demands mutual TLS. The choice comes from the flags, then
``$DDM_TLS_FINGERPRINT``, then the settings saved with the island's identity; with none of them
a first contact fails and says what to pass.
"""

from __future__ import annotations

import hmac
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ddm_model.errors import DDMError
from protocol.address import is_ip, split_address
from protocol.trust import certificate_fingerprint

FINGERPRINT_ENV = "DDM_TLS_FINGERPRINT"
HANDSHAKE_TIMEOUT_S = 5.0
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


class TlsError(DDMError):
    """TLS settings that do not fit together, a file that cannot be used, or a coordinator whose
    certificate or handshake does not check out. Retrying does not help."""


def parse_fingerprint(text: str) -> str:
    value = text.strip().lower()
    if not _FINGERPRINT.match(value):
        raise TlsError(
            f"{text!r} is not a TLS certificate fingerprint: expected sha256: and 64 hex digits, "
            "as printed by `ddm-coordinator init`"
        )
    return value


@dataclass(frozen=True)
class TlsSettings:
    fingerprint: str | None = None  # pin the coordinator's certificate
    ca: Path | None = None  # or verify it against this CA (PEM)
    client_cert: Path | None = None  # mutual TLS: this island's certificate chain (PEM)
    client_key: Path | None = None  # and its unencrypted key (PEM)
    insecure: bool = False  # or speak plaintext

    def __post_init__(self):
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", parse_fingerprint(self.fingerprint))
        for name in ("ca", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().absolute())
        if self.fingerprint and self.ca:
            raise TlsError("pass --tls-fingerprint or --tls-ca, not both")
        if self.insecure and (self.fingerprint or self.ca or self.client_cert or self.client_key):
            raise TlsError("--insecure (plaintext) excludes --tls-fingerprint, --tls-ca and a client certificate")
        if (self.client_cert is None) != (self.client_key is None):
            raise TlsError("--tls-client-cert and --tls-client-key go together")

    @property
    def chosen(self) -> bool:
        """Whether these settings say how to reach the coordinator (a client certificate alone does not)."""
        return bool(self.fingerprint or self.ca or self.insecure)

    def describe(self) -> str:
        if self.insecure:
            return "plaintext"
        how = f"TLS pinned to {self.fingerprint}" if self.fingerprint else f"TLS verified by {self.ca}"
        return how + (f", client certificate {self.client_cert}" if self.client_cert else "")

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "ca": None if self.ca is None else str(self.ca),
            "client_cert": None if self.client_cert is None else str(self.client_cert),
            "client_key": None if self.client_key is None else str(self.client_key),
            "insecure": self.insecure,
        }

    @classmethod
    def from_json(cls, data: dict | None) -> TlsSettings | None:
        """Saved settings; None when there are none or they no longer make sense."""
        if not isinstance(data, dict):
            return None
        try:
            fields = {k: data.get(k) for k in ("fingerprint", "ca", "client_cert", "client_key")}
            return cls(**fields, insecure=bool(data.get("insecure")))
        except (TlsError, TypeError):
            return None


def first_contact_error(address: str) -> TlsError:
    return TlsError(
        f"say how to reach the coordinator at {address}: pass --tls-fingerprint with the TLS certificate "
        "fingerprint printed by `ddm-coordinator init` (or shown by `ddm-coordinator status`), --tls-ca FILE "
        "for a CA-issued certificate, or --insecure for a plaintext coordinator"
    )


def resolve(flags: TlsSettings | None, saved: TlsSettings | None, address: str) -> TlsSettings:
    """The flags, then $DDM_TLS_FINGERPRINT, then the saved settings; a client certificate given
    as a flag joins whichever of them says how to connect."""
    flags = flags or TlsSettings()
    if flags.chosen:
        return flags
    env = os.environ.get(FINGERPRINT_ENV, "").strip()
    if env:
        base = TlsSettings(fingerprint=env)
    elif saved is not None and saved.chosen:
        base = saved
    else:
        raise first_contact_error(address)
    if base.insecure:
        if flags.client_cert:
            raise TlsError("a client certificate needs TLS, but plaintext (--insecure) was saved for this coordinator")
        return base
    cert, key = (flags.client_cert, flags.client_key) if flags.client_cert else (base.client_cert, base.client_key)
    return TlsSettings(fingerprint=base.fingerprint, ca=base.ca, client_cert=cert, client_key=key)


@dataclass(frozen=True)
class Material:
    """The files of a TlsSettings, read and checked once."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_material(settings: TlsSettings) -> Material:
    if settings.insecure:
        return Material()
    ca = cert = key = None
    if settings.ca is not None:
        ca = _read(settings.ca, "TLS certificate authority")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsError(f"the TLS certificate authority {settings.ca} is not a PEM certificate") from None
    if settings.client_cert is not None:
        cert = _read(settings.client_cert, "TLS client certificate")
        key = _read(settings.client_key, "TLS client key")
        try:
            x509.load_pem_x509_certificates(cert)
            serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise TlsError(
                f"{settings.client_cert} must be a PEM certificate and {settings.client_key} an unencrypted PEM key"
            ) from None
    return Material(ca, cert, key)


@dataclass(frozen=True)
class Peer:
    der: bytes  # the certificate the coordinator presented
    accepted: bool  # whether it kept the connection after the handshake (mutual TLS: took ours)


def handshake(address: str, settings: TlsSettings | None = None, timeout: float = HANDSHAKE_TIMEOUT_S) -> Peer:
    """A TLS handshake without verification, to read the coordinator's certificate.

    OSError: the coordinator cannot be reached now (worth retrying). TlsError: it answers, but
    not with TLS."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise TlsError(f"--coordinator {exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint is checked by the caller
    context.set_alpn_protocols(["h2"])
    if settings is not None and settings.client_cert is not None:
        try:
            context.load_cert_chain(settings.client_cert, settings.client_key, password="")
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot use the TLS client certificate {settings.client_cert}: {exc}") from None
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=None if is_ip(host) else host) as tls:
                der = tls.getpeercert(binary_form=True)
                try:
                    accepted = tls.recv(1) != b""  # a gRPC server speaks first (HTTP/2 settings)
                except TimeoutError:
                    accepted = True
                except (ssl.SSLError, ConnectionError):
                    accepted = False
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            raise ConnectionResetError(str(exc)) from None
        except ssl.SSLError as exc:
            raise TlsError(
                f"the coordinator at {address} does not speak TLS ({exc.reason or exc}); if it was started "
                "with `serve --no-tls`, pass --insecure"
            ) from None
    return Peer(der, accepted)


def _name_in(cert: x509.Certificate) -> str:
    """A name the certificate is valid for, to check it by when the address is something else."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
        ips = names.get_values_for_type(x509.IPAddress)
        if ips:
            return str(ips[0])
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


def open_channel(address: str, settings: TlsSettings, material: Material, options: list) -> grpc.Channel:
    """A gRPC channel as the settings say. For a pinned certificate this contacts the coordinator
    first (OSError when it cannot be reached, TlsError when its certificate is not the pinned one)."""
    if settings.insecure:
        return grpc.insecure_channel(address, options=options)
    peer = handshake(address, settings)
    roots = material.ca
    if settings.fingerprint:
        actual = certificate_fingerprint(peer.der)
        if not hmac.compare_digest(actual, settings.fingerprint):
            raise TlsError(
                f"the coordinator at {address} presents TLS certificate {actual}, not the pinned "
                f"{settings.fingerprint}: it may be impersonated (or its certificate was replaced); refusing to connect"
            )
        cert = x509.load_der_x509_certificate(peer.der)
        if cert.issuer != cert.subject:
            raise TlsError(
                f"the coordinator at {address} presents a certificate issued by {cert.issuer.rfc4514_string()}; "
                "pass that CA with --tls-ca instead of pinning the certificate"
            )
        roots = cert.public_bytes(serialization.Encoding.PEM)
        options = [*options, ("grpc.ssl_target_name_override", _name_in(cert))]
    if not peer.accepted:
        if settings.client_cert is None:
            raise TlsError(
                f"the coordinator at {address} requires a client certificate (mutual TLS): "
                "pass --tls-client-cert and --tls-client-key"
            )
        raise TlsError(
            f"the coordinator at {address} refused the client certificate {settings.client_cert}: "
            "it must be signed by the CA the coordinator was given with --client-ca"
        )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=material.key, certificate_chain=material.cert
    )
    return grpc.secure_channel(address, credentials, options=options)
