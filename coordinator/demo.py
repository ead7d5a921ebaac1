"""`ddm-coordinator demo`: the whole system on one machine, as separate processes.

    OUT/coordinator/     the coordinator's home (init here, then `ddm-coordinator serve` on loopback, TLS)
    OUT/islands/N/       each island's state folder (`ddm-client join --once`, one process each,
                         pinning the coordinator's TLS certificate by fingerprint)
    OUT/reader/          the downloader's state folder
    OUT/ensemble/        the downloaded, verified ensemble
    OUT/samples.png      a grid of samples; OUT/samples.npz the raw samples
    OUT/logs/            every process's output

The demo drives the real command lines and reads the registry for its progress display.
Run it again with the same folder and every process resumes from the state kept there.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ddm_model.data import load_digits
from ddm_model.dit import trunk_for
from ddm_model.ensemble import parse_routing
from ddm_model.errors import DDMError
from ddm_model.metrics import Evaluator
from ddm_model.progress import progress_bar
from protocol.address import is_loopback, split_address

from .bootstrap import InitOptions, init_home
from .home import Home
from .keys import SigningKey
from .registry import Registry
from .status import build_status
from .tls import home_fingerprint, write_certificate

console = Console()
POLL_S = 0.5


class DemoError(DDMError):
    """A demo process that failed; the message points at its log."""


@dataclass
class DemoSettings:
    out: Path
    experts: int = 4
    preset: str = "small"
    steps: int = 1200
    router_steps: int | None = None  # None: the router costs init's default share of the experts' FLOPs
    routing: str = "ancestral"
    samples: int = 1000
    sampling_steps: int = 20
    seed: int = 0
    dashboard: str | None = None  # HOST:PORT (loopback) for `serve --dashboard` while the demo runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(package: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"{package}.cli", *map(str, args)]


class Processes:
    """Child processes with their logs; all stopped on exit."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}
        self._files = []

    def start(self, name: str, argv: list[str], threads: int | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
        self._files.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.children[name] = proc
        return proc

    def tail(self, name: str, lines: int = 3) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self._files:
            log.close()


def run(argv: list[str], log: Path) -> str:
    """Run a command to completion; its output goes to a log and comes back for the console."""
    result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DemoError(f"`ddm-client {argv[3]}` failed: {last} (log: {log})")
    return result.stdout


def prepare_home(s: DemoSettings, home: Home) -> str:
    if home.exists():
        config = home.load_config()
        if config.experts != s.experts or config.model["preset"] != s.preset or config.train["steps"] != s.steps:
            raise DemoError(f"{home.root} was set up with other settings; use another --out or remove it")
        fingerprint = SigningKey.load(home.key_path).fingerprint
        console.print(f"resuming the coordinator in {home.root}", highlight=False)
        return fingerprint
    _, fingerprint = init_home(
        InitOptions(
            home=home.root,
            dataset="digits",
            experts=s.experts,
            preset=s.preset,
            steps=s.steps,
            router_steps=s.router_steps,
            seed=s.seed,
            lease_seconds=60.0,
            heartbeat_seconds=2.0,
        )
    )
    config = home.load_config()
    console.print(
        f"coordinator home {home.root}: digits clustered into {s.experts} ({config.clustering['sizes']} images)",
        highlight=False,
    )
    return fingerprint


def wait_ready(address: str, coordinator: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the coordinator completes a TLS handshake (the islands check its certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(split_address(address), timeout=1.0) as sock, context.wrap_socket(sock):
                return
        except OSError:
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the coordinator did not come up on {address}") from None
            time.sleep(0.1)


def follow(home: Home, registry: Registry, procs: Processes, fingerprint: str) -> dict:
    """Show each expert's progress from the registry until the ensemble is published."""
    config = home.load_config()
    with progress_bar() as bar:
        tasks = {
            e["id"]: bar.add_task(f"expert {e['id']}", total=config.train["steps"], info="")
            for e in build_status(home, config, registry, fingerprint)["experts"]
        }
        # The router's total is known once assembly starts when a FLOPs share chooses it.
        router_task = bar.add_task("router (coordinator)", total=None, info="waiting")
        while True:
            status = build_status(home, config, registry, fingerprint)
            for e in status["experts"]:
                loss = "" if e["loss"] is None else f"  loss {e['loss']:.3f}"
                bar.update(tasks[e["id"]], completed=e["step"], info=f"{e['state']}{loss}")
            router = status["router"]
            bar.update(router_task, total=router["steps"], completed=router["step"], info=router["state"])
            if status["ensemble"]["state"] == "published" and status["ensemble"]["experts"] == config.experts:
                return status
            if status["ensemble"]["state"] == "failed":
                raise DemoError(f"assembly failed: {status['ensemble']['reason']} (log: {procs.logs}/coordinator.log)")
            if procs.children["coordinator"].poll() is not None:
                raise DemoError(f"the coordinator exited: {procs.tail('coordinator')}")
            for name, proc in procs.children.items():
                if name != "coordinator" and proc.poll() not in (None, 0):
                    raise DemoError(f"{name} failed: {procs.tail(name)}")
            time.sleep(POLL_S)


def run_demo(s: DemoSettings) -> dict:
    parse_routing(s.routing, s.experts)
    trunk_for(s.preset)
    if s.dashboard is not None:
        from .dashboard.server import loopback_default

        s.dashboard = loopback_default(s.dashboard)
        try:
            host, _ = split_address(s.dashboard)
        except ValueError as exc:
            raise DemoError(f"--dashboard {exc}") from None
        if not is_loopback(host):
            raise DemoError(f"--dashboard {s.dashboard}: the demo serves its dashboard on loopback only")
    started = time.perf_counter()
    out = s.out.resolve()
    home = Home(out / "coordinator")
    fingerprint = prepare_home(s, home)
    tls_fingerprint = home_fingerprint(home) or write_certificate(home)
    console.print(f"coordinator key {fingerprint}, TLS certificate {tls_fingerprint}", highlight=False, soft_wrap=True)

    procs = Processes(out / "logs")
    address = f"127.0.0.1:{free_port()}"
    registry = Registry(home.database_url(home.load_config()))
    try:
        serve = ["serve", "--home", home.root, "--listen", address]
        if s.dashboard is not None:
            serve += ["--dashboard", s.dashboard]
        coordinator = procs.start("coordinator", cli("coordinator", *serve))
        wait_ready(address, coordinator)
        if s.dashboard is not None:
            console.print(f"dashboard at http://{s.dashboard}/ while the demo runs", highlight=False)
        threads = max(1, (os.cpu_count() or 1) // s.experts)
        connect = ["--coordinator", address, "--tls-fingerprint", tls_fingerprint]
        for k in range(s.experts):
            state = out / "islands" / str(k)
            argv = ["join", *connect, "--state-dir", state, "--once", "--name", f"island-{k}"]
            argv += ["--threads", str(threads)]
            if not (state / "identity.json").exists():
                argv += ["--token", registry.create_invite("island", 3600)]
            procs.start(f"island-{k}", cli("client", *argv), threads=threads)
        console.print(
            f"coordinator on {address}; {s.experts} island processes training on their own clusters "
            f"(logs in {procs.logs})",
            highlight=False,
        )
        follow(home, registry, procs, fingerprint)

        reader = out / "reader"
        argv = ["download", *connect, "--out", out / "ensemble", "--fingerprint", fingerprint]
        argv += ["--state-dir", reader]
        if not (reader / "identity.json").exists():
            argv += ["--token", registry.create_invite("reader", 3600)]
        run(cli("client", *argv), procs.logs / "download.log")
        console.print(f"downloaded and verified the signed ensemble into {out / 'ensemble'}", highlight=False)
    finally:
        procs.stop()
        registry.close()

    grid, npz = out / "samples.png", out / "samples.npz"
    run(
        cli(
            "client",
            "sample",
            out / "ensemble",
            "--n",
            s.samples,
            "--routing",
            s.routing,
            "--steps",
            s.sampling_steps,
            "--seed",
            s.seed,
            "--fingerprint",
            fingerprint,
            "--out",
            grid,
            "--npz",
            npz,
        ),
        procs.logs / "sample.log",
    )
    with np.load(npz, allow_pickle=False) as data:
        images = torch.from_numpy(data["images"])
    evaluator = Evaluator.build(load_digits(), seed=s.seed)
    fd = evaluator.frechet(images)
    floor = evaluator.real_vs_real(seed=s.seed)
    hist = evaluator.class_histogram(images)
    console.print("generated digits by class: " + "  ".join(f"{d}:{share:.0%}" for d, share in enumerate(hist)))
    console.print(
        f"Fréchet distance ({s.routing}, {s.samples} samples, {s.sampling_steps} euler steps): [bold]{fd:.1f}[/bold]"
        f"  (real vs real: {floor:.1f})",
        soft_wrap=True,
    )
    console.print(f"samples: [bold]{grid}[/bold]  ({time.perf_counter() - started:.0f} s)", soft_wrap=True)
    return {"grid": str(grid), "frechet": fd, "real_vs_real": floor}
