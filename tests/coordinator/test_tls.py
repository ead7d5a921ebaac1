"""TLS between island and coordinator: the certificate `init` makes, `serve` with it (and with
mutual TLS, a CA-issued certificate, or plaintext only where allowed), and a client that pins
it by fingerprint, verifies it against a CA, or speaks plaintext only when told to."""

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.console import Console

from client.connection import ClientError, Connection
from client.island import enroll, tls_for
from client.state import IslandState
from client.tls import TlsError as ClientTlsError
from client.tls import TlsSettings
from coordinator.home import Home
from coordinator.server import CoordinatorServer
from coordinator.status import render_status
from coordinator.tls import ServerTls, TlsError, load_server_tls
from protocol import ddm_pb2 as pb
from tests.helpers import one_line_error

REPO = Path(__file__).resolve().parents[2]
TLS_LINE = "TLS certificate fingerprint: "


def cli(package: str, *args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    argv = [sys.executable, "-m", f"{package}.cli", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def certificate(common_name: str, issuer: tuple | None = None, ca: bool = False) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): self-signed, or signed by ``issuer`` = (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_name, signer_key = name, key
    if issuer is not None:
        signer_name = x509.load_pem_x509_certificate(issuer[0]).subject
        signer_key = serialization.load_pem_private_key(issuer[1], password=None)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(folder: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return cert, key


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A home made by the real `ddm-coordinator init`, and the TLS fingerprint it printed."""
    root = tmp_path_factory.mktemp("tls")
    init = ["--mode", "siloed", "--image-size", "8", "--channels", "1", "--experts", "2", "--preset", "tiny"]
    result = cli("coordinator", "init", "--home", root / "home", *init)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("sha256:")  # the signing key's fingerprint stays the last line
    printed = next(line[len(TLS_LINE) :] for line in lines if line.startswith(TLS_LINE))
    return Home(root / "home"), printed, root


def serving(home: Home, tls: ServerTls | None, listen: str = "127.0.0.1:0") -> CoordinatorServer:
    """Serve a copy of ``home`` (one process or server holds a home at a time; the module's
    server already holds the original): same keys, certificate and registry."""
    copy = Path(tempfile.mkdtemp(prefix="home-", dir=home.root.parent)) / "home"
    shutil.copytree(home.root, copy, ignore=shutil.ignore_patterns("serve.lock"))
    server = CoordinatorServer(Home(copy), listen, tls)
    server.start()
    return server


@pytest.fixture(scope="module")
def tls_server(made):
    home, fingerprint, root = made
    server = serving(home, load_server_tls(home))
    server.address = f"127.0.0.1:{server.port}"
    yield server, fingerprint, root
    server.stop(grace=0)


def pinned(fingerprint: str, **extra) -> TlsSettings:
    return TlsSettings(fingerprint=fingerprint, **extra)


def invite_unused(server) -> bool:
    return server.registry.snapshot()["invites"][-1]["used_at"] is None


def test_init_makes_a_self_signed_certificate_and_a_private_key(made):
    home, printed, _ = made
    assert home.tls_key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(home.tls_cert_path.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert printed == "sha256:" + hashlib.sha256(der).hexdigest()
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ddm coordinator"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(names.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        names.get_values_for_type(x509.IPAddress)
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=3000)
    key = serialization.load_pem_private_key(home.tls_key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    # `status` shows the same fingerprint, as JSON and in its table.
    status = cli("coordinator", "status", "--home", home.root, "--json")
    report = json.loads(status.stdout)
    assert report["coordinator"]["tls_fingerprint"] == printed
    table = Console(record=True, width=200)
    render_status(report, table)
    assert f"TLS certificate {printed}" in table.export_text()


def test_a_pinned_client_enrolls_and_works(tls_server):
    server, fingerprint, _ = tls_server
    token = server.registry.create_invite("island", 60)
    # By IP (the certificate is checked by the name it carries) and by name alike.
    reply = Connection(server.address, tls=pinned(fingerprint), attempts=1).unary(
        "Enroll", pb.EnrollRequest(token=token, name="tls")
    )
    authed = Connection(f"localhost:{server.port}", reply.credential, tls=pinned(fingerprint), attempts=1)
    assert authed.unary("AcquireLease", pb.AcquireLeaseRequest()).WhichOneof("result") == "lease"
    authed.close()


def test_a_pinned_client_reaches_an_ipv6_address(made):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    home, fingerprint, _ = made
    server = serving(home, load_server_tls(home), "[::1]:0")
    try:
        conn = Connection(f"[::1]:{server.port}", tls=pinned(fingerprint), attempts=1)
        with pytest.raises(ClientError) as refused:  # the channel works: the coordinator itself answers
            conn.unary("Enroll", pb.EnrollRequest(token="ddm_forged", name="v6"))
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=0)


def test_a_wrong_pin_fails_in_one_line_naming_both_and_changes_nothing(tls_server, tmp_path):
    server, fingerprint, _ = tls_server
    token = server.registry.create_invite("island", 60)
    islands = len(server.registry.snapshot()["islands"])
    wrong = "sha256:" + "ab" * 32
    state = IslandState(tmp_path / "state")
    with pytest.raises(ClientError) as refused:
        enroll(state, server.address, token, "x", "island", None, pinned(wrong))
    line = one_line_error(refused)
    assert fingerprint in line and wrong in line and "impersonated" in line, line
    assert state.identity() is None and not (tmp_path / "state" / "identity.json").exists()
    assert invite_unused(server) and len(server.registry.snapshot()["islands"]) == islands


def test_plaintext_and_tls_clients_are_told_what_the_coordinator_speaks(tls_server, made):
    server, fingerprint, _ = tls_server
    token = server.registry.create_invite("island", 60)
    plain = Connection(server.address, tls=TlsSettings(insecure=True), attempts=8)
    started = time.monotonic()
    with pytest.raises(ClientError) as refused:
        plain.unary("Enroll", pb.EnrollRequest(token=token), timeout=5)
    assert "speaks TLS" in one_line_error(refused) and "--tls-fingerprint" in str(refused.value)
    assert time.monotonic() - started < 5  # said at once, not after every retry
    assert invite_unused(server)

    home = made[0]
    plaintext = serving(home, None)
    try:
        with pytest.raises(ClientError) as refused:
            Connection(f"127.0.0.1:{plaintext.port}", tls=pinned(fingerprint)).unary("Enroll", pb.EnrollRequest())
        assert "does not speak TLS" in one_line_error(refused) and "--insecure" in str(refused.value)
    finally:
        plaintext.stop(grace=0)


def test_a_ca_issued_certificate_is_verified_against_its_ca(made, tmp_path):
    home = made[0]
    ca = certificate("test CA", ca=True)
    leaf = certificate("localhost", issuer=ca)
    ca_path, _ = write_pair(tmp_path, "ca", ca)
    cert_path, key_path = write_pair(tmp_path, "leaf", leaf)
    server = serving(home, load_server_tls(home, cert_path, key_path))
    address = f"127.0.0.1:{server.port}"
    try:
        token = server.registry.create_invite("island", 60)
        reply = Connection(address, tls=TlsSettings(ca=ca_path), attempts=1).unary(
            "Enroll", pb.EnrollRequest(token=token, name="ca")
        )
        assert reply.credential

        other_path, _ = write_pair(tmp_path, "other", certificate("other CA", ca=True))
        token = server.registry.create_invite("island", 60)
        stranger = Connection(address, tls=TlsSettings(ca=other_path), attempts=3)
        with pytest.raises(ClientError) as refused:
            stranger.unary("Enroll", pb.EnrollRequest(token=token), timeout=5)
        assert "TLS handshake" in one_line_error(refused) and "does not chain" in str(refused.value)
        assert invite_unused(server)
    finally:
        server.stop(grace=0)
    with pytest.raises(ClientError, match="cannot read the TLS certificate authority"):
        Connection("127.0.0.1:1", tls=TlsSettings(ca=tmp_path / "absent.pem"))


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(made, tmp_path):
    home, fingerprint, _ = made
    client_ca = certificate("island CA", ca=True)
    ca_path, _ = write_pair(tmp_path, "client-ca", client_ca)
    good_cert, good_key = write_pair(tmp_path, "island", certificate("island", issuer=client_ca))
    bad_cert, bad_key = write_pair(tmp_path, "stranger", certificate("stranger"))
    server = serving(home, load_server_tls(home, client_ca=ca_path))
    address = f"127.0.0.1:{server.port}"
    try:
        token = server.registry.create_invite("island", 60)
        with pytest.raises(ClientError) as refused:
            Connection(address, tls=pinned(fingerprint)).unary("Enroll", pb.EnrollRequest(token=token))
        assert "requires a client certificate" in one_line_error(refused)
        stranger = pinned(fingerprint, client_cert=bad_cert, client_key=bad_key)
        with pytest.raises(ClientError) as refused:
            Connection(address, tls=stranger).unary("Enroll", pb.EnrollRequest(token=token))
        assert "refused the client certificate" in one_line_error(refused)
        assert invite_unused(server)

        island = pinned(fingerprint, client_cert=good_cert, client_key=good_key)
        reply = Connection(address, tls=island, attempts=1).unary("Enroll", pb.EnrollRequest(token=token, name="m"))
        assert reply.credential and not invite_unused(server)
    finally:
        server.stop(grace=0)


def test_saved_tls_settings_are_reused_and_flags_and_environment_come_first(tls_server, tmp_path, monkeypatch):
    server, fingerprint, _ = tls_server
    monkeypatch.delenv("DDM_TLS_FINGERPRINT", raising=False)
    state = IslandState(tmp_path / "state")
    with pytest.raises(ClientTlsError) as refused:  # first contact, nothing chosen
        tls_for(state, server.address, None)
    line = one_line_error(refused)
    assert "--tls-fingerprint" in line and "ddm-coordinator init" in line and "--insecure" in line

    tls = tls_for(state, server.address, pinned(fingerprint))
    identity = enroll(state, server.address, server.registry.create_invite("reader", 60), "r", "reader", None, tls)
    assert json.loads((tmp_path / "state" / "identity.json").read_text())["tls"]["fingerprint"] == fingerprint

    again = tls_for(IslandState(tmp_path / "state"), server.address, None)  # a later command, no flags
    assert again == tls
    conn = Connection(server.address, identity.credential, tls=again, attempts=1)
    assert json.loads(conn.unary("Status", pb.StatusRequest()).json)["coordinator"]["tls_fingerprint"] == fingerprint
    conn.close()

    wrong = "sha256:" + "cd" * 32
    monkeypatch.setenv("DDM_TLS_FINGERPRINT", wrong)
    assert tls_for(state, server.address, None).fingerprint == wrong  # the environment beats the saved pin
    assert tls_for(state, server.address, TlsSettings(insecure=True)).insecure  # and flags beat both

    # An identity saved before TLS settings were kept still loads; it just needs them said once.
    monkeypatch.delenv("DDM_TLS_FINGERPRINT")
    old = json.loads((tmp_path / "state" / "identity.json").read_text())
    del old["tls"]
    (tmp_path / "state" / "identity.json").write_text(json.dumps(old))
    assert state.identity().island_id == identity.island_id
    with pytest.raises(ClientTlsError, match="--tls-fingerprint"):
        tls_for(state, server.address, None)


def test_join_saves_the_pin_for_the_next_command(tls_server, tmp_path):
    server, fingerprint, _ = tls_server
    # Every expert is leased already, so each join asks for work, hears there is none and exits.
    while True:
        conn = Connection(server.address, tls=pinned(fingerprint), attempts=1)
        reply = conn.unary("Enroll", pb.EnrollRequest(token=server.registry.create_invite("island", 60), name="b"))
        busy = Connection(server.address, reply.credential, tls=pinned(fingerprint), attempts=1)
        if busy.unary("AcquireLease", pb.AcquireLeaseRequest()).WhichOneof("result") != "lease":
            break
    state = tmp_path / "state"
    join = ["join", "--coordinator", server.address, "--state-dir", state, "--once"]
    token = server.registry.create_invite("island", 60)
    first = cli("client", *join, "--token", token, "--tls-fingerprint", fingerprint)
    assert first.returncode == 0 and "no work" in first.stderr, first.stderr[-2000:]
    second = cli("client", *join)  # no token, no TLS flag: both come from the state folder
    assert second.returncode == 0 and "no work" in second.stderr, second.stderr[-2000:]


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def message_line(proc: subprocess.Popen) -> str:
    """The next line serve writes for a person, past its timestamped log lines."""
    while True:
        line = proc.stderr.readline()
        if not LOG_LINE.match(line):
            return line


def test_serve_refuses_plaintext_beyond_loopback_unless_insecure(made):
    home = made[0]
    refused = cli("coordinator", "serve", "--home", home.root, "--listen", f"0.0.0.0:{free_port()}", "--no-tls")
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("error: refusing to serve plaintext on 0.0.0.0"), refused.stderr

    port = free_port()
    argv = [sys.executable, "-m", "coordinator.cli", "serve", "--home", home.root, "--listen", f"0.0.0.0:{port}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen([*map(str, argv), "--no-tls", "--insecure"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        warning = message_line(proc)
        listening = message_line(proc)
        assert warning.startswith("warning: serving plaintext on 0.0.0.0"), warning
        assert "listening" in listening and "(plaintext)" in listening, listening
        conn = Connection(f"127.0.0.1:{port}", tls=TlsSettings(insecure=True))
        with pytest.raises(ClientError) as answered:
            conn.unary("Enroll", pb.EnrollRequest(token="ddm_forged", name="x"))
        assert answered.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_serve_speaks_tls_by_default_and_a_home_without_a_certificate_says_how_to_make_one(made, tmp_path):
    home, fingerprint, _ = made
    port = free_port()
    argv = [sys.executable, "-m", "coordinator.cli", "serve", "--home", home.root, "--listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen(list(map(str, argv)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        listening = message_line(proc)
        assert f"(TLS, certificate {fingerprint})" in listening, listening
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()

    # A home made before TLS: serve names the command that makes the certificate, which
    # refuses to replace one unless forced.
    old = Home(tmp_path / "old")
    old.root.mkdir()
    for name in ("config.json", "signing_key.pem"):
        (old.root / name).write_bytes((home.root / name).read_bytes())
    os.chmod(old.key_path, 0o600)
    with pytest.raises(TlsError) as missing:
        load_server_tls(old)
    assert f"ddm-coordinator tls --home {old.root}" in one_line_error(missing)
    made_now = cli("coordinator", "tls", "--home", old.root)
    assert made_now.returncode == 0, made_now.stderr
    printed = made_now.stdout.strip().splitlines()[-1]
    assert load_server_tls(old).fingerprint == printed != fingerprint
    assert old.tls_key_path.stat().st_mode & 0o777 == 0o600
    again = cli("coordinator", "tls", "--home", old.root)
    assert again.returncode == 2 and "--force" in again.stderr
    assert cli("coordinator", "tls", "--home", old.root, "--force").stdout.strip().splitlines()[-1] != printed


def test_invite_prints_a_join_command_with_the_pin_before_the_token(made):
    home, fingerprint, _ = made
    result = cli("coordinator", "invite", "--home", home.root, "--address", "coord.example.org:50051")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    token = lines[-1]
    assert token.startswith("ddm_")
    hint = next(line for line in lines if "ddm-client join" in line)
    assert f"--tls-fingerprint {fingerprint}" in hint and f"--token {token}" in hint
    assert "--coordinator coord.example.org:50051" in hint
