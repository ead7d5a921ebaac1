"""One expert trained by one process and by N processes (`join --nproc-per-node N`) at the same
global batch and seed: the wall time of each (with the N processes' start), their training
speed once started, and the largest relative difference between their per-step losses and
the first single-process run's. Prints a table; asserts nothing.

    python bench/nodes.py                                   # tiny DiT on digits, 2 gloo processes
    python bench/nodes.py --preset small --steps 300 --seeds 0 1 2
    python bench/nodes.py --single-threads 1 2              # one process on 1, then 2 CPU threads
    python bench/nodes.py --device cuda --nproc 8 --preset B/2 --batch-size 256

Both runs go through client.nodes, as an island's do: run_job in this process, launch for the
N workers (torch's elastic launcher, gloo on the CPU, NCCL on CUDA). The speed is measured
between the first and the last progress report (rank 0's, relayed through its file for the
N processes), so it leaves out the start.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.nodes import ExpertJob, launch, run_job
from ddm_model.data import load_digits
from ddm_model.dit import DiTConfig
from ddm_model.train import RESUME_FILE, TrainConfig

console = Console(width=130)


def timed(train) -> tuple[float, float]:
    """(wall seconds, steps per second between the first and the last progress report)."""
    reports = []
    started = time.perf_counter()
    train(lambda step, loss, rate: reports.append((time.perf_counter(), step)))
    wall = time.perf_counter() - started
    (t0, s0), (t1, s1) = reports[0], reports[-1]
    return wall, (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--class-conditional", action="store_true")
    parser.add_argument(
        "--single-threads", type=int, nargs="+", help="CPU threads of the one-process runs (default: all)"
    )
    args = parser.parse_args()

    data = load_digits()
    model = DiTConfig(args.preset, data.image_size, data.channels, num_classes=10 if args.class_conditional else 0)
    threads = torch.get_num_threads()
    runs = [(1, t) for t in args.single_threads or [threads]] + [(args.nproc, max(1, threads // args.nproc))]
    table = Table(title=f"{args.preset} DiT on digits, {args.steps} steps at a global batch of {args.batch_size}")
    for column in ("seed", "processes", "threads each", "wall s", "steps/s", "max rel. loss diff"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = dict(steps=args.steps, batch_size=args.batch_size, checkpoint_every=0, log_every=1, seed=seed)
            first = None
            for n, n_threads in runs:
                folder = Path(tmp) / f"seed{seed}-n{n}-t{n_threads}"
                device = args.device if n > 1 or args.device == "cpu" else f"{args.device}:0"
                job = ExpertJob(
                    model=model,
                    train=TrainConfig(**cfg, device=device),
                    checkpoint_dir=folder,
                    out=folder / "expert.safetensors",
                    description=f"seed {seed}, {n} process{'es' if n > 1 else ''}",
                    data_fingerprint=data.fingerprint(),
                    export_fingerprint="",
                    cluster_id=0,
                    threads=n_threads,
                )
                if n == 1:
                    torch.set_num_threads(n_threads)
                    wall, speed = timed(lambda report, job=job: run_job(job, data, on_progress=report))
                    torch.set_num_threads(threads)
                else:
                    wall, speed = timed(lambda report, job=job, n=n: launch(job, data, n, on_progress=report))
                losses = np.array(torch.load(folder / RESUME_FILE, weights_only=True)["losses"])
                first = losses if first is None else first
                gap = np.max(np.abs(losses - first) / np.abs(first))
                table.add_row(*map(str, (seed, n, n_threads)), f"{wall:.1f}", f"{speed:.1f}", f"{gap:.1e}")
    console.print(table)
    console.print(f"torch {torch.__version__}, {threads} CPU threads")


if __name__ == "__main__":
    main()
