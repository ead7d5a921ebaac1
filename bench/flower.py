"""Flower against ddm's own transport: the same siloed training (two islands, two experts, the
digits split even/odd between two silos) run three ways side by side, each on a fresh home:

  1. flower, reply: a Flower federation (one SuperLink, two SuperNodes, `flwr run` of the app
     `ddm-coordinator flower-app` writes), each checkpoint inside the node's Flower reply;
  2. flower, ddm port: the same, the ServerApp also serving ddm's gRPC port (run config
     ``listen``), so that the nodes upload through ddm's resumable, chunked upload;
  3. ddm serve: `ddm-coordinator serve` and two `ddm-client join --once` processes.

For each: the wall time from the start of the islands (the `flwr run`, or the `join` processes)
to the ensemble's publication in the registry, and from the start of the federation (or of
`serve`); the peak memory of the coordinator's side and of the islands; the checkpoint size;
which path carried each checkpoint (the coordinator's own traffic counts); and whether the
published ensemble downloads and verifies (`ddm-client download` with a reader invite, against a
`ddm-coordinator serve` of the home afterwards). Prints a table and writes a Markdown report and
the raw figures as JSON; asserts nothing (it exits 1 if a way failed, after the report).

    python bench/flower.py                          # S/2 experts (~124 MiB checkpoints), 2 steps
    python bench/flower.py --preset B/2             # ~494 MiB checkpoints
    python bench/flower.py --quick --out /tmp/fl    # smoke: tiny experts, a minute or so
    python bench/flower.py --ways reply,port --keep /tmp/fl-work   # keep homes and logs

Training is kept short on purpose (``--steps 2 --batch-size 4``, one CPU thread per island): the
point is transport, memory and orchestration, not the model. Memory is sampled with psutil every
0.1 s: for Flower, the SuperLink with all its descendants (the SuperExec and the ServerApp
process it starts for the run, which does the coordinator's work: validation, signing, the
router) and the SuperLink process alone (the relay: what it holds of the messages), with the
tests' Federation helper (tests/e2e/flower.py); for ddm, the `serve` process (with its
descendants, if any). The islands' side: each SuperNode with its ClientApp processes, or each
`join` process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this script belongs to, before any installed copy

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.machine import describe, version  # noqa: E402
from tests.e2e.conftest import TLS_LINE, child_env, cli, free_port  # noqa: E402
from tests.e2e.flower import Federation, FlowerRunError  # noqa: E402

WAYS = {
    "reply": "flower, reply",
    "port": "flower, ddm port",
    "ddm": "ddm serve",
}
SAMPLE_EVERY_S = 0.1
ERROR_LINE = re.compile(r"\bERROR\b|Traceback|CRITICAL")
MiB = 2**20


# -- processes and memory -------------------------------------------------------------------------


def tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def label_of(process: psutil.Process) -> str:
    """The program a process runs: the console script's name for a Python one."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "?"
    if not argv:
        return "?"
    first = Path(argv[0]).name
    if first.startswith("python") and len(argv) > 1:
        return Path(argv[2] if argv[1] == "-m" and len(argv) > 2 else argv[1]).name
    return first


class Sampler:
    """Peak RSS, every SAMPLE_EVERY_S, of groups of processes: ``groups()`` returns {name: roots};
    each group's figure is the sum over its roots and all their descendants, and, per program
    (label_of), the sum over that program's processes in the group."""

    def __init__(self, groups):
        self.groups = groups
        self.peak: dict[str, int] = {}
        self.by_program: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, roots in self.groups().items():
                procs = [p for root in roots if root is not None for p in tree(root)]
                sizes = [(label_of(p), rss(p)) for p in procs]
                self.peak[name] = max(self.peak.get(name, 0), sum(s for _, s in sizes))
                programs = self.by_program.setdefault(name, {})
                totals: dict[str, int] = {}
                for label, size in sizes:
                    totals[label] = totals.get(label, 0) + size
                for label, size in totals.items():
                    if not size:  # ended between the listing and the reading
                        continue
                    programs[label] = max(programs.get(label, 0), size)
            self._stop.wait(SAMPLE_EVERY_S)


