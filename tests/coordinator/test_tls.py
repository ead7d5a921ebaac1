"""TLS between island and coordinator, with a self-signed certificate made here."""

import datetime as dt
import ipaddress
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.connection import ClientError, Connection
from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from protocol import ddm_pb2 as pb


def self_signed(common_name: str = "localhost") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    init_home(InitOptions(home=root / "home", experts=2, preset="tiny", steps=2))
    cert, key = self_signed()
    (root / "ca.pem").write_bytes(cert)
    server = CoordinatorServer(Home(root / "home"), "127.0.0.1:0", tls=(cert, key))
    server.start()
    yield server, root
    server.stop(grace=0)
    shutil.rmtree(root, ignore_errors=True)


def test_an_island_enrolls_over_tls(tls_server):
    server, root = tls_server
    token = server.registry.create_invite("island", 60)
    conn = Connection(f"127.0.0.1:{server.port}", tls_ca=root / "ca.pem", attempts=1)
    reply = conn.unary("Enroll", pb.EnrollRequest(token=token, name="tls"))
    authed = Connection(f"127.0.0.1:{server.port}", reply.credential, tls_ca=root / "ca.pem", attempts=1)
    assert authed.unary("AcquireLease", pb.AcquireLeaseRequest()).WhichOneof("result") == "lease"


def test_plaintext_and_untrusted_certificates_do_not_connect(tls_server, tmp_path):
    server, _ = tls_server
    token = server.registry.create_invite("island", 60)
    plain = Connection(f"127.0.0.1:{server.port}", attempts=1)
    with pytest.raises(ClientError, match="unreachable"):
        plain.unary("Enroll", pb.EnrollRequest(token=token), timeout=5)
    other, _ = self_signed()
    (tmp_path / "other.pem").write_bytes(other)
    stranger = Connection(f"127.0.0.1:{server.port}", tls_ca=tmp_path / "other.pem", attempts=3)
    with pytest.raises(ClientError, match=r"TLS handshake .* failed: its certificate does not chain"):
        stranger.unary("Enroll", pb.EnrollRequest(token=token), timeout=5)
    # The refused attempts did not spend the token.
    assert server.registry.snapshot()["invites"][-1]["used_at"] is None


def test_a_missing_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClientError, match="cannot read the TLS certificate authority"):
        Connection("127.0.0.1:1", tls_ca=tmp_path / "absent.pem")
