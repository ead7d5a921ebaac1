import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TLS_LINE = "TLS certificate fingerprint: "  # the line of `ddm-coordinator init` that gives it


def cli(name: str) -> list[str]:
    """The installed console script when there is one, else the same entry point via -m."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"ddm-coordinator": "coordinator.cli", "ddm-client": "client.cli"}[name]]


@pytest.fixture
def run():
    def run(name, *args, cwd=None, timeout=300):
        return subprocess.run(
            [*cli(name), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=process_env(), timeout=timeout
        )

    return run


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread for what a test computes in this process, as its child processes have
    (see process_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- real coordinator and island processes ------------------------------------------------------


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def process_env() -> dict:
    """child_env for the tests' own processes: one torch thread each unless OMP_NUM_THREADS says
    otherwise. The models here are tiny and the tests run several processes at once on a small
    machine, often beside other work: a second spinning thread per process gains little when the
    machine is idle and slows a process several times over when it is not."""
    return {**child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Child:
    """A real subprocess whose stdout and stderr go to files (no pipe can fill up and block it)."""

    def __init__(self, popen: subprocess.Popen, out: Path, err: Path):
        self.popen = popen
        self.out_path = out
        self.err_path = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self):
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal(self, sig) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL (a stopped process is continued first) and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
        self.popen.wait(timeout=30)


@pytest.fixture
def spawn(tmp_path):
    """Start a console script as a real process; every one is killed at teardown."""
    children: list[Child] = []
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)

    def spawn(name, *args, label: str | None = None, env: dict | None = None) -> Child:
        """``env``: variables to add to the child's environment."""
        label = label or f"{name}-{len(children)}"
        out, err = logs / f"{label}.out", logs / f"{label}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                [*cli(name), *map(str, args)],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env={**process_env(), **(env or {})},
            )
        child = Child(popen, out, err)
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.kill()


class Coordinator:
    """A coordinator home made by the real `ddm-coordinator init`, served by `ddm-coordinator serve`."""

    def __init__(self, home: Path, fingerprint: str, tls_fingerprint: str, run, spawn, name: str = "serve"):
        self.home = home
        self.name = name  # its processes' log files are named after it
        self.fingerprint = fingerprint  # the signing key's
        self.tls_fingerprint = tls_fingerprint  # the TLS certificate's, which clients pin
        self._run = run
        self._spawn = spawn
        self.proc: Child | None = None
        self.port = 0
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connect_args(self) -> list:
        """What a `ddm-client` command needs to reach this coordinator."""
        return ["--coordinator", self.address, "--tls-fingerprint", self.tls_fingerprint]

    @property
    def tls(self):
        """The client library's TLS settings for this coordinator: its certificate, pinned."""
        from client.tls import TlsSettings

        return TlsSettings(fingerprint=self.tls_fingerprint)

    def connection(self, credential: str | None = None, **kwargs):
        """A client library connection to this coordinator."""
        from client.connection import Connection

        return Connection(self.address, credential, tls=self.tls, **kwargs)

    def start(self, timeout: float = 30.0, env: dict | None = None, same_port: bool = False) -> str:
        """Serve the home; ``env`` adds to serve's environment (DDM_FAULT arms a fault point),
        ``same_port`` listens where the last run did, so running islands find it again."""
        assert self.proc is None or self.proc.poll() is not None, "already serving"
        self.port = self.port if same_port and self.port else free_port()
        self.starts += 1
        self.proc = self._spawn(
            "ddm-coordinator",
            "serve",
            "--home",
            self.home,
            "--listen",
            self.address,
            label=f"{self.name}-{self.starts}",
            env=env,
        )
        from client.tls import handshake
        from protocol.trust import certificate_fingerprint

        deadline = time.monotonic() + timeout
        while True:  # ready once it completes a TLS handshake
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.poll()}: {self.proc.stderr()[-2000:]}")
            try:
                peer = handshake(self.address, timeout=0.5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve not ready in {timeout} s: {self.proc.stderr()[-2000:]}") from None
                time.sleep(0.05)
        assert certificate_fingerprint(peer.der) == self.tls_fingerprint
        return self.address

    def kill(self) -> None:
        """SIGKILL the serving process: no shutdown code runs."""
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.proc.stderr() if self.proc else ""

    def invite(self, role: str = "island", cli: bool = False) -> str:
        """A single-use invite token for ``role``, made by the home's registry in this process as
        `ddm-coordinator invite` makes it (a process per invite takes a second or more on a busy
        machine); ``cli``: by the real command, whose last line of output is the token."""
        if cli:
            result = self._run("ddm-coordinator", "invite", "--home", self.home, "--role", role)
            assert result.returncode == 0, result.stderr
            token = result.stdout.strip().splitlines()[-1]
            assert token.startswith("ddm_"), result.stdout
            return token
        from coordinator.home import Home
        from coordinator.registry import Registry

        home = Home(self.home)
        config = home.load_config()
        registry = Registry(home.database_url(config), lease_seconds=config.lease_seconds)
        try:
            token = registry.create_invite(role, 24 * 3600)  # the command's default --ttl-hours
        finally:
            registry.close()
        assert token.startswith("ddm_"), token
        return token

    def status(self) -> dict:
        result = self._run("ddm-coordinator", "status", "--home", self.home, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_published(self, timeout: float) -> None:
        """Wait for an assembly to publish (read from the registry: a `status` process at every
        poll would take CPU from the router training it waits for); fail if it failed."""
        done = wait_for(
            lambda: self.db("SELECT state, reason FROM ensembles WHERE state IN ('published', 'failed')"),
            timeout,
            "the ensemble to be published",
            every=0.2,
        )
        assert done[0]["state"] == "published", (done, self.log()[-3000:])

    def db(self, sql: str, *params) -> list[dict]:
        """Rows of the registry, read straight from its SQLite file, read-only."""
        con = sqlite3.connect(f"file:{self.home / 'ddm.db'}?mode=ro", uri=True, timeout=30)
        try:
            con.row_factory = sqlite3.Row
            return [dict(row) for row in con.execute(sql, params)]
        finally:
            con.close()


def init_home(home: Path, *init_args) -> tuple[str, str]:
    """Init ``home`` with the real `ddm-coordinator init`; returns the fingerprints it printed: the
    signing key's (its last line) and the TLS certificate's."""
    result = subprocess.run(
        [*cli("ddm-coordinator"), "init", "--home", str(home), *map(str, init_args)],
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    fingerprint = lines[-1]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64, result.stdout
    tls_fingerprint = next(line.split(": ", 1)[1] for line in lines if line.startswith(TLS_LINE))
    assert tls_fingerprint.startswith("sha256:") and len(tls_fingerprint) == 7 + 64, result.stdout
    return fingerprint, tls_fingerprint


@pytest.fixture
def coordinator(tmp_path, run, spawn):
    """``coordinator(*init_args)``: init a home with the real CLI and serve it on a free port."""

    def make(*init_args, serve: bool = True) -> Coordinator:
        home = tmp_path / "home"
        fingerprint, tls_fingerprint = init_home(home, *init_args)
        coord = Coordinator(home, fingerprint, tls_fingerprint, run, spawn)
        if serve:
            coord.start()
        return coord

    return make