def spawn(name: str, args: list, log: Path) -> psutil.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return psutil.Popen(
            [*cli(name), *map(str, args)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(), start_new_session=True,
        )  # fmt: skip


def run_cli(name: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*cli(name), *map(str, args)], capture_output=True, text=True, env=child_env(), timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def stop(process: psutil.Popen | None, grace: float = 30.0) -> int | None:
    """SIGTERM the process (its descendants after a grace), return its exit code."""
    if process is None:
        return None
    with contextlib.suppress(psutil.Error):
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=grace)
    except psutil.TimeoutExpired:
        for p in tree(process):
            with contextlib.suppress(psutil.Error):
                p.kill()
        return process.wait(timeout=grace)


# -- homes, silos and the registry ---------------------------------------------------------------


def make_silos(work: Path) -> list[Path]:
    """The digits, even ones at one site and odd ones at the other, as tests/e2e/test_flower.py."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16 * 255).round().astype(np.uint8)
    paths = []
    for k in range(2):
        path = work / "silos" / f"site-{k}" / "images.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = digits.target % 2 == k
        np.savez(path, images=pixels[mine], labels=digits.target[mine])
        paths.append(path)
    return paths


def init_home(home: Path, args) -> dict:
    started = time.perf_counter()
    done = run_cli(
        "ddm-coordinator", "init", "--home", home, "--mode", "siloed", "--image-size", 8, "--channels", 1,
        "--experts", 2, "--preset", args.preset, "--steps", args.steps, "--batch-size", args.batch_size,
        "--router-steps", args.router_steps, "--router-samples", args.router_samples,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    return {
        "home": home,
        "fingerprint": lines[-1],
        "tls_fingerprint": next(line.split(": ", 1)[1] for line in lines if line.startswith(TLS_LINE)),
        "init_s": time.perf_counter() - started,
    }


def invite(home: Path, role: str = "island") -> str:
    return run_cli("ddm-coordinator", "invite", "--home", home, "--role", role).stdout.strip().splitlines()[-1]


def registry(home: Path, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(f"file:{home / 'ddm.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def published_at(home: Path) -> float | None:
    rows = registry(home, "SELECT min(at) FROM events WHERE kind = 'published'")
    return rows[0][0] if rows else None


def timeline(home: Path, start: float) -> dict:
    """Seconds after ``start`` (wall clock) of the registry's events of the run."""
    rows = registry(home, "SELECT kind, min(at), max(at) FROM events GROUP BY kind")
    at = {kind: (first - start, last - start) for kind, first, last in rows}

    def first(kind):
        return round(at[kind][0], 2) if kind in at else None

    def last(kind):
        return round(at[kind][1], 2) if kind in at else None

    return {
        "first_lease_s": first("lease"),
        "last_lease_s": last("lease"),
        "first_upload_begin_s": first("upload_begin"),
        "last_upload_begin_s": last("upload_begin"),
        "first_signed_s": first("signed"),
        "last_signed_s": last("signed"),
        "assemble_s": first("assemble"),
        "published_s": first("published"),
    }


def status(home: Path) -> dict:
    return json.loads(run_cli("ddm-coordinator", "status", "--home", home, "--json").stdout)


def checkpoint_sizes(home: Path) -> dict:
    rows = registry(home, "SELECT kind, size FROM artifacts")
    return {
        "experts": sorted(size for kind, size in rows if kind == "expert"),
        "router": max((size for kind, size in rows if kind == "router"), default=0),
    }


def carried(state: dict) -> list[dict]:
    """Per island: what ddm's port received of its checkpoint (0: it came some other way)."""
    return [
        {"name": i["name"], "via_ddm_port_bytes": i["sent"]["checkpoint"]["bytes"]}
        for i in state["islands"]
        if i["role"] == "island"
    ]


