"""Load: many simulated islands enrolling, leasing and heartbeating at once against the coordinator,
served by one process on SQLite or by several processes sharing one PostgreSQL registry.
Prints figures per RPC kind and writes a Markdown report; asserts nothing.

    python bench/load.py                                  # 1000 islands, back-to-back heartbeats, SQLite
    python bench/load.py --tls --interval 0 1             # plaintext and TLS, two heartbeat cadences
    python bench/load.py --islands 20 --heartbeats 2      # smoke: a few seconds
    python bench/load.py --backend sqlite,postgresql --processes 1,2,4 --transport tls \\
        --islands 1000 5000 --heartbeats 20 10 --interval 0 10 --generators 2   # issue 12's comparison

A deployment is a backend and a number of `ddm-coordinator serve` processes: SQLite is served by
one process (a SQLite home allows no more); PostgreSQL by each count in --processes, all on one
home and one database, each process on its own port of 127.0.0.1, the islands spread round robin
across the ports (island i talks to port i mod N: N processes behind a TCP load balancer, without
the balancer). Each scenario gets a fresh home made by `ddm-coordinator init --mode siloed` with
one expert per island (siloed needs no dataset), so that every island can hold a lease; a home
holds at most 4096 experts (the router's largest output), and islands beyond that ask for work
again at every beat, as `ddm-client join` does every retry_after_s until it gets a lease. SQLite
scenarios copy one home made beforehand; PostgreSQL scenarios create a fresh database, run
`init --database` into it and drop the database afterwards. Invite tokens are created in the
registry beforehand.

A load is a number of islands, heartbeats per island and a heartbeat cadence; --islands,
--heartbeats and --interval each take one value or one per load (a single value applies to
every load). Every load runs against every deployment and over every --transport.

The islands live in one or more separate load-generator processes (this script with --worker),
so that the generators' CPU is counted apart from the coordinator's. Each generator runs its
islands as asyncio tasks over grpc.aio with the generated stubs; each island has its own channel
and its own TCP connection (or, with --shared-channels K, K channels to each serve process, each
with its own connection, are shared by the islands), connects first, and then, when every
generator is ready, all islands start at once: Enroll with its token, AcquireLease, H heartbeats
(back to back, or one every --interval seconds from a random phase), ReleaseLease. Each call is
made once, without retries (with --retry N, Enroll, AcquireLease and ReleaseLease are retried on
RESOURCE_EXHAUSTED and UNAVAILABLE with jittered backoff); an island whose Enroll or AcquireLease
fails stops there, as `ddm-client join` would.

Heartbeat latencies are also split by when they were sent: during the enrollment storm (before
the last lease was granted) and in the steady state (after the last lease was granted and before
the first island released its lease, so that the releases' writes stay out of it).

Everything is bounded: the load phase of each scenario stops after --timeout seconds and the
figures gathered so far are reported, marked partial; starting a coordinator, getting the
generators connected and creating or dropping a database are bounded too. CPU time is counted
per side over the load phase: each serve process (psutil, sampled every 0.1 s with its RSS,
threads and open files), the generators (their own os.times), PostgreSQL (psutil over the
cluster's processes: the postmaster, its auxiliary processes and the backends of this scenario's
database, sampled every 0.5 s, so that a backend that ends meanwhile still counts up to its last
sample), this script itself, and the whole machine, so that what other processes used shows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this script belongs to, before any installed copy

import grpc  # noqa: E402

from bench.machine import describe, version  # noqa: E402
from protocol import auth, ddm_pb2_grpc  # noqa: E402
from protocol import ddm_pb2 as pb  # noqa: E402
from protocol.limits import CHANNEL_OPTIONS  # noqa: E402

NO_WORK = "AcquireLease, no work"  # an AcquireLease answered no_work (more islands than experts)
KINDS = ("connect", "Enroll", "AcquireLease", NO_WORK, "Heartbeat", "ReleaseLease")
STORM = "Heartbeat, before the last lease"  # rows of the report: heartbeats sent during the enrollment storm
STEADY = "Heartbeat, steady"  # ... and after the last lease was granted, before the first release
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
SAMPLE_EVERY_S = 0.1
SAMPLE_POSTGRES_EVERY_S = 0.5
TIMELINE_S = 10  # the report's heartbeat latencies over time: one row per this many seconds
PG_HOST = "/var/run/postgresql"
BACKENDS = ("sqlite", "postgresql")
TRANSPORTS = ("plaintext", "tls")


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "GRPC_VERBOSITY": "ERROR"}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the load generator (a separate process) ------------------------------------------------------


class Tally:
    """Latencies of successful calls and error codes, per RPC kind."""

    def __init__(self):
        self.latencies: dict[str, list[float]] = {k: [] for k in KINDS}
        self.errors: dict[str, Counter] = {k: Counter() for k in KINDS}
        self.error_seconds: dict[str, list[float]] = {k: [] for k in KINDS}  # how long failed calls took
        self.error_details: dict[str, str] = {}  # "kind code" -> the first message seen
        self.heartbeat_sent_at: list[float] = []  # wall clock, one per successful heartbeat
        self.leased_at: list[float] = []  # wall clock when each lease was granted
        self.release_sent_at: list[float] = []  # wall clock when each island first asked to release
        self.retries: Counter = Counter()
        self.outcomes: Counter = Counter()

    def to_json(self) -> dict:
        return {
            "latencies": self.latencies,
            "errors": {k: dict(v) for k, v in self.errors.items()},
            "error_seconds": self.error_seconds,
            "error_details": self.error_details,
            "heartbeat_sent_at": self.heartbeat_sent_at,
            "leased_at": self.leased_at,
            "release_sent_at": self.release_sent_at,
            "retries": dict(self.retries),
            "outcomes": dict(self.outcomes),
        }


async def call(tally: Tally, kind: str, rpc, request, spec: dict, metadata=(), retry: bool = False, kind_of=None):
    """One RPC (retried if asked); None when it failed, after counting the error. ``kind_of``
    names the latency's kind by the reply (an AcquireLease that found no work)."""
    attempts = 1 + (spec["retry"] if retry else 0)
    delay = 0.1
    for attempt in range(attempts):
        start, sent_at = time.perf_counter(), time.time()
        try:
            reply = await rpc(request, timeout=spec["rpc_timeout"], metadata=metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() in RETRYABLE and attempt < attempts - 1:
                tally.retries[kind] += 1
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
                continue
            tally.errors[kind][err.code().name] += 1
            tally.error_seconds[kind].append(time.perf_counter() - start)
            tally.error_details.setdefault(f"{kind} {err.code().name}", (err.details() or "")[:300])
            return None
        tally.latencies[kind if kind_of is None else kind_of(reply)].append(time.perf_counter() - start)
        if kind == "Heartbeat":
            tally.heartbeat_sent_at.append(sent_at)
        return reply
    return None


def lease_or_none(reply) -> str:
    return "AcquireLease" if reply.WhichOneof("result") == "lease" else NO_WORK


async def run_island(index: int, token: str, stub, spec: dict, tally: Tally) -> None:
    """Enroll, AcquireLease, then H calls at the cadence: a heartbeat while the island holds a
    lease, else (more islands than experts) AcquireLease again, as `ddm-client join` asks for
    work every retry_after_s (the heartbeat interval) until it gets some; then ReleaseLease."""
    stage = "enroll"
    try:
        reply = await call(
            tally, "Enroll", stub.Enroll, pb.EnrollRequest(token=token, name=f"load-{index}"), spec, (), True
        )
        if reply is None:
            tally.outcomes["enroll failed"] += 1
            return
        metadata = auth.metadata(reply.credential)
        stage = "lease"
        acquire = pb.AcquireLeaseRequest()
        reply = await call(tally, "AcquireLease", stub.AcquireLease, acquire, spec, metadata, True, lease_or_none)
        if reply is None:
            tally.outcomes["lease failed"] += 1
            return
        lease_id, beat, polls_failed = None, 0, 0
        if reply.WhichOneof("result") == "lease":
            lease_id = reply.lease.lease_id
            tally.leased_at.append(time.time())
        elif reply.no_work.finished:
            tally.outcomes["no work: every expert signed"] += 1
            return
        stage = "heartbeat"
        interval = spec["interval"]
        next_call = time.monotonic() + (random.uniform(0, interval) if interval > 0 else 0.0)
        beats_ok = 0
        for _ in range(spec["heartbeats"]):
            if interval > 0:
                await asyncio.sleep(max(0.0, next_call - time.monotonic()))
                next_call += interval
            if lease_id is None:
                reply = await call(
                    tally, "AcquireLease", stub.AcquireLease, acquire, spec, metadata, False, lease_or_none
                )
                polls_failed += reply is None
                if reply is not None and reply.WhichOneof("result") == "lease":
                    lease_id = reply.lease.lease_id
                    tally.leased_at.append(time.time())
                continue
            beat += 1
            request = pb.HeartbeatRequest(lease_id=lease_id, step=beat, loss=0.5, images_per_second=100.0)
            beats_ok += await call(tally, "Heartbeat", stub.Heartbeat, request, spec, metadata) is not None
        if lease_id is None:
            tally.outcomes["no work, asked again at every beat" + (", some asks failed" if polls_failed else "")] += 1
            return
        stage = "release"
        tally.release_sent_at.append(time.time())
        request = pb.ReleaseLeaseRequest(lease_id=lease_id, reason="load bench: done")
        released = await call(tally, "ReleaseLease", stub.ReleaseLease, request, spec, metadata, True)
        if released is None:
            tally.outcomes["release failed"] += 1
        elif beats_ok < spec["heartbeats"]:
            tally.outcomes[
                "finished, some heartbeats failed" if beats_ok < beat else "finished, leased after asking again"
            ] += 1
        else:
            tally.outcomes["finished"] += 1
    except asyncio.CancelledError:
        tally.outcomes[f"cut by the timeout ({stage})"] += 1
        raise


def make_channel(spec: dict, address: str) -> grpc.aio.Channel:
    # Channels with equal settings share one connection by default; a real island is a process
    # of its own with a connection of its own, and each shared channel stands for a connection too.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if spec["tls_ca"]:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(spec["tls_ca"]).read_bytes())
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


async def connect(channel: grpc.aio.Channel, tally: Tally, timeout: float) -> None:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        tally.errors["connect"]["DEADLINE_EXCEEDED"] += 1
        return
    tally.latencies["connect"].append(time.perf_counter() - start)


async def generate(spec: dict) -> dict:
    tally = Tally()
    tokens, addresses, first = spec["tokens"], spec["addresses"], spec["first_index"]
    shared, n = spec["shared_channels"], len(addresses)
    # Island number g (counted over every generator) talks to serve process g mod n.
    if shared:
        pools = [[make_channel(spec, a) for _ in range(shared)] for a in addresses]
        channels = [c for pool in pools for c in pool]
        island_channels = [pools[(first + i) % n][((first + i) // n) % shared] for i in range(len(tokens))]
    else:
        channels = island_channels = [make_channel(spec, addresses[(first + i) % n]) for i in range(len(tokens))]
    # Connect every channel first (for TLS this includes the handshake), then wait for "go".
    await asyncio.gather(*(connect(c, tally, spec["rpc_timeout"]) for c in channels))
    stubs = {id(c): ddm_pb2_grpc.CoordinatorStub(c) for c in channels}
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu0, go = os.times(), time.time()
    tasks = [
        asyncio.create_task(run_island(first + i, token, stubs[id(island_channels[i])], spec, tally))
        for i, token in enumerate(tokens)
    ]
    remaining = spec["deadline"] - time.time()
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end, cpu1 = time.time(), os.times()
    for task in done:
        if task.exception() is not None:
            tally.outcomes[f"bench error: {task.exception()!r}"[:200]] += 1
    await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    return {
        **tally.to_json(),
        "go": go,
        "end": end,
        "timed_out": bool(pending),
        "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "channels": len(channels),
    }


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    raise_fd_limit()
    result = asyncio.run(generate(spec))
    Path(spec["result"]).write_text(json.dumps(result))
    print("done", flush=True)


# -- the coordinator and the scenario (this process) ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """The coordinator's own self-signed TLS certificate and key, as PEM files in ``folder``."""
    from coordinator.tls import make_certificate

    cert_pem, key_pem = make_certificate()
    cert_path, key_path = folder / "tls-cert.pem", folder / "tls-key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path


def coordinator_cli(*args: str) -> list[str]:
    """Run with cwd=REPO: `python -m` puts the working folder first on the path."""
    return [sys.executable, "-m", "coordinator.cli", *args]


def init_home(home: Path, experts: int, database_url: str = "") -> float:
    """`ddm-coordinator init --mode siloed` with ``experts`` experts (on ``database_url`` if given);
    returns its wall time."""
    command = coordinator_cli(
        "init", "--home", str(home), "--mode", "siloed", "--image-size", "8", "--channels", "1",
        "--experts", str(experts), "--preset", "tiny",
    )  # fmt: skip
    if database_url:
        command += ["--database", database_url]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: ddm-coordinator init failed: {done.stderr.strip().splitlines()[-1:]}")
    return took


def create_invites(home: Path, count: int) -> tuple[list[str], float]:
    from coordinator.home import Home
    from coordinator.registry import Registry

    h = Home(home)
    registry = Registry(h.database_url(h.load_config()))
    start = time.perf_counter()
    tokens = [registry.create_invite("island", 3600) for _ in range(count)]
    took = time.perf_counter() - start
    registry.close()
    return tokens, took


def serve_has_no_tls_flag() -> bool:
    """Whether `serve` speaks TLS unless told --no-tls (then plaintext runs must say so)."""
    done = subprocess.run(
        coordinator_cli("serve", "--help"),
        capture_output=True,
        text=True,
        env={**child_env(), "COLUMNS": "200"},
        cwd=REPO,
        timeout=120,
    )
    return "--no-tls" in done.stdout


# -- PostgreSQL: a fresh database per scenario, and the CPU its processes use ---------------------


def pg_url(database: str, host: str) -> str:
    return f"postgresql+psycopg:///{database}?host={host}"


def pg_connect(host: str, database: str = "postgres"):
    import psycopg

    return psycopg.connect(dbname=database, host=host, autocommit=True, connect_timeout=5)


def create_database(host: str) -> str:
    name = f"ddm_load_{uuid.uuid4().hex[:12]}"
    with pg_connect(host) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(host: str, name: str) -> None:
    with pg_connect(host) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_version(host: str) -> str:
    try:
        with pg_connect(host) as conn:
            return conn.execute("SHOW server_version").fetchone()[0].split()[0]
    except Exception as exc:  # the report says so rather than stopping
        return f"unreachable ({type(exc).__name__})"


# The cluster's own processes, shared by every database (their titles after "postgres: 15/main: ").
POSTGRES_AUXILIARY = (
    "checkpointer", "background writer", "walwriter", "autovacuum launcher", "logical replication launcher",
    "stats collector", "archiver", "startup",
)  # fmt: skip


def serves_database(cmdline: list[str], database: str) -> bool:
    """Whether a process named postgres works for ``database``: the postmaster, an auxiliary
    process, or a backend (or autovacuum worker) of that database; not other databases' backends."""
    title = " ".join(cmdline)
    if not title.startswith("postgres:"):
        return True  # the postmaster: /usr/lib/postgresql/15/bin/postgres -D ...
    if any(f": {name}" in title for name in POSTGRES_AUXILIARY):
        return True
    return f" {database} " in f"{title} "


def cpu_of(times) -> float:
    return times.user + times.system


class Sampler(threading.Thread):
    """Samples the serve processes' RSS, threads, open files and CPU time every SAMPLE_EVERY_S
    and, given a PostgreSQL database, the CPU time of the cluster's processes that serve it every
    SAMPLE_POSTGRES_EVERY_S. ``mark`` starts the CPU count of the load phase."""

    def __init__(self, pids: list[int], database: str | None = None):
        import psutil

        super().__init__(name="sampler", daemon=True)
        self.processes = [psutil.Process(pid) for pid in pids]
        n = len(pids)
        self.peak_rss, self.peak_threads, self.peak_fds = [0] * n, [0] * n, [0] * n
        self.cpu, self.cpu_mark = [0.0] * n, [0.0] * n
        self.database = database
        self.pg_cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds last seen
        self.pg_mark: dict[tuple[int, float], float] = {}
        self.pg_backends_peak = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._pg_sampled = float("-inf")

    def sample(self) -> None:
        import psutil

        with self._lock:
            for i, process in enumerate(self.processes):
                try:
                    with process.oneshot():
                        self.peak_rss[i] = max(self.peak_rss[i], process.memory_info().rss)
                        self.peak_threads[i] = max(self.peak_threads[i], process.num_threads())
                        self.peak_fds[i] = max(self.peak_fds[i], process.num_fds())
                        self.cpu[i] = cpu_of(process.cpu_times())
                except psutil.Error:
                    pass  # it ended; its last sample stands
            if self.database is not None and time.monotonic() - self._pg_sampled >= SAMPLE_POSTGRES_EVERY_S:
                self._pg_sampled = time.monotonic()
                self.sample_postgres()

    def sample_postgres(self) -> None:
        import psutil

        backends = 0
        for p in psutil.process_iter(["name", "cmdline", "create_time", "cpu_times"]):
            info = p.info
            if info["name"] != "postgres" or not info["cmdline"] or info["cpu_times"] is None:
                continue
            if serves_database(info["cmdline"], self.database):
                self.pg_cpu[(p.pid, info["create_time"])] = cpu_of(info["cpu_times"])
                backends += f" {self.database} " in (" ".join(info["cmdline"]) + " ")
        self.pg_backends_peak = max(self.pg_backends_peak, backends)

    def mark(self) -> None:
        self._pg_sampled = float("-inf")
        self.sample()
        with self._lock:
            self.cpu_mark = list(self.cpu)
            self.pg_mark = dict(self.pg_cpu)

    def cpu_since_mark(self) -> list[float]:
        with self._lock:
            return [now - then for now, then in zip(self.cpu, self.cpu_mark, strict=True)]

    def postgres_cpu_since_mark(self) -> float:
        with self._lock:
            return sum(cpu - self.pg_mark.get(key, 0.0) for key, cpu in self.pg_cpu.items())

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._pg_sampled = float("-inf")
        self.sample()
        self._halt.set()
        self.join()


def busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()._asdict()
    # guest time is already counted in user time; idle and iowait are not work
    return sum(v for k, v in t.items() if k not in ("idle", "iowait", "guest", "guest_nice"))


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """The next line from a child's stdout, or '' if it ends or the deadline passes."""
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            return ""
    return ""


def scenario_name(load: dict, deployment: dict, several_loads: bool) -> str:
    name = f"{deployment['name']} {load['transport']} {load['interval']:g}s"
    return f"{name} {load['islands']}i" if several_loads else name


def run_scenario(args, work: Path, load: dict, deployment: dict, template: Path | None, name: str) -> dict:
    """One load against one deployment: a fresh home (and database), invites, the serve
    processes, the generators, the figures. The database is dropped however it ends."""
    folder = work / name.replace(" ", "_").replace("×", "x")
    folder.mkdir(parents=True)
    home = folder / "home"
    database, init_s = None, None
    try:
        if deployment["backend"] == "sqlite":
            shutil.copytree(template, home)
        else:
            database = create_database(args.pg_host)
            init_s = init_home(home, load["experts"], pg_url(database, args.pg_host))
        tokens, invite_s = create_invites(home, load["islands"])
        scenario = serve_and_load(args, folder, home, tokens, load, deployment, database)
        scenario.update(
            name=name, load=load, deployment=deployment, database=database, init_s=init_s, invite_s=invite_s
        )
        scenario["registry"] = registry_counts(home, load["heartbeats"])
        return scenario
    finally:
        if database is not None:
            drop_database(args.pg_host, database)


def wait_or_kill(proc: subprocess.Popen, since: float) -> tuple[int, float]:
    """Wait for a process already sent SIGTERM (once: a second signal would interrupt its shutdown),
    killing it after 30 s; its exit status and the seconds it took to stop."""
    try:
        proc.wait(timeout=max(0.0, since + 30 - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, time.monotonic() - since


def serve_and_load(args, folder: Path, home: Path, tokens: list[str], load: dict, deployment: dict, database) -> dict:
    tls = load["transport"] == "tls"
    ca = key = None
    if tls:
        ca, key = self_signed_certificate(folder)
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(deployment["processes"])]
    serves: list[subprocess.Popen] = []
    log_paths = [folder / f"coordinator-{p}.log" for p in range(len(addresses))]
    generators: list[subprocess.Popen] = []
    stopped: list[tuple[int, float]] = []
    try:
        for address, log_path in zip(addresses, log_paths, strict=True):
            command = coordinator_cli("serve", "--home", str(home), "--listen", address)
            if tls:
                command += ["--tls-cert", str(ca), "--tls-key", str(key)]
            elif args.no_tls_flag:
                command.append("--no-tls")
            with open(log_path, "w") as log:
                serves.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
                )
        for address, serve, log_path in zip(addresses, serves, log_paths, strict=True):
            wait_ready(address, ca, serve, log_path)
        sampler = Sampler([s.pid for s in serves], database)
        sampler.start()
        time.sleep(0.5)
        rss_idle = list(sampler.peak_rss)
        share = math.ceil(load["islands"] / args.generators)
        start = time.time()
        for g in range(args.generators):
            part = tokens[g * share : (g + 1) * share]
            spec = {
                "addresses": addresses,
                "tls_ca": str(ca) if ca else None,
                "tokens": part,
                "first_index": g * share,
                "heartbeats": load["heartbeats"],
                "interval": load["interval"],
                "retry": args.retry,
                "shared_channels": args.shared_channels,
                "rpc_timeout": args.rpc_timeout,
                "deadline": start + args.timeout,
                "result": str(folder / f"generator-{g}.json"),
            }
            spec_path = folder / f"generator-{g}.spec.json"
            spec_path.write_text(json.dumps(spec))
            with open(folder / f"generator-{g}.log", "w") as err:
                generators.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        env=child_env(),
                    )
                )
        hard_deadline = start + args.timeout + 60
        for g, proc in enumerate(generators):
            if read_line(proc, hard_deadline) != "ready":
                sys.exit(f"error: load generator {g} did not get ready; see {folder / f'generator-{g}.log'}")
        connected_s = time.time() - start
        sampler.mark()
        busy0, load0, own0 = busy_cpu_seconds(), os.getloadavg(), os.times()
        for proc in generators:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in generators:
            read_line(proc, hard_deadline)
        for proc in generators:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        sampler.stop()
        own1 = os.times()
        serve_cpu, busy = sampler.cpu_since_mark(), busy_cpu_seconds() - busy0
        postgres_cpu = sampler.postgres_cpu_since_mark() if database else None
    finally:
        for proc in generators:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        since = time.monotonic()
        for serve in serves:
            if serve.poll() is None:
                serve.terminate()
        stopped = [wait_or_kill(serve, since) for serve in serves]
    results = []
    for g in range(len(generators)):
        path = folder / f"generator-{g}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        sys.exit(f"error: no load generator reported; see the logs in {folder}")
    logs = [p.read_text(errors="replace") for p in log_paths]
    processes = [
        {
            "rss_idle": rss_idle[i],
            "rss_peak": sampler.peak_rss[i],
            "threads_peak": sampler.peak_threads[i],
            "fds_peak": sampler.peak_fds[i],
            "cpu_s": serve_cpu[i],
            "warnings": logs[i].count(" WARNING "),
            "errors": logs[i].count(" ERROR "),
            "exit": stopped[i][0],
            "stop_s": stopped[i][1],
        }
        for i in range(len(serves))
    ]
    return {
        "tls": tls,
        "interval": load["interval"],
        "addresses": addresses,
        "connect_phase_s": connected_s,
        "results": results,
        "coordinators": processes,
        "coordinator": {  # every serve process together: CPU and log lines summed, peaks the largest
            "rss_idle": max(p["rss_idle"] for p in processes),
            "rss_peak": max(p["rss_peak"] for p in processes),
            "threads_peak": max(p["threads_peak"] for p in processes),
            "fds_peak": max(p["fds_peak"] for p in processes),
            "cpu_s": sum(serve_cpu),
            "warnings": sum(p["warnings"] for p in processes),
            "errors": sum(p["errors"] for p in processes),
        },
        "postgres": None if database is None else {"cpu_s": postgres_cpu, "backends_peak": sampler.pg_backends_peak},
        "bench_cpu_s": (own1.user + own1.system) - (own0.user + own0.system),
        "machine_busy_cpu_s": busy,
        "load_at_go": load0,
        "generators_missing": len(generators) - len(results),
    }


def wait_ready(address: str, ca: Path | None, serve: subprocess.Popen, log_path: Path) -> None:
    if ca is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()))
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
    except grpc.FutureTimeoutError:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        sys.exit(f"error: the coordinator did not come up on {address} (exit {serve.poll()}): {tail}")
    finally:
        channel.close()


