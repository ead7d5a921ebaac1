"""The dashboard (`serve --dashboard`) of a real loopback coordinator, over real HTTP: its JSON is
``build_status``'s and ``build_events``', its headers keep other sites from reading, framing or
rebinding to it, nothing on it changes state, off loopback it needs TLS and an operator's login,
and the sample grid of a published ensemble is drawn once. The browser's view of it is
tests/e2e/test_dashboard.py."""

import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from PIL import Image
from typer.testing import CliRunner

from client.connection import ClientError, Connection
from client.transfer import upload_checkpoint
from coordinator.cli import app as coordinator_app
from coordinator.dashboard.server import DashboardError, DashboardServer, DashboardSettings, dashboard_settings
from coordinator.keys import SigningKey
from coordinator.registry import RegistryError
from coordinator.status import CURVE_POINTS, build_events, build_status
from protocol import ddm_pb2 as pb

from ..helpers import one_line_error
from .test_service import enroll, lease_for, train


def request(web, path, method="GET", headers=None, body=None, host=None):
    """(status, headers as a lower-cased dict, body bytes) of one request to ``web``."""
    if web.settings.cert:
        context = ssl.create_default_context(cafile=str(web.settings.cert))
        context.check_hostname = False  # the home's certificate names the coordinator, not 127.0.0.1
        conn = http.client.HTTPSConnection("127.0.0.1", web.port, context=context, timeout=30)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{web.port}")
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        data = body.encode() if isinstance(body, str) else body
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


@pytest.fixture
def board(server):
    """The dashboard of ``server`` on loopback, as `serve --dashboard 127.0.0.1:0` serves it."""
    web = DashboardServer(server, dashboard_settings("127.0.0.1:0", None, None))
    web.start()
    yield web
    web.stop()


@pytest.fixture
def login_board(server):
    """The dashboard with HTTPS and a login, as `serve` serves it off loopback (here on 127.0.0.1)."""
    home = server.home
    web = DashboardServer(server, DashboardSettings("127.0.0.1", 0, True, home.tls_cert_path, home.tls_key_path))
    web.start()
    yield web
    web.stop()


def beat(conn, lease, step, loss):
    conn.unary("Heartbeat", pb.HeartbeatRequest(lease_id=lease.lease_id, step=step, loss=loss, images_per_second=50))


def test_the_json_is_build_status_and_build_events_with_each_experts_curve(server, board):
    conn, enrolled = enroll(server)
    lease = lease_for(conn)
    for step, loss in ((2, 0.9), (4, 0.7), (6, 0.6)):
        beat(conn, lease, step, loss)
        server.reap()  # writes the buffered beats, as the reaper does every second
    beat(conn, lease, 8, float("nan"))
    server.reap()  # a loss of NaN (a private island's) adds no point

    status, headers, body = request(board, "/api/status")
    assert status == 200 and headers["content-type"] == "application/json"
    served = json.loads(body)
    fingerprint = SigningKey.load(server.home.key_path).fingerprint
    assert served == build_status(server.home, server.config, server.registry, fingerprint)
    expert = served["experts"][lease.expert_id]
    assert expert["curve"] == [[2, 0.9], [4, 0.7], [6, 0.6]] and expert["step"] == 8
    island = next(i for i in served["islands"] if i["id"] == enrolled.island_id)
    assert island["alive"] and island["images_per_second"] == 50.0

    status, _, body = request(board, "/api/events?kind=lease&limit=5")
    assert status == 200 and json.loads(body) == build_events(server.registry, limit=5, kind="lease")
    assert [e["kind"] for e in json.loads(body)] == ["lease"]
    status, _, body = request(board, f"/api/events?island={enrolled.island_id}")
    assert {e["island_id"] for e in json.loads(body)} == {enrolled.island_id}
    assert request(board, "/api/events?limit=many")[0] == 400

    # Neither the island's credential nor any invite token is anywhere on the page or its JSON.
    secret = enrolled.credential.split(".", 1)[1]
    for path in ("/", "/api/status", "/api/events?limit=500", "/static/app.js"):
        assert secret.encode() not in request(board, path)[2]
    assert b"ddm_" not in request(board, "/api/events?limit=500")[2]


