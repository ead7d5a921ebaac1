"""Load: many simulated islands enrolling, leasing and heartbeating at once against one coordinator.
Prints figures per RPC kind and writes a Markdown report; asserts nothing.

    python bench/load.py                                  # 1000 islands, back-to-back heartbeats
    python bench/load.py --tls --interval 0 1             # plaintext and TLS, two heartbeat cadences
    python bench/load.py --islands 20 --heartbeats 2      # smoke: a few seconds

The coordinator is a real `ddm-coordinator serve` process on 127.0.0.1, over a home made by
`ddm-coordinator init --mode siloed` with one expert per island (siloed needs no dataset), so
that every island can hold a lease. Invite tokens are created in the registry beforehand.

The islands live in one or more separate load-generator processes (this script with
--worker), so that the generator's CPU is counted apart from the coordinator's. Each generator
runs its islands as asyncio tasks over grpc.aio with the generated stubs; each island has its
own channel and its own TCP connection (or, with --shared-channels K, K channels are shared),
connects first, and then, when every generator is ready, all islands start at once: Enroll with
its token, AcquireLease, H heartbeats (back to back, or one every --interval seconds from a
random phase), ReleaseLease. Each call is made once, without retries (with --retry N, Enroll,
AcquireLease and ReleaseLease are retried on RESOURCE_EXHAUSTED and UNAVAILABLE with jittered
backoff); an island whose Enroll or AcquireLease fails stops there, as `ddm-client join` would.

Everything is bounded: the load phase of each scenario stops after --timeout seconds and the
figures gathered so far are reported, marked partial. The coordinator's RSS, threads, open
files and CPU time are sampled with psutil every 0.1 s; the machine-wide CPU time is measured
too, so that what other processes used during the run shows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
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
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this script belongs to, before any installed copy

import grpc  # noqa: E402

from protocol import auth, ddm_pb2_grpc  # noqa: E402
from protocol import ddm_pb2 as pb  # noqa: E402
from protocol.limits import CHANNEL_OPTIONS  # noqa: E402

KINDS = ("connect", "Enroll", "AcquireLease", "Heartbeat", "ReleaseLease")
STEADY = "Heartbeat, once all leased"  # a row of the report: heartbeats sent after the last lease
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
SAMPLE_EVERY_S = 0.1


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
            "retries": dict(self.retries),
            "outcomes": dict(self.outcomes),
        }


async def call(tally: Tally, kind: str, rpc, request, spec: dict, metadata=(), retry: bool = False):
    """One RPC (retried if asked); None when it failed, after counting the error."""
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
        tally.latencies[kind].append(time.perf_counter() - start)
        if kind == "Heartbeat":
            tally.heartbeat_sent_at.append(sent_at)
        return reply
    return None


async def run_island(index: int, token: str, stub, spec: dict, tally: Tally) -> None:
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
        reply = await call(tally, "AcquireLease", stub.AcquireLease, pb.AcquireLeaseRequest(), spec, metadata, True)
        if reply is None:
            tally.outcomes["lease failed"] += 1
            return
        if reply.WhichOneof("result") != "lease":
            tally.outcomes["no work"] += 1
            return
        lease_id = reply.lease.lease_id
        tally.leased_at.append(time.time())
        stage = "heartbeat"
        interval = spec["interval"]
        next_beat = time.monotonic() + (random.uniform(0, interval) if interval > 0 else 0.0)
        beats_ok = 0
        for step in range(1, spec["heartbeats"] + 1):
            if interval > 0:
                await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
                next_beat += interval
            request = pb.HeartbeatRequest(lease_id=lease_id, step=step, loss=0.5, images_per_second=100.0)
            beats_ok += await call(tally, "Heartbeat", stub.Heartbeat, request, spec, metadata) is not None
        stage = "release"
        request = pb.ReleaseLeaseRequest(lease_id=lease_id, reason="load bench: done")
        released = await call(tally, "ReleaseLease", stub.ReleaseLease, request, spec, metadata, True)
        if released is None:
            tally.outcomes["release failed"] += 1
        elif beats_ok < spec["heartbeats"]:
            tally.outcomes["finished, some heartbeats failed"] += 1
        else:
            tally.outcomes["finished"] += 1
    except asyncio.CancelledError:
        tally.outcomes[f"cut by the timeout ({stage})"] += 1
        raise


def make_channel(spec: dict, own_connection: bool) -> grpc.aio.Channel:
    options = list(CHANNEL_OPTIONS)
    if own_connection:
        # Channels with equal settings share one connection by default; a real island is a
        # process of its own with a connection of its own.
        options.append(("grpc.use_local_subchannel_pool", 1))
    if spec["tls_ca"]:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(spec["tls_ca"]).read_bytes())
        return grpc.aio.secure_channel(spec["address"], credentials, options=options)
    return grpc.aio.insecure_channel(spec["address"], options=options)


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
    tokens = spec["tokens"]
    shared = spec["shared_channels"]
    channels = [make_channel(spec, own_connection=not shared) for _ in range(shared or len(tokens))]
    # Connect every channel first (for TLS this includes the handshake), then wait for "go".
    await asyncio.gather(*(connect(c, tally, spec["rpc_timeout"]) for c in channels))
    stubs = [ddm_pb2_grpc.CoordinatorStub(c) for c in channels]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu0, go = os.times(), time.time()
    tasks = [
        asyncio.create_task(run_island(spec["first_index"] + i, token, stubs[i % len(stubs)], spec, tally))
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


def init_template(work: Path, experts: int) -> tuple[Path, float]:
    """`ddm-coordinator init` once; each scenario serves a copy. Returns the home and init's wall time."""
    home = work / "template"
    command = coordinator_cli(
        "init", "--home", str(home), "--mode", "siloed", "--image-size", "8", "--channels", "1",
        "--experts", str(experts), "--preset", "tiny",
    )  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=600)
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: ddm-coordinator init failed: {done.stderr.strip().splitlines()[-1:]}")
    return home, took


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
    )
    return "--no-tls" in done.stdout


