"""The coordinator's TLS certificate: made at init, served by default, pinned by islands.

`ddm-coordinator init` (or `ddm-coordinator tls` for a home made without one) writes an ECDSA
P-256 key and a self-signed certificate into the home. The certificate is its own root: an
island pins it by fingerprint (``sha256:`` + hex of the SHA-256 of its DER encoding) and trusts
exactly that certificate, so no certificate authority is needed. `serve --tls-cert/--tls-key`
serves a certificate of the user's own (a CA-issued one) instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ddm_model.errors import DDMError
from ddm_model.fsutil import atomic_path
from protocol.trust import certificate_fingerprint

from .home import Home

COMMON_NAME = "ddm coordinator"
VALIDITY = dt.timedelta(days=3650)


class TlsError(DDMError):
    """A TLS certificate or key that is missing, unreadable or does not fit the request."""


def make_certificate(names: list[str] | None = None) -> tuple[bytes, bytes]:
    """A new key and a self-signed certificate for it, as PEM (certificate, key).

    Its subject alternative names are localhost, 127.0.0.1, ::1, this machine's hostname and
    ``names`` (DNS names or IP addresses); it is marked as a CA so that it can be its own root.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    wanted = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *(names or [])]
    alt_names: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in wanted if n and n.strip()):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in alt_names:
            alt_names.append(entry)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_certificate(home: Home, names: list[str] | None = None) -> str:
    """Make a key and certificate and write them into the home (the key first, mode 0600);
    returns the certificate's fingerprint."""
    cert_pem, key_pem = make_certificate(names)
    with atomic_path(home.tls_key_path, mode=0o600) as tmp:
        tmp.write_bytes(key_pem)
    with atomic_path(home.tls_cert_path) as tmp:
        tmp.write_bytes(cert_pem)
    return pem_fingerprint(cert_pem)


def pem_fingerprint(pem: bytes) -> str:
    """The fingerprint of the first (leaf) certificate of a PEM chain."""
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        raise TlsError(f"not a PEM certificate: {exc}") from None
    return certificate_fingerprint(leaf.public_bytes(serialization.Encoding.DER))


def home_fingerprint(home: Home) -> str | None:
    """The fingerprint of the home's certificate; None for a home made without one."""
    try:
        return pem_fingerprint(home.tls_cert_path.read_bytes())
    except (OSError, TlsError):
        return None


@dataclass(frozen=True)
class ServerTls:
    """What `serve` speaks TLS with: a certificate chain and its key (PEM), and optionally the
    certificate authority every client must present a certificate from (mutual TLS)."""

    chain: bytes
    key: bytes
    client_ca: bytes | None = None

    @property
    def fingerprint(self) -> str:
        return pem_fingerprint(self.chain)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def load_server_tls(
    home: Home, cert: Path | None = None, key: Path | None = None, client_ca: Path | None = None
) -> ServerTls:
    """The user's own certificate and key when given, else the home's; checked before serving."""
    if (cert is None) != (key is None):
        raise TlsError("--tls-cert and --tls-key go together")
    if cert is None:
        if not home.tls_cert_path.exists() or not home.tls_key_path.exists():
            raise TlsError(
                f"{home.root} has no TLS certificate (it was made before ddm served TLS); create one with "
                f"`ddm-coordinator tls --home {home.root}` and give islands the fingerprint it prints"
            )
        cert, key = home.tls_cert_path, home.tls_key_path
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise TlsError(f"the TLS key {key} is readable by others (mode {mode:o}); chmod 600 it")
    chain, key_pem = _read(cert, "TLS certificate"), _read(key, "TLS key")
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(
            f"{cert} must be a PEM certificate chain and {key} an unencrypted PEM private key ({exc})"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, public) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise TlsError(f"the TLS key {key} does not belong to the certificate {cert}")
    ca = None
    if client_ca is not None:
        ca = _read(client_ca, "client certificate authority")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise TlsError(f"--client-ca {client_ca} is not a PEM certificate ({exc})") from None
    return ServerTls(chain, key_pem, ca)