def registry_counts(home: Path, heartbeats: int) -> dict:
    """What the registry holds after the run (SQLite file or PostgreSQL database alike).
    ``last_step_written``: experts whose progress shows the islands' last heartbeat (step H),
    which reaches the database only through the buffered heartbeats' flush."""
    from sqlalchemy import create_engine, text

    from coordinator.home import Home

    h = Home(home)
    engine = create_engine(h.database_url(h.load_config()))
    try:
        with engine.connect() as db:
            count = lambda sql: db.execute(text(sql)).scalar_one()  # noqa: E731
            return {
                "islands": count("SELECT COUNT(*) FROM islands"),
                "invites_used": count("SELECT COUNT(*) FROM invites WHERE used_at IS NOT NULL"),
                "leases": count("SELECT COUNT(*) FROM leases"),
                "leases_released": count("SELECT COUNT(*) FROM leases WHERE state = 'released'"),
                "leases_active": count("SELECT COUNT(*) FROM leases WHERE state = 'active'"),
                "heartbeats_counted": count("SELECT COALESCE(SUM(heartbeats), 0) FROM islands"),
                "events": count("SELECT COUNT(*) FROM events"),
                "last_step_written": db.execute(
                    text("SELECT COUNT(*) FROM experts WHERE step = :step"), {"step": heartbeats}
                ).scalar_one(),
            }
    finally:
        engine.dispose()