def verify(home: dict, work: Path) -> dict:
    """Serve the home, download the published ensemble as a reader (which checks every signature
    against the pinned key and every file's digest), stop serving."""
    address = f"127.0.0.1:{free_port()}"
    serve = spawn("ddm-coordinator", ["serve", "--home", home["home"], "--listen", address], work / "logs/verify.log")
    try:
        reader = invite(home["home"], "reader")
        started = time.perf_counter()
        done = None
        while time.perf_counter() - started < 60:
            done = subprocess.run(
                [*cli("ddm-client"), "download", "--coordinator", address, "--tls-fingerprint",
                 home["tls_fingerprint"], "--out", str(work / "ensemble"), "--fingerprint", home["fingerprint"],
                 "--token", reader, "--state-dir", str(work / "reader")],
                capture_output=True, text=True, env=child_env(), timeout=600,
            )  # fmt: skip
            if done.returncode == 0 or serve.poll() is not None or "UNAVAILABLE" not in done.stderr + done.stdout:
                break
            time.sleep(0.5)  # serve not listening yet
        took = time.perf_counter() - started
    finally:
        stop(serve)
    if done is None or done.returncode != 0:
        return {"ok": False, "why": (done.stderr if done else "")[-1500:]}
    manifest = json.loads((work / "ensemble" / "manifest.json").read_text())
    files = sum(p.stat().st_size for p in (work / "ensemble").iterdir() if p.is_file())
    ok = manifest.get("mode") == "siloed" and len(manifest.get("experts", [])) == 2
    return {"ok": ok, "download_s": round(took, 2), "bytes": files, "experts": len(manifest.get("experts", []))}


def error_lines(logs: list[Path]) -> list[str]:
    found = []
    for path in logs:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if ERROR_LINE.search(line):
                    found.append(f"{path.name}: {line.strip()[:300]}")
    return found


# -- the three ways -------------------------------------------------------------------------------


def run_flower(way: str, home: dict, silos: list[Path], work: Path, args) -> dict:
    app = work / "flower-app"
    run_cli(
        "ddm-coordinator", "flower-app", app, "--home", home["home"], "--wait-for-nodes-s", 60,
        "--expert-timeout-s", max(1.0, args.timeout),
    )  # fmt: skip
    nodes = [
        {"data-dir": str(silo), "state-dir": str(work / f"site-{k}" / "state"), "threads": 1}
        for k, silo in enumerate(silos)
    ]
    config = {"poll-s": args.poll_s}
    if way == "port":
        config["listen"] = f"127.0.0.1:{free_port()}"
    figures: dict = {"run_config": config}
    federation = Federation(work / "flower", nodes)
    wall_start = time.time()
    started = time.perf_counter()
    groups = lambda: {"islands": list(federation.nodes), **{f"node-{i}": [n] for i, n in enumerate(federation.nodes)}}  # noqa: E731
    try:
        with Sampler(groups) as islands, federation:
            figures["federation_start_s"] = time.perf_counter() - started
            run_wall = time.time()
            superlink = Sampler(lambda: {"tree": [federation.superlink]})
            with superlink:
                result = federation.run(app, config, timeout=args.timeout, check=False)
            figures["flwr_run_s"] = result.seconds
            figures["total_wall_s"] = time.perf_counter() - started
            figures["status"] = result.status
            figures["coordinator_peak"] = federation.superlink_peak_rss()
            figures["superlink_peak"] = federation.superlink_peak_rss(main_only=True)
            figures["coordinator_by_program"] = superlink.by_program.get("tree", {})
            if "published ensemble" not in result.logs:
                figures["error"] = f"{result.status}: {result.details.get('status-details')}\n{result.logs[-1500:]}"
            (work / "logs").mkdir(exist_ok=True)
            (work / "logs" / "serverapp.log").write_text(result.logs)
    except FlowerRunError as exc:
        figures["error"] = str(exc)[-3000:]
        return figures
    figures["islands_peak"] = islands.peak.get("islands", 0)
    figures["island_peaks"] = [islands.peak.get(f"node-{i}", 0) for i in range(len(nodes))]
    figures["islands_by_program"] = islands.by_program.get("islands", {})
    figures["logs"] = [*sorted((work / "flower" / "logs").glob("*.log")), work / "logs" / "serverapp.log"]
    return finish(figures, home, wall_start, run_wall)