def test_a_curve_keeps_at_most_curve_points_evenly_spread(server):
    registry = server.registry

    def train(steps, loss):
        """A lease whose island reported every step (beats written as the reaper writes them)."""
        conn, enrolled = enroll(server)
        lease = lease_for(conn)
        for step in range(1, steps + 1):
            registry.buffered_heartbeat(enrolled.island_id, lease.lease_id, step, loss(step), 50.0)
            registry.flush_heartbeats()
        return lease

    lease = train(300, lambda step: 1.0 / step)
    curve = build_status(server.home, server.config, registry, "fp")["experts"][lease.expert_id]["curve"]
    assert len(curve) == CURVE_POINTS
    assert curve[0] == [1, 1.0] and curve[-1] == [300, round(1 / 300, 6)]
    assert [p[0] for p in curve] == sorted({p[0] for p in curve})  # distinct steps, in order
    # serve keeps about 500 points of a lease whatever its length: one every steps // 500 steps.
    registry.curve_every_steps = 50
    lease = train(200, lambda step: 1.0)
    assert [p[0] for p in registry.curves([lease.lease_id])[lease.lease_id]] == [1, 51, 101, 151]


def test_other_sites_can_neither_read_frame_nor_rebind_to_it_and_nothing_changes_state(server, board):
    before = server.registry.snapshot()
    status, headers, _ = request(board, "/", headers={"Origin": "http://evil.example"})
    assert status == 200
    csp = headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "same-origin" and headers["referrer-policy"] == "no-referrer"
    for path in ("/api/status", "/api/events"):
        status, headers, _ = request(board, path, headers={"Origin": "http://evil.example"})
        assert status == 200 and not any(name.startswith("access-control-") for name in headers)
        assert headers["cache-control"] == "no-store"
    # A page of another site whose name resolves to 127.0.0.1 sends its own name as the Host.
    assert request(board, "/api/status", host=f"evil.example:{board.port}")[0] == 400
    assert request(board, "/api/status", host=f"evil.example.127.0.0.1:{board.port}")[0] == 400
    for name in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
        assert request(board, "/api/status", host=f"{name}:{board.port}")[0] == 200, name
    assert request(board, "/api/status", host="[::1]")[0] == 200
    # No route changes anything: other methods are refused, a path outside the grids is not served.
    for method, path in (("POST", "/api/status"), ("PUT", "/"), ("DELETE", "/api/events"), ("POST", "/")):
        assert request(board, method=method, path=path, body="x")[0] == 405
    assert request(board, "/samples/..%2Fddm.db")[0] == 404
    assert request(board, "/samples/" + "0" * 64 + ".png")[0] == 404
    # Without a login there is nothing to log into or out of.
    assert request(board, "/login", method="POST", body="token=x")[0] == 303
    after = server.registry.snapshot()
    for snap in (before, after):
        for island in snap["islands"]:
            island.pop("last_seen_at")
    assert after == before


