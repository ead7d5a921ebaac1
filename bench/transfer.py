"""Upload and download throughput over loopback, against a plain file copy of the same bytes,
and heartbeat latency under many concurrent islands. Prints a table and writes a Markdown
report; asserts nothing.

    python bench/transfer.py                       # about 2 minutes on a 2-core CPU
    python bench/transfer.py --islands 1 8 32 --heartbeat-seconds 5
    python bench/transfer.py --no-tls              # plaintext gRPC, to see what TLS costs

The coordinator runs as a real `ddm-coordinator serve` process on 127.0.0.1, serving TLS with
its own certificate, which the clients pin by fingerprint (as islands do). The checkpoint is an
S/4 expert trained for ten small steps (about 131 MB; just enough to pass the coordinator's
probe check, which is part of what an upload costs; it verifies every byte). The baseline is
shutil.copyfile of the same file, with and without fsync, in the same run. Heartbeats come from
one thread per simulated island in this process, each with its own channel, credential and lease.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.table import Table

from client.connection import Connection
from client.island import fetch_data
from client.state import IslandState
from client.tls import TlsSettings
from client.transfer import download_artifact, upload_checkpoint
from coordinator.bootstrap import InitOptions, init_home
from coordinator.home import Home
from coordinator.registry import Registry
from coordinator.tls import home_fingerprint
from ddm_model.dit import DiTConfig
from ddm_model.train import TrainConfig, train_expert
from protocol import ddm_pb2 as pb
from protocol.limits import DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES

console = Console(width=130)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    def __init__(self, home: Path, tls: bool = True):
        self.home = Home(home)
        self.address = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "coordinator.cli", "serve", "--home", str(home), "--listen", self.address]
        self.proc = subprocess.Popen(
            argv + ([] if tls else ["--no-tls"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.tls = TlsSettings(fingerprint=home_fingerprint(self.home)) if tls else TlsSettings(insecure=True)
        deadline = time.monotonic() + 60
        while True:  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", int(self.address.rsplit(":", 1)[1])), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.registry = Registry(self.home.database_url(self.home.load_config()))

    def island(self, role: str = "island") -> Connection:
        token = self.registry.create_invite(role, 3600)
        reply = Connection(self.address, tls=self.tls).unary("Enroll", pb.EnrollRequest(token=token, name="bench"))
        return Connection(self.address, reply.credential, tls=self.tls)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.registry.close()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def transfers(work: Path, chunk: int, tls: bool) -> list[tuple[str, int, float]]:
    home = work / "transfer-home"
    init_home(
        InitOptions(home=home, experts=2, preset="S/4", steps=10, batch_size=8, router_preset="tiny", router_steps=10)
    )
    coordinator = Coordinator(home, tls)
    rows = []
    try:
        conn = coordinator.island()
        files = []
        for _ in range(2):
            lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
            shard = fetch_data(conn, lease, IslandState(work / "island"), None)
            path = work / f"expert-{lease.expert_id}.safetensors"
            settings = TrainConfig.from_dict(json.loads(lease.train_config_json))
            model_cfg = DiTConfig.from_dict(json.loads(lease.model_config_json))
            trained = train_expert(shard, model_cfg, settings, progress=False)
            trained.export(path, shard.fingerprint(), cluster_id=lease.cluster_id)
            files.append(path)
            size = path.stat().st_size
            start = time.perf_counter()
            report = upload_checkpoint(conn, lease.lease_id, path, chunk_bytes=chunk)
            rows.append(("upload + validate + sign (gRPC)", size, time.perf_counter() - start))
        rows.append(("plain copy, no fsync", size, timed(lambda: shutil.copyfile(files[0], work / "copy-a"))))
        rows.append(("plain copy + fsync", size, timed(lambda: copy_fsync(files[0], work / "copy-b"))))

        deadline = time.time() + 300
        while coordinator.registry.latest_published() is None and time.time() < deadline:
            time.sleep(0.5)
        reader = coordinator.island("reader")
        sha = report.reply.sha256
        dest = work / "downloaded.safetensors"
        rows.append(("download + sha256 check (gRPC)", size, timed(lambda: download_artifact(reader, sha, dest, size))))
        stored = coordinator.home.artifacts / sha
        rows.append(("plain copy of the stored artifact", size, timed(lambda: shutil.copyfile(stored, work / "c"))))
    finally:
        coordinator.stop()
    return rows


def heartbeats(work: Path, counts: list[int], seconds: float, tls: bool) -> list[tuple[int, int, list[float]]]:
    most = max(counts)
    home = work / "heartbeat-home"
    init_home(
        InitOptions(
            home=home,
            experts=most,
            preset="tiny",
            steps=10,
            router_preset="tiny",
            router_steps=10,
            lease_seconds=600,
            heartbeat_seconds=1,
        )
    )
    coordinator = Coordinator(home, tls)
    results = []
    try:
        islands = []
        for _ in range(most):
            conn = coordinator.island()
            lease = conn.unary("AcquireLease", pb.AcquireLeaseRequest()).lease
            islands.append((conn, lease.lease_id))
        for n in counts:
            latencies: list[list[float]] = [[] for _ in range(n)]
            stop = threading.Event()

            def beat(i: int, stop: threading.Event = stop, latencies: list = latencies) -> None:
                conn, lease_id = islands[i]
                step = 0
                while not stop.is_set():
                    step += 1
                    request = pb.HeartbeatRequest(lease_id=lease_id, step=step, loss=0.5, images_per_second=1.0)
                    start = time.perf_counter()
                    conn.unary("Heartbeat", request, retry=False)
                    latencies[i].append(time.perf_counter() - start)

            threads = [threading.Thread(target=beat, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join()
            flat = [x for per in latencies for x in per]
            results.append((n, len(flat), flat))
    finally:
        coordinator.stop()
    return results


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, grpcio {grpc.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_BYTES // MIN_CHUNK_BYTES)
    parser.add_argument("--islands", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0, help="how long each load level runs")
    parser.add_argument("--no-tls", action="store_true", help="serve plaintext gRPC instead of TLS")
    parser.add_argument("--report", type=Path, default=Path("bench/reports/transfer.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ddm-bench-") as tmp:
        work = Path(tmp)
        rows = transfers(work, args.chunk_mib * MIN_CHUNK_BYTES, not args.no_tls)
        beats = heartbeats(work, args.islands, args.heartbeat_seconds, not args.no_tls)

    table = Table(title=f"transfers over loopback ({args.chunk_mib} MiB chunks)")
    for col in ("what", "bytes", "seconds", "MiB/s"):
        table.add_column(col, justify="left" if col == "what" else "right")
    lines = []
    for what, size, seconds in rows:
        cells = [what, f"{size:,}", f"{seconds:.2f}", f"{size / seconds / 2**20:,.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    upload_rate = rows[1][1] / rows[1][2]
    copy_rate = rows[3][1] / rows[3][2]
    download_rate = rows[4][1] / rows[4][2]
    plain_rate = rows[5][1] / rows[5][2]
    ratios = (
        f"upload (2nd run) at {upload_rate / copy_rate:.2f}x the speed of a plain copy with fsync; "
        f"download at {download_rate / plain_rate:.2f}x the speed of a plain copy"
    )
    console.print(ratios)

    hb = Table(title=f"heartbeat latency, {args.heartbeat_seconds:g} s per load level")
    for col in ("islands", "heartbeats", "per second", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        hb.add_column(col, justify="right")
    hb_lines = []
    for n, count, flat in beats:
        q = statistics.quantiles(flat, n=100)
        cells = [
            str(n),
            str(count),
            f"{count / args.heartbeat_seconds:,.0f}",
            f"{q[49] * 1e3:.1f}",
            f"{q[94] * 1e3:.1f}",
            f"{q[98] * 1e3:.1f}",
            f"{max(flat) * 1e3:.1f}",
        ]
        hb.add_row(*cells)
        hb_lines.append("| " + " | ".join(cells) + " |")
    console.print(hb)

    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        "# Transfers and heartbeats over loopback\n\n"
        f"Generated by `python bench/transfer.py --chunk-mib {args.chunk_mib} --islands "
        f"{' '.join(map(str, args.islands))} --heartbeat-seconds {args.heartbeat_seconds:g}"
        f"{' --no-tls' if args.no_tls else ''}`.\n\n"
        f"Machine: {machine()}.\n\n"
        "The coordinator is a real `ddm-coordinator serve` process on 127.0.0.1 "
        f"({'plaintext gRPC' if args.no_tls else 'TLS, its certificate pinned by the clients'}); "
        "the checkpoint an S/4 expert trained for ten small steps. Upload time covers BeginUpload, every chunk "
        "written and fsynced before its offset is committed in SQLite, and CompleteUpload (sha256, header and "
        "tensor checks, the probe-slice score, move into the store, signing). Download time covers the stream "
        "into a .part file, fsync and the sha256 check.\n\n"
        "| what | bytes | seconds | MiB/s |\n|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"{ratios}.\n\n"
        "Heartbeats: one thread per simulated island in the benchmark process, each with its own channel, "
        "credential and lease, sending back to back (each heartbeat is one SQLite transaction). The client "
        "threads share one Python interpreter, so the figures bound the coordinator from below.\n\n"
        "| islands | heartbeats | per second | p50 ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(hb_lines)
        + "\n"
    )
    console.print(f"report: {args.report}")


if __name__ == "__main__":
    main()