def run_ddm(home: dict, silos: list[Path], work: Path, args) -> dict:
    tokens = [invite(home["home"]) for _ in silos]
    address = f"127.0.0.1:{free_port()}"
    logs = work / "logs"
    figures: dict = {}
    serve, joins = None, []
    groups = lambda: {"serve": [serve], "islands": joins, **{f"node-{i}": [j] for i, j in enumerate(joins)}}  # noqa: E731
    wall_start = time.time()
    started = time.perf_counter()
    try:
        with Sampler(groups) as sampler:
            serve = spawn("ddm-coordinator", ["serve", "--home", home["home"], "--listen", address], logs / "serve.log")
            from client.tls import handshake

            while True:  # ready once it completes a TLS handshake, as tests/e2e/conftest.py waits
                if serve.poll() is not None:
                    raise RuntimeError(f"serve exited with {serve.poll()}")
                try:
                    handshake(address, timeout=0.5)
                    break
                except OSError:
                    if time.perf_counter() - started > 60:
                        raise RuntimeError("serve not listening after 60 s") from None
                    time.sleep(0.05)
            figures["serve_start_s"] = time.perf_counter() - started
            run_wall = time.time()
            for k, (silo, token) in enumerate(zip(silos, tokens, strict=True)):
                join = [
                    "join", "--coordinator", address, "--tls-fingerprint", home["tls_fingerprint"], "--token", token,
                    "--state-dir", work / f"site-{k}" / "state", "--data", silo, "--once", "--threads", 1,
                    "--name", f"site-{k}",
                ]  # fmt: skip
                joins.append(spawn("ddm-client", join, logs / f"island-{k}.log"))
            deadline = time.perf_counter() + args.timeout
            while published_at(home["home"]) is None:
                failed = [j.returncode for j in joins if j.poll() not in (None, 0)]
                if failed or serve.poll() is not None or time.perf_counter() > deadline:
                    why = f"islands exited {failed}" if failed else "serve exited" if serve.poll() else "timed out"
                    raise RuntimeError(f"no ensemble published: {why}")
                time.sleep(0.1)
            figures["total_wall_s"] = time.perf_counter() - started
            figures["join_exit"] = [j.wait(timeout=120) for j in joins]
            figures["serve_exit"] = stop(serve)
    except (RuntimeError, psutil.Error, subprocess.SubprocessError) as exc:
        figures["error"] = str(exc)
        return figures
    finally:
        for process in [*joins, serve]:
            if process is not None and process.poll() is None:
                stop(process, grace=5)
    figures["coordinator_peak"] = sampler.peak.get("serve", 0)
    figures["coordinator_by_program"] = sampler.by_program.get("serve", {})
    figures["islands_peak"] = sampler.peak.get("islands", 0)
    figures["island_peaks"] = [sampler.peak.get(f"node-{i}", 0) for i in range(len(silos))]
    figures["islands_by_program"] = sampler.by_program.get("islands", {})
    figures["logs"] = sorted(logs.glob("*.log"))
    return finish(figures, home, wall_start, run_wall)


def finish(figures: dict, home: dict, wall_start: float, run_wall: float) -> dict:
    """What the registry says of the run: when it published, checkpoint sizes, who carried what."""
    published = published_at(home["home"])
    if published is None:
        figures.setdefault("error", "no ensemble published")
        return figures
    figures["to_published_s"] = published - run_wall
    figures["total_to_published_s"] = published - wall_start
    figures["timeline"] = timeline(home["home"], run_wall)
    figures["sizes"] = checkpoint_sizes(home["home"])
    state = status(home["home"])
    figures["ensemble_state"] = state["ensemble"]["state"]
    figures["experts_signed"] = sum(e["state"] == "signed" for e in state["experts"])
    figures["carried"] = carried(state)
    return figures


# -- the report -----------------------------------------------------------------------------------


def machine() -> dict:
    return describe(
        f"Python {platform.python_version()}, torch {version('torch')}, flwr {version('flwr')}, "
        f"grpcio {version('grpcio')}, psutil {psutil.__version__}"
    )


HEADER = [
    "way",
    "checkpoint MiB (each)",
    "islands → published, s",
    "with federation / serve start, s",
    "first lease, s",
    "last signed, s",
    "coordinator side peak RSS, MiB",
    "SuperLink alone peak RSS, MiB",
    "islands peak RSS, MiB (each)",
    "checkpoints via ddm's port",
    "verified",
]