# -- figures and the report -----------------------------------------------------------------------


def kind_figures(latencies: list[float], errors=None, error_seconds=(), retries=0) -> dict:
    return {
        "count": len(latencies),
        "errors": dict(errors or {}),
        "error_seconds": list(error_seconds),
        "retries": retries,
        "latencies": latencies,
    }


def summarize(scenario: dict) -> dict:
    results = scenario["results"]
    kinds = {}
    for kind in KINDS:
        errors: Counter = Counter()
        for r in results:
            errors.update(r["errors"][kind])
        failed = [x for r in results for x in r["error_seconds"][kind]]
        kinds[kind] = kind_figures(
            sorted(x for r in results for x in r["latencies"][kind]),
            errors,
            [min(failed), max(failed)] if failed else [],
            sum(r["retries"].get(kind, 0) for r in results),
        )
    outcomes: Counter = Counter()
    details: dict[str, str] = {}
    for r in results:
        outcomes.update(r["outcomes"])
        for key, message in r["error_details"].items():
            details.setdefault(key, message)
    go = min(r["go"] for r in results)
    wall = max(r["end"] for r in results) - go
    rpcs = sum(kinds[k]["count"] for k in KINDS if k != "connect")
    # The enrollment storm ends when the last lease is granted; the steady state lasts from
    # then until the first island asks to release its lease.
    # With more islands than experts, the storm ends when every expert is leased; leases granted
    # later go to islands that asked again after others released.
    leased = sorted(t for r in results for t in r["leased_at"])
    all_leased = leased[min(len(leased), scenario["load"]["experts"]) - 1] if leased else None
    releases = [t for r in results for t in r["release_sent_at"]]
    first_release = min(releases) if releases else max(r["end"] for r in results)
    beats = [
        (sent, lat)
        for r in results
        for sent, lat in zip(r["heartbeat_sent_at"], r["latencies"]["Heartbeat"], strict=True)
    ]
    storm = sorted(lat for sent, lat in beats if all_leased is None or sent <= all_leased)
    steady = sorted(lat for sent, lat in beats if all_leased is not None and all_leased < sent < first_release)
    timeline: dict[int, list[float]] = {}  # heartbeat latencies by TIMELINE_S slice of the load phase
    for sent, lat in beats:
        timeline.setdefault(int((sent - go) // TIMELINE_S), []).append(lat)
    kinds[STORM] = kind_figures(storm)
    kinds[STEADY] = kind_figures(steady)
    steady_s = max(0.0, first_release - all_leased) if all_leased is not None else 0.0
    return {
        "all_leased_s": None if all_leased is None else all_leased - go,
        "first_release_s": first_release - go,
        "heartbeat_timeline": [
            [slot * TIMELINE_S, len(lat), percentile(sorted(lat), 0.5), percentile(sorted(lat), 0.99)]
            for slot, lat in sorted(timeline.items())
        ],
        "steady_s": steady_s,
        "steady_heartbeats_per_s": len(steady) / steady_s if steady_s > 0 else 0.0,
        "leases": len(leased),
        "experts": scenario["load"]["experts"],
        "kinds": kinds,
        "outcomes": dict(outcomes),
        "error_details": details,
        "wall_s": wall,
        "rpcs": rpcs,
        "rpc_per_s": rpcs / wall if wall > 0 else 0.0,
        "heartbeats_per_s": kinds["Heartbeat"]["count"] / wall if wall > 0 else 0.0,
        "errors": sum(sum(kinds[k]["errors"].values()) for k in KINDS),
        "timed_out": any(r["timed_out"] for r in results) or scenario["generators_missing"] > 0,
        "generator_cpu_s": sum(r["cpu_s"] for r in results),
        "generator_rss_peak": max(r["max_rss_bytes"] for r in results),
        "channels": sum(r["channels"] for r in results),
    }


def ms(x: float) -> str:
    return f"{x * 1e3:,.1f}"


def p50_p99(m: dict, kind: str) -> str:
    lat = m["kinds"][kind]["latencies"]
    return " / ".join(ms(percentile(lat, q)) for q in (0.5, 0.99)) if lat else "-"


def kind_rows(summary: dict) -> list[list[str]]:
    rows = []
    for kind in (*KINDS, STORM, STEADY):
        k = summary["kinds"][kind]
        lat = k["latencies"]
        errors = ", ".join(f"{code} {n}" for code, n in sorted(k["errors"].items())) or "0"
        if k["error_seconds"]:
            errors += " (after {:.1f} to {:.1f} s)".format(*k["error_seconds"])
        figures = [ms(percentile(lat, q)) for q in (0.5, 0.9, 0.99)] + [ms(lat[-1])] if lat else ["-"] * 4
        rows.append([kind, str(k["count"]), errors, str(k["retries"]), *figures])
    return rows


KIND_HEADER = ["RPC", "ok", "errors", "retries", "p50 ms", "p90 ms", "p99 ms", "max ms"]
MiB = 1024 * 1024


def cores() -> int:
    return os.cpu_count() or 1


def cpu_split(s: dict) -> dict:
    """CPU seconds of each side over the load phase, and what the machine had: cores x wall."""
    m = s["summary"]
    serve, generators = s["coordinator"]["cpu_s"], m["generator_cpu_s"]
    postgres = s["postgres"]["cpu_s"] if s["postgres"] else 0.0
    bench, busy = s["bench_cpu_s"], s["machine_busy_cpu_s"]
    return {
        "serve": serve,
        "generators": generators,
        "postgres": postgres,
        "bench": bench,
        "other": max(0.0, busy - serve - generators - postgres - bench),
        "busy": busy,
        "capacity": cores() * m["wall_s"],
    }


def serve_cpu_cell(s: dict) -> str:
    per = [p["cpu_s"] for p in s["coordinators"]]
    total = f"{sum(per):.1f}"
    return total if len(per) == 1 else f"{total} ({' + '.join(f'{x:.1f}' for x in per)})"


def load_label(load: dict) -> str:
    cadence = "back to back" if load["interval"] == 0 else f"every {load['interval']:g} s"
    experts = "" if load["experts"] == load["islands"] else f" ({load['experts']} experts)"
    return f"{load['islands']} islands{experts}, {load['heartbeats']} heartbeats {cadence}, {load['transport']}"


HEADLINE = [
    "load", "deployment", "finished / islands", "errors", "calls/s", "heartbeats/s",
    "Heartbeat p50 / p99 ms, steady", "Heartbeat p50 / p99 ms, storm", "all leased after, s",
    "serve CPU s (per process)", "generators CPU s", "PostgreSQL CPU s", "machine busy CPU s / cores x wall",
]  # fmt: skip


def headline_rows(scenarios: list[dict]) -> list[list[str]]:
    rows = []
    for s in scenarios:
        m, cpu = s["summary"], cpu_split(s)
        rows.append(
            [
                load_label(s["load"]),
                s["deployment"]["name"],
                f"{m['outcomes'].get('finished', 0)} / {s['load']['islands']}"
                + (" (partial)" if m["timed_out"] else ""),
                str(m["errors"]),
                f"{m['rpc_per_s']:,.0f}",
                f"{m['heartbeats_per_s']:,.0f}",
                p50_p99(m, STEADY),
                p50_p99(m, STORM),
                "-" if m["all_leased_s"] is None else f"{m['all_leased_s']:.1f}",
                serve_cpu_cell(s),
                f"{m['generator_cpu_s']:.1f}",
                "-" if s["postgres"] is None else f"{cpu['postgres']:.1f}",
                f"{cpu['busy']:.1f} / {cpu['capacity']:.1f} ({cpu['busy'] / max(cpu['capacity'], 1e-9):.0%})",
            ]
        )
    return rows


def summary_rows(scenarios: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["figure", *(s["name"] for s in scenarios)]

    def row(label, fn):
        return [label, *(fn(s, s["summary"]) for s in scenarios)]

    def per_process(s, fmt):
        return ", ".join(fmt(p) for p in s["coordinators"])

    rows = [
        row("islands finished (all heartbeats ok)", lambda s, m: str(m["outcomes"].get("finished", 0))),
        row("other outcomes", lambda s, m: "; ".join(f"{k}: {v}" for k, v in m["outcomes"].items() if k != "finished")
            or "none"),
        row("partial (timeout hit)", lambda s, m: "yes" if m["timed_out"] else "no"),
        row("wall time of the load phase, s", lambda s, m: f"{m['wall_s']:.1f}"),
        row("every lease granted after, s", lambda s, m: "-" if m["all_leased_s"] is None
            else f"{m['all_leased_s']:.1f} ({m['leases']} leases)"),
        row("first release asked for after, s", lambda s, m: f"{m['first_release_s']:.1f}"),
        row("steady state: from last lease to first release, s", lambda s, m: f"{m['steady_s']:.1f}"),
        row(f"{STEADY}: p50 / p99 ms", lambda s, m: p50_p99(m, STEADY)),
        row("heartbeats per second, steady", lambda s, m: f"{m['steady_heartbeats_per_s']:,.0f}"),
        row(f"{STORM}: p50 / p99 ms", lambda s, m: p50_p99(m, STORM)),
        row("RPCs ok", lambda s, m: f"{m['rpcs']:,}"),
        row("RPCs per second", lambda s, m: f"{m['rpc_per_s']:,.0f}"),
        row("heartbeats per second", lambda s, m: f"{m['heartbeats_per_s']:,.0f}"),
        row("errors (all kinds)", lambda s, m: str(m["errors"])),
        row("Heartbeat p50 / p99 ms", lambda s, m: p50_p99(m, "Heartbeat")),
        row("Enroll p50 / p99 ms", lambda s, m: p50_p99(m, "Enroll")),
        row("AcquireLease p50 / p99 ms", lambda s, m: p50_p99(m, "AcquireLease")),
        row("generators started, every channel connected, s", lambda s, m: f"{s['connect_phase_s']:.1f}"),
        row("serve processes", lambda s, m: str(len(s["coordinators"]))),
        row("serve RSS idle -> peak, MiB (per process)", lambda s, m: per_process(
            s, lambda p: f"{p['rss_idle'] / MiB:.0f} -> {p['rss_peak'] / MiB:.0f}")),
        row("serve CPU s (per process)", lambda s, m: serve_cpu_cell(s)),
        row("serve CPU, share of one core", lambda s, m: f"{s['coordinator']['cpu_s'] / max(m['wall_s'], 1e-9):.0%}"),
        row("serve peak threads / open files (per process)", lambda s, m: per_process(
            s, lambda p: f"{p['threads_peak']} / {p['fds_peak']}")),
        row("serve log warnings / errors", lambda s, m:
            f"{s['coordinator']['warnings']} / {s['coordinator']['errors']}"),
        row("serve exit status after SIGTERM (seconds to stop)", lambda s, m: per_process(
            s, lambda p: f"{p.get('exit', '-')} ({p.get('stop_s', 0):.1f})")),
        row("generator CPU s (of wall)", lambda s, m:
            f"{m['generator_cpu_s']:.1f} ({m['generator_cpu_s'] / max(m['wall_s'], 1e-9):.0%})"),
        row("generator peak RSS, MiB", lambda s, m: f"{m['generator_rss_peak'] / MiB:.0f}"),
        row("generator channels (connections)", lambda s, m: f"{m['channels']:,}"),
        row("PostgreSQL CPU s (of wall)", lambda s, m: "-" if s["postgres"] is None else
            f"{s['postgres']['cpu_s']:.1f} ({s['postgres']['cpu_s'] / max(m['wall_s'], 1e-9):.0%})"),
        row("PostgreSQL backends of this database, peak", lambda s, m: "-" if s["postgres"] is None else
            str(s["postgres"]["backends_peak"])),
        row("this script's own CPU s (sampling)", lambda s, m: f"{s['bench_cpu_s']:.1f}"),
        row("CPU s used by everything else on the machine", lambda s, m: f"{cpu_split(s)['other']:.1f}"),
        row("machine busy CPU s / cores x wall", lambda s, m: "{busy:.1f} / {capacity:.1f}".format(**cpu_split(s))),
        row("load average at go (1/5/15 min)", lambda s, m: " ".join(f"{x:.2f}" for x in s["load_at_go"])),
        row("registry after: islands / leases released / active", lambda s, m:
            f"{s['registry']['islands']} / {s['registry']['leases_released']} / {s['registry']['leases_active']}"),
        row("registry after: heartbeats counted / events", lambda s, m:
            f"{s['registry']['heartbeats_counted']:,} / {s['registry']['events']:,}"),
        row("registry after: experts showing the last heartbeat's step", lambda s, m:
            f"{s['registry']['last_step_written']:,}"),
        row("init with one expert per island, s", lambda s, m: "copied" if s["init_s"] is None
            else f"{s['init_s']:.1f}"),
        row("invites created (one transaction each), s", lambda s, m: f"{s['invite_s']:.1f}"),
    ]  # fmt: skip
    return header, rows


def timeline_rows(scenarios: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Heartbeats by when they were sent (TIMELINE_S slices from go): how many, p50 / p99 ms;
    the slices holding the last lease and the first release are marked."""
    header = ["sent at, s", *(s["name"] for s in scenarios)]
    cells: dict[int, dict[int, str]] = {}
    for i, s in enumerate(scenarios):
        m = s["summary"]
        for start, count, p50, p99 in m["heartbeat_timeline"]:
            marks = [
                label
                for label, at in (("last lease", m["all_leased_s"]), ("first release", m["first_release_s"]))
                if at is not None and start <= at < start + TIMELINE_S
            ]
            note = f" ({', '.join(marks)})" if marks else ""
            cells.setdefault(start, {})[i] = f"{count}: {ms(p50)} / {ms(p99)}{note}"
    rows = [
        [f"{start}-{start + TIMELINE_S}", *(cells[start].get(i, "") for i in range(len(scenarios)))]
        for start in sorted(cells)
    ]
    return header, rows


def same_load(a: dict, b: dict) -> bool:
    return a["load"] == b["load"]


def ratio_lines(scenarios: list[dict]) -> list[str]:
    """Each deployment against the first one (the baseline) under the same load, and TLS
    against plaintext for the same deployment and cadence."""
    lines = []

    def p(m, kind, q):
        lat = m["kinds"][kind]["latencies"]
        return percentile(lat, q) if lat else float("nan")

    def cells(pairs):
        return ", ".join(f"{label} {y / x:.2f}x" for label, x, y in pairs if x and x == x and y == y)

    for s in scenarios:
        base = next(b for b in scenarios if same_load(b, s))
        if base is s:
            continue
        a, b = base["summary"], s["summary"]
        pairs = [
            ("calls/s", a["rpc_per_s"], b["rpc_per_s"]),
            ("heartbeats/s", a["heartbeats_per_s"], b["heartbeats_per_s"]),
            ("steady Heartbeat p50", p(a, STEADY, 0.5), p(b, STEADY, 0.5)),
            ("steady Heartbeat p99", p(a, STEADY, 0.99), p(b, STEADY, 0.99)),
            ("storm Heartbeat p99", p(a, STORM, 0.99), p(b, STORM, 0.99)),
            ("all leased after", a["all_leased_s"], b["all_leased_s"]),
            ("serve CPU", base["coordinator"]["cpu_s"], s["coordinator"]["cpu_s"]),
        ]
        lines.append(
            f"{load_label(s['load'])}: {s['deployment']['name']} / {base['deployment']['name']}: {cells(pairs)}."
        )
    for tls in (s for s in scenarios if s["tls"]):
        plain = next(
            (
                s
                for s in scenarios
                if not s["tls"]
                and s["deployment"] == tls["deployment"]
                and {**s["load"], "transport": "tls"} == tls["load"]
            ),
            None,
        )
        if plain is None:
            continue
        a, b = plain["summary"], tls["summary"]
        pairs = [
            ("wall time", a["wall_s"], b["wall_s"]),
            ("RPCs per second", a["rpc_per_s"], b["rpc_per_s"]),
            ("connect p50", p(a, "connect", 0.5), p(b, "connect", 0.5)),
            ("Heartbeat p50", p(a, "Heartbeat", 0.5), p(b, "Heartbeat", 0.5)),
            ("Heartbeat p99", p(a, "Heartbeat", 0.99), p(b, "Heartbeat", 0.99)),
            ("coordinator CPU", plain["coordinator"]["cpu_s"], tls["coordinator"]["cpu_s"]),
            ("coordinator peak RSS", plain["coordinator"]["rss_peak"], tls["coordinator"]["rss_peak"]),
            ("generator CPU", a["generator_cpu_s"], b["generator_cpu_s"]),
        ]
        lines.append(
            f"TLS / plaintext, {tls['deployment']['name']}, interval {tls['interval']:g} s, "
            f"{tls['load']['islands']} islands: {cells(pairs)}."
        )
    return lines


def cpu_lines(scenarios: list[dict]) -> list[str]:
    """How the machine's cores were shared during each load phase."""
    lines = []
    for s in scenarios:
        c = cpu_split(s)
        capacity = max(c["capacity"], 1e-9)

        def share(x: float, capacity: float = capacity) -> str:
            return f"{x / capacity:.0%}"

        lines.append(
            f"- {s['name']}: of {cores()} cores x {s['summary']['wall_s']:.1f} s = {c['capacity']:.1f} CPU s, "
            f"serve {c['serve']:.1f} ({share(c['serve'])}), generators {c['generators']:.1f} "
            f"({share(c['generators'])}), PostgreSQL {c['postgres']:.1f} ({share(c['postgres'])}), "
            f"this script {c['bench']:.1f} ({share(c['bench'])}), everything else {c['other']:.1f} "
            f"({share(c['other'])}), idle {max(0.0, c['capacity'] - c['busy']):.1f} "
            f"({share(max(0.0, c['capacity'] - c['busy']))})."
        )
    return lines


def machine(pg_host: str | None) -> dict:
    import psutil

    software = (
        f"Python {platform.python_version()}, torch {version('torch')}, grpcio {grpc.__version__}, "
        f"SQLAlchemy {version('sqlalchemy')}, SQLite {sqlite3.sqlite_version}, psutil {psutil.__version__}"
    )
    if pg_host is not None:
        software += f", PostgreSQL {postgres_version(pg_host)}, psycopg {version('psycopg')}"
    return describe(software)


def table_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def method_text(args, deployments: list[dict]) -> str:
    if args.shared_channels:
        channels = (
            f"over {args.shared_channels} channels to each serve process, each its own TCP connection, shared by "
            "the islands (fewer connections than a deployment would hold: the serve processes see fewer TLS "
            "sessions and more calls per connection)"
        )
    else:
        channels = (
            "with one channel and one TCP connection per island, so that each serve process holds its islands' "
            "connections (TLS sessions included) as it would in a deployment"
        )
    generators = (
        "so that no one Python event loop has to keep up with every island's calls"
        if args.generators > 1
        else "all in one process"
    )
    retries = (
        f"Enroll, AcquireLease and ReleaseLease are retried up to {args.retry} times on RESOURCE_EXHAUSTED "
        "or UNAVAILABLE; heartbeats never."
        if args.retry
        else "No call is retried."
    )
    sentences = [
        f"Deployments: {', '.join(d['name'] for d in deployments)}. SQLite is one `ddm-coordinator serve` "
        "process; 'postgresql×N' is N serve processes on one home and one PostgreSQL database (created fresh "
        f"for the scenario over {args.pg_host} and dropped after), each on its own port of 127.0.0.1, island i "
        "talking to port i mod N (N processes behind a TCP load balancer, without the balancer).",
        "Each scenario has a fresh `init --mode siloed --preset tiny` home with one expert per island (at most "
        "4096, the most a home may have; islands beyond that ask for work again at each beat, as "
        "`ddm-client join` does) and one invite per island made in its registry.",
        f"{args.generators} load-generator process(es), {generators}, run the islands as asyncio tasks over "
        f"grpc.aio {channels}.",
        "Every island connects first (TLS handshakes included); then all start at once: Enroll, AcquireLease, "
        "the load's heartbeats (back to back, or one per interval from a random phase), ReleaseLease.",
        retries,
        "Latencies are per successful call, measured in the generator (so they include the generator's own "
        f"queueing); each call has a {args.rpc_timeout:g} s deadline, each load phase a {args.timeout:g} s bound.",
        f"'{STORM}' counts the heartbeats sent during the enrollment storm; '{STEADY}' those sent after the last "
        "lease was granted and before the first island released its lease (all islands leased and beating, no "
        "release writes).",
        "CPU seconds are counted over the load phase: the serve processes (psutil), the generators (their "
        "os.times), PostgreSQL (psutil over the postmaster, its auxiliary processes and this scenario's "
        "backends; the WAL writer and checkpointer also work for other databases on the cluster), this script "
        "(its sampling), and the machine's busy time; 'everything else' is the machine's busy time less all "
        "of those: other people's work on a shared machine.",
    ]
    return " ".join(sentences) + "\n"


def write_report(args, command: str, info: dict, loads, deployments, scenarios: list[dict], total_s: float) -> None:
    several = len(scenarios) > 1
    parts = [
        "# Load: simulated islands against `ddm-coordinator serve`, SQLite and PostgreSQL\n",
        f"Generated by `{command}` on {dt.date.today().isoformat()}; the whole run took {total_s:.0f} s.\n",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['os']}; {info['software']}. "
        f"Load average when the bench started: {' '.join(f'{x:.2f}' for x in args.load_at_start)}. "
        f"Open-file limit: {args.fd_limit}.\n",
        method_text(args, deployments),
        "## Figures\n",
        table_md(HEADLINE, headline_rows(scenarios)) + "\n",
    ]
    if several:
        parts += [
            "## Against the baseline\n",
            "Each deployment against the first one under the same load, in this run.\n",
        ]
        parts += [f"- {line}" for line in ratio_lines(scenarios)] + [""]
    parts += ["## Where the CPU went\n", *cpu_lines(scenarios), ""]
    for load in loads:
        group = [s for s in scenarios if s["load"] == load]
        if not group:
            continue
        header, rows = summary_rows(group)
        parts += [f"## {load_label(load)}\n", table_md(header, rows) + "\n"]
        header, rows = timeline_rows(group)
        parts += [
            f"Heartbeats by when they were sent ({TIMELINE_S} s slices from the start): how many, p50 / p99 ms.\n",
            table_md(header, rows) + "\n",
        ]
    for s in scenarios:
        parts.append(f"### {s['name']}: {load_label(s['load'])}\n")
        parts.append(table_md(KIND_HEADER, kind_rows(s["summary"])) + "\n")
        for key, message in sorted(s["summary"]["error_details"].items()):
            parts.append(f'- {key}: "{message}"')
        if s["summary"]["error_details"]:
            parts.append("")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(parts))


def listed(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    wrong = [x for x in names if x not in allowed]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}")
    return names


def counts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers, such as 1,2,4")
    return values


def plan(args, parser) -> tuple[list[dict], list[dict]]:
    """The loads (islands, heartbeats, interval, transport) and deployments (backend, processes)."""
    sizes = [len(args.islands), len(args.heartbeats), len(args.interval)]
    n = max(sizes)
    if any(size not in (1, n) for size in sizes):
        parser.error("--islands, --heartbeats and --interval take one value each, or the same number of values")
    pick = lambda values, i: values[i] if len(values) > 1 else values[0]  # noqa: E731
    transports = ["plaintext", "tls"] if args.tls else args.transport
    from ddm_model.router import MAX_CLUSTERS  # the most experts (clusters) a home may have

    loads = [
        {"islands": pick(args.islands, i), "experts": min(pick(args.islands, i), MAX_CLUSTERS),
         "heartbeats": pick(args.heartbeats, i), "interval": pick(args.interval, i), "transport": transport}
        for i in range(n)
        for transport in transports
    ]  # fmt: skip
    deployments = []
    for backend in args.backend:
        for processes in [1] if backend == "sqlite" else args.processes:
            deployments.append({"backend": backend, "processes": processes, "name": f"{backend}×{processes}"})
    for load in loads:
        if load["islands"] < 2 or load["heartbeats"] < 0 or load["interval"] < 0 or args.generators > load["islands"]:
            parser.error("need --islands >= 2 (init needs 2 experts), --heartbeats >= 0, --interval >= 0, "
                         "1 <= --generators <= --islands")  # fmt: skip
    return loads, deployments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--islands", type=int, nargs="+", default=[1000], help="simulated islands (and experts), per load"
    )
    parser.add_argument("--heartbeats", type=int, nargs="+", default=[5], help="heartbeats per island, per load")
    parser.add_argument(
        "--interval",
        type=float,
        nargs="+",
        default=[0.0],
        help="seconds between an island's heartbeats (0: back to back)",
    )
    parser.add_argument(
        "--transport", type=lambda t: listed(t, TRANSPORTS), default=["plaintext"], help="plaintext, tls or both"
    )
    parser.add_argument("--tls", action="store_true", help="run every load over plaintext and over TLS")
    parser.add_argument(
        "--backend", type=lambda t: listed(t, BACKENDS), default=["sqlite"], help="sqlite, postgresql or both"
    )
    parser.add_argument(
        "--processes", type=counts, default=[1], help="serve processes on PostgreSQL, e.g. 1,2,4 (SQLite: always 1)"
    )
    parser.add_argument("--pg-host", default=PG_HOST, help="PostgreSQL's Unix socket folder (databases made here)")
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument(
        "--shared-channels",
        type=int,
        default=0,
        help="K channels to each serve process shared by the islands (0: one each)",
    )
    parser.add_argument("--retry", type=int, default=0, help="retries of Enroll/AcquireLease/ReleaseLease when refused")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each scenario's load phase, seconds")
    parser.add_argument("--rpc-timeout", type=float, default=60.0, help="deadline of each call, seconds")
    parser.add_argument("--report", type=Path, default=REPO / "bench/reports/load.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--work", type=Path, default=None, help="keep homes, logs and raw results in this folder")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.generators < 1 or args.shared_channels < 0 or args.retry < 0:
        parser.error("need --generators >= 1, --shared-channels >= 0, --retry >= 0")
    loads, deployments = plan(args, parser)

    args.load_at_start = os.getloadavg()
    info = machine(args.pg_host if "postgresql" in args.backend else None)
    print(f"machine: {info['cpu']}, {info['cores']}, {info['ram']}; {info['software']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in args.load_at_start)} (the machine may be shared)")
    args.fd_limit = raise_fd_limit()  # before any child starts: they inherit it
    print(f"open-file limit: {args.fd_limit}")
    command = "python bench/load.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    scenarios = []
    with tempfile.TemporaryDirectory(prefix="ddm-load-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        args.no_tls_flag = serve_has_no_tls_flag()
        templates: dict[int, Path] = {}  # SQLite homes, one per island count, copied by each scenario
        several_loads = len(loads) > 1
        for load in loads:
            for deployment in deployments:
                template = None
                if deployment["backend"] == "sqlite":
                    experts = load["experts"]
                    if experts not in templates:
                        templates[experts] = work / f"template-{experts}"
                        took = init_home(templates[experts], experts)
                        print(f"init with {experts} experts (SQLite): {took:.1f} s")
                    template = templates[experts]
                name = scenario_name(load, deployment, several_loads)
                print(f"scenario {name}: {load_label(load)}", flush=True)
                scenario = run_scenario(args, work, load, deployment, template, name)
                scenario["summary"] = summarize(scenario)
                scenarios.append(scenario)
                print_table(f"{name}: {load_label(load)}", KIND_HEADER, kind_rows(scenario["summary"]))
                for key, message in sorted(scenario["summary"]["error_details"].items()):
                    print(f"{key}: {message}")
    total_s = time.perf_counter() - started
    print_table("figures", HEADLINE, headline_rows(scenarios))
    for line in ratio_lines(scenarios) + cpu_lines(scenarios):
        print(line)
    write_report(args, command, info, loads, deployments, scenarios, total_s)
    print(f"report: {args.report}")
    if args.json:
        for s in scenarios:
            s.pop("results")
            for k in s["summary"]["kinds"].values():
                k.pop("latencies")
        figures = {"scenarios": scenarios, "total_s": total_s, "machine": info, "command": command}
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
