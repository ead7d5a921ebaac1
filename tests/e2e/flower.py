"""A real Flower (flwr 1.42) deployment on loopback, for end-to-end tests: no Ray, no simulation.

One ``flower-superlink --insecure`` (in 1.42 a single HTTP port serves the Fleet, Control and
Runtime APIs), N ``flower-supernode`` processes (each with its own Runtime API ``--port`` and
``--node-config``), and ``flwr run`` of an app directory through a connection declared in a
private ``$FLWR_HOME/config.toml``. Every process gets its own HOME and FLWR_HOME (where FABs are
installed) under ``workdir``; stdout and stderr go to ``workdir/logs/<name>.log``.

    with Federation(tmp_path, [{"data-dir": str(a)}, {"data-dir": str(b)}]) as fed:
        result = fed.run(app_dir, {"rounds": 1}, timeout=120)
        assert result.status == "finished:completed", result.logs
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .conftest import free_port

CONNECTION = "e2e"  # the connection name written to config.toml
IN_MEMORY = ":flwr-in-memory:"  # flower-superlink --database default; else a SQLite file path


def toml_pairs(values: dict) -> list[str]:
    """``k=v`` strings as flwr's ``--run-config``/``--node-config`` parser accepts them.

    That parser splits on a regex (``'...'``, ``"..."`` or a bare token), so a string is written as
    a TOML literal string ('...', no escapes) or, if it holds a quote, as a basic string.
    """
    pairs = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, (str, Path)):
            value = str(value)
            if "\n" in value or ("'" in value and '"' in value):
                raise ValueError(f"{key}: flwr cannot take this string: {value!r}")
            text = f"'{value}'" if "'" not in value else json.dumps(value)
        else:
            raise TypeError(f"{key}: only bool, int, float and str values, not {type(value).__name__}")
        pairs.append(f"{key}={text}")
    return pairs


@dataclass
class RunResult:
    run_id: int
    status: str  # "finished:completed", "finished:failed", "finished:stopped", ...
    logs: str  # the ServerApp's output, as `flwr log` streams it
    seconds: float  # wall time from `flwr run` to the end of the log stream
    details: dict  # the run's entry in `flwr ls --format json`


class FlowerRunError(AssertionError):
    pass


class Federation:
    """A SuperLink and one SuperNode per ``node_configs`` entry; ``venv_bin`` holds the flwr executables."""

    READY_TIMEOUT = 60.0  # seconds for the SuperLink to listen and every SuperNode to be activated
    RSS_EVERY = 0.1  # seconds between two samples of the SuperLink's memory

    def __init__(
        self,
        workdir: Path,
        node_configs: list[dict],
        venv_bin: Path | None = None,
        database: str = IN_MEMORY,
        env: dict | None = None,
    ):
        self.workdir = Path(workdir)
        self.extra_env = dict(env or {})  # added to every process's environment (OMP_NUM_THREADS, ...)
        self.logs = self.workdir / "logs"
        self.node_configs = node_configs
        self.bin = Path(venv_bin or Path(sys.executable).parent)
        self.database = database  # or a file path: SQLite state that outlives a SuperLink restart
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: psutil.Popen | None = None
        self.nodes: list[psutil.Popen | None] = []
        self.node_ids: list[int | None] = []
        self._peak = {"tree": 0, "main": 0}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    # -- processes ---------------------------------------------------------------------------------

    def env(self, name: str) -> dict:
        home = self.workdir / "home" / name
        (home / "flwr").mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(home),
            "FLWR_HOME": str(home / "flwr"),
            "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "COLUMNS": "200",
            **self.extra_env,
        }

    def _spawn(self, name: str, *args: str) -> psutil.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            argv = [str(self.bin / args[0]), *args[1:]]
            return psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(name), start_new_session=True)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, what: str, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p for p in [self.superlink, *self.nodes] if p is not None and p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise FlowerRunError(f"{what}: {'a process exited' if dead else 'timed out'}\n{self.all_logs()}")
            time.sleep(0.1)

    def all_logs(self) -> str:
        logs = sorted(self.logs.glob("*.log"))
        return "\n".join(f"--- {p.stem}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)

    def start(self) -> Federation:
        (self.workdir / "home" / "cli" / "flwr").mkdir(parents=True, exist_ok=True)
        (self.workdir / "home" / "cli" / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        args = f"--insecure --host 127.0.0.1 --port {self.port} --disable-runtime-dependency-installation"
        self.superlink = self._spawn("superlink", "flower-superlink", *args.split(), "--database", self.database)
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        self._wait("SuperLink listening", lambda: _accepts(self.port), self.READY_TIMEOUT)
        for i, config in enumerate(self.node_configs):
            args = f"--insecure --superlink {self.address} --port {free_port()}".split()
            node_config = " ".join(toml_pairs(config))
            self.nodes.append(self._spawn(f"supernode-{i}", "flower-supernode", *args, "--node-config", node_config))
            self.node_ids.append(None)
        registered = lambda: all(self._node_id(i) for i in range(len(self.nodes)))  # noqa: E731
        self._wait("SuperNodes registered", registered, self.READY_TIMEOUT)
        return self

    def _node_id(self, i: int) -> int | None:
        if self.node_ids[i] is None:
            found = re.search(r"SuperNode ID: (\d+)", self.log(f"supernode-{i}"))
            active = found and f"Activated node_id={found[1]}" in self.log("superlink")
            self.node_ids[i] = int(found[1]) if active else None
        return self.node_ids[i]

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """End supernode ``i`` and its children (SIGKILL: the SuperLink only notices by missed heartbeats)."""
        node, self.nodes[i] = self.nodes[i], None
        if node is not None:
            _end([node], first=sig)

    def close(self) -> None:
        self._stop.set()
        _end([p for p in [*self.nodes, self.superlink] if p is not None])
        if self._sampler:
            self._sampler.join(timeout=5)

    def __enter__(self) -> Federation:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- memory ------------------------------------------------------------------------------------

    def _sample_rss(self) -> None:
        while not self._stop.is_set() and self.superlink is not None:
            try:
                procs = [self.superlink, *self.superlink.children(recursive=True)]
            except psutil.Error:
                return
            sizes = [_rss(p) for p in procs]
            self._peak["main"] = max(self._peak["main"], sizes[0])
            self._peak["tree"] = max(self._peak["tree"], sum(sizes))
            self._stop.wait(self.RSS_EVERY)

    def superlink_peak_rss(self, main_only: bool = False) -> int:
        """Peak RSS in bytes of the SuperLink plus its children (SuperExec, flwr-serverapp), or of it alone."""
        return self._peak["main" if main_only else "tree"]

    # -- runs --------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        argv = [str(self.bin / "flwr"), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env("cli"), timeout=max(timeout, 1.0))

    def run(
        self, app_dir: Path, run_config: dict | None = None, timeout: float = 300.0, check: bool = True
    ) -> RunResult:
        """``flwr run`` the app, wait for the run to finish, return its status and ServerApp logs.

        Raises FlowerRunError (with all logs) on a timeout, and, if ``check``, unless it completed.
        """
        start = time.monotonic()
        overrides = [a for pair in toml_pairs(run_config or {}) for a in ("--run-config", pair)]
        done = self.flwr("run", str(app_dir), CONNECTION, "--format", "json", *overrides, timeout=timeout)
        run_id = int(_json(done)["run-id"])
        logs, details = "", {}
        while True:  # the log stream ends when the run has finished
            left = timeout - (time.monotonic() - start)
            try:
                streamed = self.flwr("log", str(run_id), CONNECTION, "--stream", timeout=left)
                logs = streamed.stdout + streamed.stderr
            except subprocess.TimeoutExpired as err:
                out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
                self.flwr("stop", str(run_id), CONNECTION)
                raise FlowerRunError(
                    f"run {run_id} still going after {timeout:.0f} s:\n{out}\n{self.all_logs()}"
                ) from None
            details = _json(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))["runs"][0]
            if details["status"].startswith("finished") or time.monotonic() - start > timeout:
                break
        result = RunResult(run_id, details["status"], logs, time.monotonic() - start, details)
        if check and result.status != "finished:completed":
            raise FlowerRunError(
                f"run {run_id} ended {result.status}: {details.get('status-details')}\n{logs}\n{self.all_logs()}"
            )
        return result


def _json(done: subprocess.CompletedProcess) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed."""
    try:
        return json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        raise FlowerRunError(f"{done.args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}") from None


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:  # it has just ended
        return 0


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _end(roots: list[psutil.Process], first: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal the processes and all their descendants (SuperExec and app processes run in new sessions)."""
    procs = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs += [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(first)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