def mib(n: int | float | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:,.0f}" if n >= 10 * MiB or n == 0 else f"{n / MiB:.2f}"


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def row(result: dict) -> list[str]:
    name = WAYS[result["way"]]
    if "error" in result:
        return [name, "failed: " + result["error"].splitlines()[0][:120]] + ["-"] * (len(HEADER) - 2)
    sizes = result["sizes"]["experts"]
    via = [c["via_ddm_port_bytes"] for c in result["carried"]]
    line = result["timeline"]
    verified = result.get("verify", {})
    return [
        name,
        " / ".join(f"{s / MiB:.1f}" for s in sizes),
        secs(result["to_published_s"]),
        secs(result["total_to_published_s"]),
        secs(line["first_lease_s"]),
        secs(line["last_signed_s"]),
        mib(result["coordinator_peak"]),
        mib(result.get("superlink_peak")),
        f"{mib(result['islands_peak'])} ({' / '.join(mib(p) for p in result['island_peaks'])})",
        f"{sum(v > 0 for v in via)} of {len(via)} ({mib(sum(via))} MiB)",
        ("yes" if verified.get("ok") else "NO") + (f", {verified['download_s']:.1f} s" if verified.get("ok") else ""),
    ]


def table_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_table(title: str, rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(HEADER):
        table.add_column(column, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def programs_line(result: dict) -> str:
    parts = []
    for side in ("coordinator_by_program", "islands_by_program"):
        programs = result.get(side) or {}
        text = ", ".join(f"{name} {mib(size)}" for name, size in sorted(programs.items(), key=lambda kv: -kv[1]))
        parts.append(f"{side.split('_')[0]} side: {text or '-'}")
    return f"- {WAYS[result['way']]}: " + "; ".join(parts) + " (MiB, each program's own peak)."


def interpretation(results: list[dict]) -> list[str]:
    """Sentences computed from the figures; the reader judges the rest."""
    by = {r["way"]: r for r in results if "error" not in r}
    lines = []
    ckpt = max((max(r["sizes"]["experts"]) for r in by.values()), default=0)
    if ckpt and ckpt < 10 * MiB:
        lines.append(
            f"The checkpoints ({mib(ckpt)} MiB) are too small for the memory the transport holds of them to show;"
            " run with the default --preset for that."
        )
    elif ckpt and "reply" in by:
        r = by["reply"]
        total = sum(r["sizes"]["experts"])
        line = r["timeline"]
        apart = (line["last_upload_begin_s"] or 0) - (line["first_upload_begin_s"] or 0)
        text = (
            f"SuperLink memory: with the checkpoints in the Flower reply the SuperLink process alone peaked at "
            f"{mib(r['superlink_peak'])} MiB for {mib(total)} MiB of checkpoints in all"
        )
        if "port" in by:
            extra = r["superlink_peak"] - by["port"]["superlink_peak"]
            text += (
                f", against {mib(by['port']['superlink_peak'])} MiB when they went through ddm's port: "
                f"{mib(extra)} MiB more, {extra / total:.1f} MiB of SuperLink per MiB of checkpoint if both "
                f"replies were held at once (the ServerApp had them {apart:.1f} s apart), up to "
                f"{extra / (total / len(r['sizes']['experts'])):.1f} per MiB if one at a time."
            )
            nodes = r["islands_by_program"].get("flower-supernode", 0)
            nodes_port = by["port"]["islands_by_program"].get("flower-supernode", 0)
            text += (
                f" The two SuperNodes (without their ClientApps) peaked at {mib(nodes)} MiB together against "
                f"{mib(nodes_port)} MiB: {(nodes - nodes_port) / total:.1f} MiB per MiB of checkpoint they sent."
            )
        lines.append(text if text.endswith(".") else text + ".")
    for way in ("reply", "port"):
        if way in by and "ddm" in by:
            r, d = by[way], by["ddm"]
            serverapp = r["coordinator_by_program"].get("flwr-serverapp", 0)
            lines.append(
                f"{WAYS[way]}: coordinator side {mib(r['coordinator_peak'])} MiB (of which the ServerApp process, "
                f"which does the work serve does, {mib(serverapp)} MiB at its own peak) against ddm serve's "
                f"{mib(d['coordinator_peak'])} MiB ({r['coordinator_peak'] / d['coordinator_peak']:.2f}x)."
            )
    if by:
        parts = []
        for way, r in by.items():
            line = r["timeline"]
            signed = line["last_signed_s"]
            assembly = r["to_published_s"] - signed if signed is not None else None
            parts.append(
                f"{WAYS[way]} {secs(line['first_lease_s'])} s to the leases, {secs(signed)} s to the last expert "
                f"signed, then {secs(assembly)} s of assembly"
            )
        lines.append(
            "Time: the islands-to-published figure is mostly training and assembly, the same work every way; "
            "the transport shows in the time to the last expert signed; assembly is sampling the experts, training "
            "the router and signing, at the coordinator: " + "; ".join(parts) + "."
        )
    return lines


def write_report(args, command: str, info: dict, results: list[dict], total_s: float) -> None:
    rows = [row(r) for r in results]
    method = (
        f"Each way has a fresh home: `ddm-coordinator init --mode siloed --image-size 8 --channels 1 --experts 2 "
        f"--preset {args.preset} --steps {args.steps} --batch-size {args.batch_size} --router-steps "
        f"{args.router_steps} --router-samples {args.router_samples}` (the router has the experts' preset), and "
        "the same two silos (the digits, even ones at one site, odd at the other). Islands train on one CPU "
        "thread each. Flower: one `flower-superlink --insecure` and two `flower-supernode`s on loopback "
        "(tests/e2e/flower.py's Federation), `flwr run` of the app `ddm-coordinator flower-app` writes, run "
        f"config poll-s={args.poll_s}; 'flower, ddm port' adds listen=127.0.0.1:<free port> (TLS with the "
        "home's certificate, pinned through the Flower message). ddm: `ddm-coordinator serve` (TLS) and two "
        "`ddm-client join --once --threads 1`. "
        "'islands → published' runs from the `flwr run` (or the start of the `join` processes) to the "
        "'published' event in the registry; 'with federation / serve start' from the start of the SuperLink "
        "(or of `serve`); 'first lease' and 'last signed' are registry events, in seconds after the islands "
        "started. "
        "Peak RSS is sampled with psutil every 0.1 s. 'Coordinator side' is, for Flower, the SuperLink with all "
        "its descendants (Federation.superlink_peak_rss(): the SuperLink, the SuperExec and the ServerApp "
        "process, which does the coordinator's work; the sum of their RSS at one sample, so shared pages count "
        "twice), for ddm the `serve` process; 'SuperLink alone' is "
        "superlink_peak_rss(main_only=True), the relay that holds the messages. 'Islands' is the sum over both "
        "sites (a SuperNode with its ClientApp processes, or a `join` process), then each site's own peak. "
        "'Checkpoints via ddm's port' is from the coordinator's traffic counts (`status --json`): bytes of "
        "checkpoint that arrived through ddm's upload; 0 means the checkpoint came inside the Flower reply. "
        "'Verified': after the run, `ddm-coordinator serve` of the home and `ddm-client download` with a reader "
        "invite, which checks the manifest's signature against the pinned key and every file's digest; its "
        "time includes waiting for serve to listen."
    )
    parts = [
        "# Flower against ddm's own transport: one siloed ensemble, three ways\n",
        f"Generated by `{command}` on {dt.date.today().isoformat()}; the whole run took {total_s:.0f} s.\n",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['os']}; {info['software']}. "
        f"Load average when the bench started: {' '.join(f'{x:.2f}' for x in args.load_at_start)}; "
        f"when it ended: {' '.join(f'{x:.2f}' for x in args.load_at_end)} (its own islands and coordinator make"
        " about 2 of it).\n",
        method + "\n",
        "## Figures\n",
        table_md(HEADER, rows) + "\n",
        "Peak RSS by program (the sum over a program's processes at one sample; peaks of different programs "
        "may fall at different times):\n",
        *[programs_line(r) for r in results if "error" not in r],
        "",
        "Registry timeline, seconds after the islands started (leases granted, uploads begun: for a checkpoint "
        "in the Flower reply, when the ServerApp had the reply; experts signed; assembly begun: sampling the "
        "experts and training the router; published):\n",
        *[
            f"- {WAYS[r['way']]}: " + ", ".join(f"{k.removesuffix('_s')} {secs(v)}" for k, v in r["timeline"].items())
            for r in results
            if "timeline" in r
        ],
        "",
    ]
    errors = [(r["way"], line) for r in results for line in r.get("error_lines", [])]
    failed = [r for r in results if "error" in r]
    parts += ["## What went wrong\n"]
    if not errors and not failed:
        parts.append("No way failed; no ERROR, CRITICAL or Traceback line in any log.\n")
    for r in failed:
        parts.append(f"- {WAYS[r['way']]} failed:\n\n```\n{r['error'][-2000:]}\n```\n")
    for way, line in errors[:20]:
        parts.append(f"- {WAYS[way]}: `{line}`")
    parts += ["", "## Reading the figures\n"]
    parts += [f"- {line}" for line in interpretation(results)]
    parts += ["", args.notes or "", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(parts)).rstrip() + "\n"  # no run of blank lines
    (args.out / "flower.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S/2", help="expert (and router) preset: S/2 ~124 MiB, B/2 ~494 MiB")
    parser.add_argument("--steps", type=int, default=2, help="training steps per expert")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--router-steps", type=int, default=2)
    parser.add_argument("--router-samples", type=int, default=64, help="samples drawn from each expert for the router")
    parser.add_argument("--poll-s", type=float, default=0.5, help="the ServerApp's poll interval (run config poll-s)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which ways, in order, of {', '.join(WAYS)}")
    parser.add_argument("--timeout", type=float, default=1200.0, help="bound on each way's run, seconds")
    parser.add_argument("--quick", action="store_true", help="smoke run: --preset tiny --steps 2")
    parser.add_argument("--out", type=Path, default=REPO / "bench/reports", help="folder for flower.md and .json")
    parser.add_argument("--keep", type=Path, default=None, help="keep homes, logs and states in this folder")
    parser.add_argument("--notes", default="", help="a paragraph appended to the report as is")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps = "tiny", 2
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or any(w not in WAYS for w in ways):
        parser.error(f"--ways takes some of {', '.join(WAYS)}")

    args.load_at_start = os.getloadavg()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']}, {info['ram']}; {info['software']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in args.load_at_start)} (the machine may be shared)")
    command = "python bench/flower.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="ddm-flower-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        silos = make_silos(work)
        for way in ways:
            folder = work / way
            home = init_home(folder / "home", args)
            print(f"{WAYS[way]}: init {home['init_s']:.1f} s; running", flush=True)
            result = run_ddm(home, silos, folder, args) if way == "ddm" else run_flower(way, home, silos, folder, args)
            result["way"] = way
            result["init_s"] = home["init_s"]
            if "error" not in result:
                result["verify"] = verify(home, folder)
            result["error_lines"] = error_lines(result.pop("logs", []))
            results.append(result)
            if "error" in result:
                print(f"{WAYS[way]} failed: {result['error'][-2000:]}", flush=True)
            else:
                print(
                    f"{WAYS[way]}: published {result['to_published_s']:.1f} s after the islands started, "
                    f"coordinator side peak {mib(result['coordinator_peak'])} MiB, verified {result['verify']}",
                    flush=True,
                )
            for line in result["error_lines"][:10]:
                print(f"  {line}")
    total_s = time.perf_counter() - started
    args.load_at_end = os.getloadavg()
    print_table(f"{args.preset} experts, {args.steps} steps, batch {args.batch_size}", [row(r) for r in results])
    for line in interpretation(results):
        print(line)
    write_report(args, command, info, results, total_s)
    figures = {
        "command": command,
        "date": dt.date.today().isoformat(),
        "machine": info,
        "load_at_start": args.load_at_start,
        "load_at_end": args.load_at_end,
        "total_s": total_s,
        "settings": {k: getattr(args, k) for k in ("preset", "steps", "batch_size", "router_steps", "router_samples")},
        "results": results,
    }
    (args.out / "flower.json").write_text(json.dumps(figures, indent=1, default=str))
    print(f"report: {args.out / 'flower.md'}")
    if any("error" in r or not r.get("verify", {}).get("ok") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