class Sampler(threading.Thread):
    """Samples a process's RSS, threads, open files and CPU time every SAMPLE_EVERY_S."""

    def __init__(self, pid: int):
        import psutil

        super().__init__(name="sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.peak_rss = self.peak_threads = self.peak_fds = 0
        self.last_cpu = 0.0
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            with self.process.oneshot():
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                self.peak_threads = max(self.peak_threads, self.process.num_threads())
                self.peak_fds = max(self.peak_fds, self.process.num_fds())
                times = self.process.cpu_times()
                self.last_cpu = times.user + times.system
        except psutil.Error:
            self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
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


def run_scenario(args, template: Path, work: Path, tls: bool, interval: float, no_tls_flag: bool) -> dict:
    name = f"{'tls' if tls else 'plaintext'}-{interval:g}s"
    home = work / name / "home"
    shutil.copytree(template, home)
    tokens, invite_s = create_invites(home, args.islands)
    address = f"127.0.0.1:{free_port()}"
    command = coordinator_cli("serve", "--home", str(home), "--listen", address)
    ca = None
    if tls:
        ca, key = self_signed_certificate(work / name)
        command += ["--tls-cert", str(ca), "--tls-key", str(key)]
    elif no_tls_flag:
        command.append("--no-tls")
    log_path = work / name / "coordinator.log"
    with open(log_path, "w") as log:
        serve = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    generators: list[subprocess.Popen] = []
    try:
        wait_ready(address, ca, serve, log_path)
        sampler = Sampler(serve.pid)
        sampler.start()
        time.sleep(0.5)
        rss_idle = sampler.peak_rss
        share = math.ceil(args.islands / args.generators)
        start = time.time()
        for g in range(args.generators):
            part = tokens[g * share : (g + 1) * share]
            spec = {
                "address": address,
                "tls_ca": str(ca) if ca else None,
                "tokens": part,
                "first_index": g * share,
                "heartbeats": args.heartbeats,
                "interval": interval,
                "retry": args.retry,
                "shared_channels": args.shared_channels,
                "rpc_timeout": args.rpc_timeout,
                "deadline": start + args.timeout,
                "result": str(work / name / f"generator-{g}.json"),
            }
            spec_path = work / name / f"generator-{g}.spec.json"
            spec_path.write_text(json.dumps(spec))
            with open(work / name / f"generator-{g}.log", "w") as err:
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
                sys.exit(f"error: load generator {g} did not get ready; see {work / name / f'generator-{g}.log'}")
        connected_s = time.time() - start
        cpu_coord0, busy0, load0 = sampler.last_cpu, busy_cpu_seconds(), os.getloadavg()
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
        cpu_coord, busy = sampler.last_cpu - cpu_coord0, busy_cpu_seconds() - busy0
    finally:
        for proc in generators:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    results = []
    for g in range(len(generators)):
        path = work / name / f"generator-{g}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        sys.exit(f"error: no load generator reported; see the logs in {work / name}")
    log_text = log_path.read_text(errors="replace")
    return {
        "name": name,
        "tls": tls,
        "interval": interval,
        "invite_s": invite_s,
        "connect_phase_s": connected_s,
        "results": results,
        "coordinator": {
            "rss_idle": rss_idle,
            "rss_peak": sampler.peak_rss,
            "threads_peak": sampler.peak_threads,
            "fds_peak": sampler.peak_fds,
            "cpu_s": cpu_coord,
            "warnings": log_text.count(" WARNING "),
            "errors": log_text.count(" ERROR "),
        },
        "machine_busy_cpu_s": busy,
        "load_at_go": load0,
        "registry": registry_counts(home),
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


def registry_counts(home: Path) -> dict:
    """What the registry holds after the run, read straight from its SQLite file."""
    db = sqlite3.connect(home / "ddm.db")
    try:
        count = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "islands": count("SELECT COUNT(*) FROM islands"),
            "invites_used": count("SELECT COUNT(*) FROM invites WHERE used_at IS NOT NULL"),
            "leases": count("SELECT COUNT(*) FROM leases"),
            "leases_released": count("SELECT COUNT(*) FROM leases WHERE state = 'released'"),
            "leases_active": count("SELECT COUNT(*) FROM leases WHERE state = 'active'"),
            "heartbeats_counted": count("SELECT COALESCE(SUM(heartbeats), 0) FROM islands"),
            "events": count("SELECT COUNT(*) FROM events"),
        }
    finally:
        db.close()


# -- figures and the report -----------------------------------------------------------------------


def summarize(scenario: dict) -> dict:
    results = scenario["results"]
    kinds = {}
    for kind in KINDS:
        latencies = sorted(x for r in results for x in r["latencies"][kind])
        errors: Counter = Counter()
        for r in results:
            errors.update(r["errors"][kind])
        retries = sum(r["retries"].get(kind, 0) for r in results)
        failed = [x for r in results for x in r["error_seconds"][kind]]
        kinds[kind] = {
            "count": len(latencies),
            "errors": dict(errors),
            "error_seconds": [min(failed), max(failed)] if failed else [],
            "retries": retries,
            "latencies": latencies,
        }
    outcomes: Counter = Counter()
    details: dict[str, str] = {}
    for r in results:
        outcomes.update(r["outcomes"])
        for key, message in r["error_details"].items():
            details.setdefault(key, message)
    go = min(r["go"] for r in results)
    wall = max(r["end"] for r in results) - go
    rpcs = sum(kinds[k]["count"] for k in KINDS if k != "connect")
    # Heartbeats sent once the last lease was granted: the steady state, past the start-up burst.
    leased = [t for r in results for t in r["leased_at"]]
    all_leased = max(leased) if leased else None
    steady = sorted(
        lat
        for r in results
        for sent, lat in zip(r["heartbeat_sent_at"], r["latencies"]["Heartbeat"], strict=True)
        if all_leased is not None and sent > all_leased
    )
    kinds[STEADY] = {"count": len(steady), "errors": {}, "error_seconds": [], "retries": 0, "latencies": steady}
    return {
        "all_leased_s": None if all_leased is None else all_leased - go,
        "leases": len(leased),
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


def kind_rows(summary: dict) -> list[list[str]]:
    rows = []
    for kind in (*KINDS, STEADY):
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


def summary_rows(scenarios: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["figure", *(s["name"] for s in scenarios)]

    def row(label, fn):
        return [label, *(fn(s, s["summary"]) for s in scenarios)]

    rows = [
        row("islands finished (all heartbeats ok)", lambda s, m: str(m["outcomes"].get("finished", 0))),
        row("other outcomes", lambda s, m: "; ".join(f"{k}: {v}" for k, v in m["outcomes"].items() if k != "finished")
            or "none"),
        row("partial (timeout hit)", lambda s, m: "yes" if m["timed_out"] else "no"),
        row("wall time of the load phase, s", lambda s, m: f"{m['wall_s']:.1f}"),
        row("every lease granted after, s", lambda s, m: "-" if m["all_leased_s"] is None
            else f"{m['all_leased_s']:.1f} ({m['leases']} leases)"),
        row("Heartbeat once all leased: p50 / p99 ms", lambda s, m: "/".join(
            ms(percentile(m["kinds"][STEADY]["latencies"], q)) for q in (0.5, 0.99))
            if m["kinds"][STEADY]["latencies"] else "-"),
        row("RPCs ok", lambda s, m: f"{m['rpcs']:,}"),
        row("RPCs per second", lambda s, m: f"{m['rpc_per_s']:,.0f}"),
        row("heartbeats per second", lambda s, m: f"{m['heartbeats_per_s']:,.0f}"),
        row("errors (all kinds)", lambda s, m: str(m["errors"])),
        row("Heartbeat p50 / p99 ms", lambda s, m: "/".join(
            ms(percentile(m["kinds"]["Heartbeat"]["latencies"], q)) for q in (0.5, 0.99))
            if m["kinds"]["Heartbeat"]["latencies"] else "-"),
        row("Enroll p50 / p99 ms", lambda s, m: "/".join(
            ms(percentile(m["kinds"]["Enroll"]["latencies"], q)) for q in (0.5, 0.99))
            if m["kinds"]["Enroll"]["latencies"] else "-"),
        row("generators started, every channel connected, s", lambda s, m: f"{s['connect_phase_s']:.1f}"),
        row("coordinator RSS idle -> peak, MiB", lambda s, m:
            f"{s['coordinator']['rss_idle'] / MiB:.0f} -> {s['coordinator']['rss_peak'] / MiB:.0f}"),
        row("coordinator CPU s (of wall)", lambda s, m:
            f"{s['coordinator']['cpu_s']:.1f} ({s['coordinator']['cpu_s'] / max(m['wall_s'], 1e-9):.0%})"),
        row("coordinator peak threads / open files", lambda s, m:
            f"{s['coordinator']['threads_peak']} / {s['coordinator']['fds_peak']}"),
        row("coordinator log warnings / errors", lambda s, m:
            f"{s['coordinator']['warnings']} / {s['coordinator']['errors']}"),
        row("generator CPU s (of wall)", lambda s, m:
            f"{m['generator_cpu_s']:.1f} ({m['generator_cpu_s'] / max(m['wall_s'], 1e-9):.0%})"),
        row("generator peak RSS, MiB", lambda s, m: f"{m['generator_rss_peak'] / MiB:.0f}"),
        row("CPU s used by everything else on the machine", lambda s, m:
            f"{max(0.0, s['machine_busy_cpu_s'] - s['coordinator']['cpu_s'] - m['generator_cpu_s']):.1f}"),
        row("load average at go (1/5/15 min)", lambda s, m: " ".join(f"{x:.2f}" for x in s["load_at_go"])),
        row("registry after: islands / leases released / active", lambda s, m:
            f"{s['registry']['islands']} / {s['registry']['leases_released']} / {s['registry']['leases_active']}"),
        row("registry after: heartbeats counted / events", lambda s, m:
            f"{s['registry']['heartbeats_counted']:,} / {s['registry']['events']:,}"),
        row("invites created (one transaction each), s", lambda s, m: f"{s['invite_s']:.1f}"),
    ]  # fmt: skip
    return header, rows


def ratio_lines(scenarios: list[dict]) -> list[str]:
    """TLS against plaintext at the same heartbeat cadence."""
    lines = []
    for tls in (s for s in scenarios if s["tls"]):
        plain = next((s for s in scenarios if not s["tls"] and s["interval"] == tls["interval"]), None)
        if plain is None:
            continue
        a, b = plain["summary"], tls["summary"]

        def p(m, kind, q):
            lat = m["kinds"][kind]["latencies"]
            return percentile(lat, q) if lat else float("nan")

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
        cells = ", ".join(f"{label} {y / x:.2f}x" for label, x, y in pairs if x and x == x and y == y)
        lines.append(f"TLS / plaintext at interval {tls['interval']:g} s: {cells}.")
    return lines


def machine() -> dict:
    import psutil

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return {
        "cpu": model,
        "cores": f"{psutil.cpu_count(logical=True)} logical ({psutil.cpu_count(logical=False)} physical)",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "software": (
            f"Python {platform.python_version()}, torch {version('torch')}, grpcio {grpc.__version__}, "
            f"SQLAlchemy {version('sqlalchemy')}, SQLite {sqlite3.sqlite_version}, psutil {psutil.__version__}"
        ),
    }


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
    Console(width=160).print(table)


def write_report(args, command: str, info: dict, scenarios: list[dict], init_s: float, total_s: float) -> None:
    header, rows = summary_rows(scenarios)
    parts = [
        f"# Load: {args.islands} islands against one coordinator\n",
        f"Generated by `{command}` on {dt.date.today().isoformat()}; the whole run took {total_s:.0f} s "
        f"(of which `ddm-coordinator init` with {args.islands} experts: {init_s:.1f} s).\n",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['os']}; {info['software']}. "
        f"Load average when the bench started: {' '.join(f'{x:.2f}' for x in args.load_at_start)}. The machine "
        "is shared: the row 'CPU s used by everything else' is the machine's busy CPU time during the load phase "
        "less the coordinator's and the generators'.\n",
        f"Each scenario: a fresh copy of one `init --mode siloed --experts {args.islands} --preset tiny` home, "
        f"{args.islands} invite tokens made in its registry, a real `ddm-coordinator serve` process on 127.0.0.1, "
        f"{args.generators} load-generator process(es) running the islands as asyncio tasks over grpc.aio "
        + ("with one channel and one TCP connection per island. " if not args.shared_channels
           else f"over {args.shared_channels} shared channels. ")
        + f"Every island connects first; then all start at once: Enroll, AcquireLease, {args.heartbeats} "
        "Heartbeats (back to back for interval 0 s; otherwise one per interval from a random phase), ReleaseLease. "
        + (f"Enroll, AcquireLease and ReleaseLease are retried up to {args.retry} times on RESOURCE_EXHAUSTED "
           "or UNAVAILABLE; heartbeats never. " if args.retry else "No call is retried. ")
        + f"Latencies are per successful call, measured in the generator; each call has a {args.rpc_timeout:g} s "
        f"deadline, each load phase a {args.timeout:g} s bound. '{STEADY}' counts only the heartbeats sent after "
        "the last lease was granted: the steady state, past the start-up burst.\n",
        table_md(header, rows) + "\n",
    ]  # fmt: skip
    parts += [line + "\n" for line in ratio_lines(scenarios)]
    for s in scenarios:
        parts.append(f"## {s['name']}\n")
        parts.append(table_md(KIND_HEADER, kind_rows(s["summary"])) + "\n")
        for key, message in sorted(s["summary"]["error_details"].items()):
            parts.append(f'- {key}: "{message}"')
        if s["summary"]["error_details"]:
            parts.append("")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--islands", type=int, default=1000, help="simulated islands (and experts)")
    parser.add_argument("--heartbeats", type=int, default=5, help="heartbeats per island")
    parser.add_argument(
        "--interval",
        type=float,
        nargs="+",
        default=[0.0],
        help="seconds between an island's heartbeats (0: back to back)",
    )
    parser.add_argument("--tls", action="store_true", help="also run every scenario over TLS (self-signed certificate)")
    parser.add_argument("--generators", type=int, default=1, help="load-generator processes")
    parser.add_argument("--shared-channels", type=int, default=0, help="K channels shared by all islands (0: one each)")
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
    if args.islands < 2 or args.heartbeats < 0 or args.generators < 1 or args.generators > args.islands:
        parser.error("need --islands >= 2 (init needs 2 experts), --heartbeats >= 0, 1 <= --generators <= --islands")

    args.load_at_start = os.getloadavg()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']}, {info['ram']}; {info['software']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in args.load_at_start)} (the machine may be shared)")
    print(f"open-file limit: {raise_fd_limit()}")
    command = "python bench/load.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    scenarios = []
    with tempfile.TemporaryDirectory(prefix="ddm-load-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        template, init_s = init_template(work, args.islands)
        print(f"init with {args.islands} experts: {init_s:.1f} s")
        no_tls_flag = serve_has_no_tls_flag()
        for tls in [False, True] if args.tls else [False]:
            for interval in args.interval:
                scenario = run_scenario(args, template, work, tls, interval, no_tls_flag)
                scenario["summary"] = summarize(scenario)
                scenarios.append(scenario)
                print_table(
                    f"{scenario['name']}: {args.islands} islands, {args.heartbeats} heartbeats each",
                    KIND_HEADER,
                    kind_rows(scenario["summary"]),
                )
                for key, message in sorted(scenario["summary"]["error_details"].items()):
                    print(f"{key}: {message}")
    total_s = time.perf_counter() - started
    header, rows = summary_rows(scenarios)
    print_table("summary", header, rows)
    for line in ratio_lines(scenarios):
        print(line)
    write_report(args, command, info, scenarios, init_s, total_s)
    print(f"report: {args.report}")
    if args.json:
        for s in scenarios:
            s.pop("results")
            for k in s["summary"]["kinds"].values():
                k.pop("latencies")
        args.json.write_text(json.dumps({"scenarios": scenarios, "init_s": init_s, "total_s": total_s}, indent=1))


if __name__ == "__main__":
    main()