def test_off_loopback_it_needs_tls_and_an_operator_login(server, login_board, tmp_path):
    with pytest.raises(DashboardError) as refused:
        dashboard_settings("0.0.0.0:8080", None, None)
    assert "without TLS" in one_line_error(refused)
    cert, key = server.home.tls_cert_path, server.home.tls_key_path
    assert dashboard_settings("0.0.0.0:8080", cert, key).login
    assert not dashboard_settings("[::1]:8080", cert, key).login  # loopback: no login
    assert dashboard_settings("8080", cert, key) == DashboardSettings("127.0.0.1", 8080, login=False)  # a port alone
    with pytest.raises(DashboardError):
        dashboard_settings("localhost", cert, key)

    web = login_board
    assert request(web, "/api/status")[0] == 401
    status, headers, _ = request(web, "/")
    assert status == 303 and headers["location"] == "/login"
    assert headers["strict-transport-security"].startswith("max-age=")
    status, _, page = request(web, "/login")
    assert status == 200 and b'name="token"' in page

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    island_token = server.registry.create_invite("island", 60)
    status, headers, page = request(web, "/login", "POST", form, f"token={island_token}")
    assert status == 401 and b"not an operator token" in page and island_token.encode() not in page
    assert "set-cookie" not in headers

    operator = server.registry.create_invite("operator", 3600)
    origin = {**form, "Origin": "https://evil.example"}
    assert request(web, "/login", "POST", origin, f"token={operator}")[0] == 403  # a login posted by another site
    status, headers, _ = request(
        web, "/login", "POST", {**form, "Origin": f"https://127.0.0.1:{web.port}"}, f"token={operator}"
    )
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()
    session = {"Cookie": cookie.split(";", 1)[0]}
    assert operator not in cookie
    status, _, body = request(web, "/api/status", headers=session)
    assert status == 200 and operator.encode() not in body
    assert request(web, "/", headers=session)[0] == 200
    assert "operator_login" in [e["kind"] for e in build_events(server.registry, limit=3)]

    # The operator token enrolls nothing.
    with pytest.raises(ClientError) as denied:
        Connection(server.address).unary("Enroll", pb.EnrollRequest(token=operator, name="sneaky"))
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED and "enrolls no island" in str(denied.value)
    assert all(i["name"] != "sneaky" for i in server.registry.snapshot()["islands"])

    # Logging out ends the session; an expired token logs nobody in.
    assert request(web, "/logout", "POST", session)[0] == 303
    assert request(web, "/api/status", headers=session)[0] == 401
    server.clock.advance(3601)
    status, _, page = request(web, "/login", "POST", form, f"token={operator}")
    assert status == 401 and b"expired" in page
    with pytest.raises(RegistryError, match="not an operator token"):
        server.registry.operator_login("ddm_nonsense")


@pytest.mark.slow  # trains and signs three experts and assembles their ensemble
def test_the_sample_grid_of_a_published_ensemble_is_drawn_once(server, board, tmp_path):
    conn, _ = enroll(server)
    for _ in range(server.config.experts):
        lease = lease_for(conn)
        upload_checkpoint(conn, lease.lease_id, train(conn, lease, tmp_path))
    server.assembler.join(120)
    published = server.registry.latest_published()
    assert published is not None
    assert json.loads(request(board, "/api/status")[2])["ensembles"][0]["sample_grid"] is None

    path = board.samples.draw_latest()
    assert path is not None and path.parent == server.home.samples
    with Image.open(path) as image:
        # 36 samples of 8x8 digits in a 6x6 grid, each enlarged to 32 pixels with 1 pixel between.
        assert image.size == (6 * 33 + 1, 6 * 33 + 1)
    written = path.stat().st_mtime_ns
    assert board.samples.draw_latest() == path and path.stat().st_mtime_ns == written  # not drawn again

    time.sleep(1.1)  # DashboardData builds a status at most once a second
    entry = json.loads(request(board, "/api/status")[2])["ensembles"][0]
    assert entry["id"] == published.id and entry["sample_grid"] == path.name
    status, headers, body = request(board, f"/samples/{path.name}")
    assert status == 200 and headers["content-type"] == "image/png" and body == path.read_bytes()


def test_status_watch_runs_until_interrupted_and_refuses_json(server):
    home = str(server.home.root)
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "coordinator.cli", "status", "--home", home]
    refused = subprocess.run([*cmd, "--watch", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "does not go with --json" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    watch = subprocess.Popen(
        [*cmd, "--watch", "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    time.sleep(2.5)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert "experts" in out and "leases" in out and "router:" in out


def test_an_operator_invite_is_a_dashboard_login(server):
    result = CliRunner().invoke(coordinator_app, ["invite", "--home", str(server.home.root), "--role", "operator"])
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert "log into the dashboard" in result.output and "enrolls nothing" in result.output
    assert server.registry.operator_login(token)[0] == hashlib.sha256(token.encode()).hexdigest()[:12]
