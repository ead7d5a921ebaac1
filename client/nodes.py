"""A lease's expert trained on the island's machine: in this process, or by N processes of it.

`ddm-client join --nproc-per-node N` (``JoinOptions.nproc_per_node``) trains the expert with
DDP over N local processes: N GPUs with ``--device cuda`` (rank r on cuda:r, NCCL), or N CPU
processes over gloo. Torch's own elastic launcher (``elastic_launch``, what ``torchrun`` runs)
starts them, with a standalone c10d rendezvous on a free localhost port, as ``torchrun
--standalone`` does. The global batch is the lease's ``batch_size``; each process computes
batch_size / N of its rows, and the update, the logged loss and the checkpoint are those of
one process (``ddm_model.distributed`` says how).

Only the join process talks to the coordinator; it is the launcher's agent, and no worker ever
opens a gRPC channel. The agent rather than rank 0, because:

- ``run_island``, the heartbeat, the upload and the outbox stay one code path for N = 1 and
  N > 1, and a worker is a training job that knows nothing of the network (no gRPC state
  crosses a process start);
- the agent outlives its workers: it heartbeats while they start, train and save, and when one
  crashes the launcher stops the others and the agent reports it in one line;
- the process group lives exactly as long as one expert's training: no worker waits in a
  collective while the island waits for work, downloads its data or uploads.

The agent and its workers share files in the expert's work folder (STATE/work/expert-N/node/),
and nothing is pickled:

- ``job.json``, what to train and where the checkpoint goes (``ExpertJob``); ``data.safetensors``,
  the training data, checked against its fingerprint by every worker;
- ``progress.json``, rank 0's step, loss and images per second after each log window, which
  the agent hands to the heartbeat;
- ``stop``, made by the agent when the lease is lost; the workers agree on it at the end of a
  log window, save their resume state and exit, as a single process does;
- ``error-R.txt``, rank R's one-line error, which the agent raises as its own.

Rank 0 alone writes the resume state (in STATE/work/expert-N/, where one process keeps it too,
so a run may resume with another N) and the checkpoint, in the format one process writes. A
worker whose agent dies (SIGKILL) exits within a fraction of a second, so a restarted island
never trains beside orphans.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from ddm_model.data import ImageDataset, load_dataset_file, save_dataset_file
from ddm_model.distributed import World, process_group
from ddm_model.dit import DiTConfig
from ddm_model.errors import DDMError
from ddm_model.privacy import DPConfig
from ddm_model.progress import console
from ddm_model.train import ProgressCallback, TrainConfig, TrainStopped, train_expert

JOB, DATA, PROGRESS, STOP = "job.json", "data.safetensors", "progress.json", "stop"
# What each worker runs: this very package (its folder replaces the working directory at the
# head of sys.path), whatever the working directory holds.
WORKER = "import sys; sys.path[0] = sys.argv[1]; from client.nodes import worker; worker(sys.argv[2])"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The signals torch's launcher turns into stopping the workers (LaunchConfig.signals_to_handle).
LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class NodeError(DDMError, RuntimeError):
    """Training that this machine's processes cannot do as asked, or that failed in a worker."""


def check_nproc(nproc: int, device: str) -> None:
    """Refuse, in one line, a number of processes this machine cannot run on ``device``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise NodeError(f"--nproc-per-node must be at least 1, got {nproc!r}")
    if nproc == 1:
        return
    if not torch.distributed.is_available():
        raise NodeError(f"--nproc-per-node {nproc} needs torch.distributed, which this PyTorch build lacks")
    if device == "cpu":
        if not torch.distributed.is_gloo_available():
            raise NodeError(f"--nproc-per-node {nproc} on the CPU needs gloo, which this PyTorch build lacks")
    elif device == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < nproc:
            raise NodeError(f"--nproc-per-node {nproc} with --device cuda needs {nproc} GPUs; this machine has {gpus}")
        if not torch.distributed.is_nccl_available():
            raise NodeError(f"--nproc-per-node {nproc} on CUDA needs NCCL, which this PyTorch build lacks")
    elif device.startswith("cuda:"):
        raise NodeError(
            f"--nproc-per-node {nproc} puts rank r on cuda:r: pass --device cuda, not {device}"
            " (CUDA_VISIBLE_DEVICES chooses which GPUs)"
        )
    else:
        raise NodeError(f"--nproc-per-node {nproc} runs on --device cpu or cuda, not {device!r}")


def split_error(batch_size: int, nproc: int) -> str | None:
    """Why a lease's global batch cannot be split over ``nproc`` processes, or None."""
    if batch_size % nproc == 0:
        return None
    return (
        f"the lease's batch of {batch_size} does not split evenly over --nproc-per-node {nproc}"
        " (each process takes batch/N samples); use a number of processes that divides it"
    )


@dataclass
class ExpertJob:
    """One expert's training: what to train, where its state and checkpoint go, and what the
    checkpoint's header says. The job.json every worker reads."""

    model: DiTConfig
    train: TrainConfig
    checkpoint_dir: Path  # the resume state
    out: Path  # the finished checkpoint
    description: str
    data_fingerprint: str  # of the training data, which every worker checks
    export_fingerprint: str  # what the checkpoint's header carries ("" for a siloed island)
    cluster_id: int
    metrics: dict | None = None
    threads: int | None = None  # CPU threads per process
    privacy: dict | None = None  # DP-SGD settings (ddm_model.privacy.DPConfig), or None

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model.to_dict(),
                "train": self.train.to_dict(),
                "checkpoint_dir": str(self.checkpoint_dir),
                "out": str(self.out),
                "description": self.description,
                "data_fingerprint": self.data_fingerprint,
                "export_fingerprint": self.export_fingerprint,
                "cluster_id": self.cluster_id,
                "metrics": self.metrics,
                "threads": self.threads,
                "privacy": self.privacy,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ExpertJob:
        data = json.loads(text)
        data["model"] = DiTConfig.from_dict(data["model"])
        data["train"] = TrainConfig.from_dict(data["train"])
        data["checkpoint_dir"], data["out"] = Path(data["checkpoint_dir"]), Path(data["out"])
        return cls(**data)


def run_job(
    job: ExpertJob,
    data: ImageDataset,
    world: World | None = None,
    on_progress: ProgressCallback | None = None,
    stop=None,
) -> Path:
    """Train ``job`` in this process, alone or as one of a ``world``'s; the main process shows
    the progress bar and writes the checkpoint. Returns its path. ``stop``: anything with
    ``is_set()``; setting it raises ``TrainStopped`` once the resume state is saved."""
    main = world is None or world.main
    result = train_expert(
        data,
        job.model,
        job.train,
        checkpoint_dir=job.checkpoint_dir,
        progress=main,
        description=job.description,
        on_progress=on_progress,
        stop=stop,
        world=world,
        privacy=None if job.privacy is None else DPConfig.from_dict(job.privacy),
    )
    if main:
        if result.resumed_from:
            console.print(f"{job.description}: resumed from local step {result.resumed_from}", highlight=False)
        result.export(job.out, job.export_fingerprint, cluster_id=job.cluster_id, metrics=job.metrics)
    return job.out


# ---------------------------------------------------------------------------------------------
# The agent: the join process, which launches the workers and relays between them and the island


def launch(
    job: ExpertJob,
    data: ImageDataset,
    nproc: int,
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Train ``job`` with DDP over ``nproc`` local processes started by torch's elastic launcher;
    returns the checkpoint rank 0 wrote. ``on_progress`` hears rank 0's progress; setting
    ``stop`` stops every worker at its next log window and raises ``TrainStopped``. A worker's
    error is raised here as one line (``NodeError``)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    folder = job.checkpoint_dir / "node"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        save_dataset_file(data, folder / DATA)
        (folder / JOB).write_text(job.to_json())
        job.out.unlink(missing_ok=True)  # only this run's checkpoint counts as its result
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"ddm-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a standalone rendezvous on a free port
            max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=os.devnull),  # workers write to this process's stdout and stderr
        )
        relay = Relay(folder, on_progress, stop)
        relay.start()
        try:
            with signals_restored(), quiet_launcher():
                elastic_launch(config, sys.executable)("-c", WORKER, str(PACKAGE_ROOT), str(folder / JOB))
        except ChildFailedError as failed:
            raise NodeError(failure_message(folder, failed, nproc)) from None
        finally:
            relay.close()
        if not job.out.exists():
            if stop is not None and stop.is_set():
                raise TrainStopped(f"{job.description}: stopped; the resume state is saved")
            raise NodeError(f"{job.description}: the {nproc} processes ended without writing the checkpoint")
        return job.out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Relay(threading.Thread):
    """The agent's side of the shared files: rank 0's progress goes to ``on_progress``, and a set
    ``stop`` becomes the stop file."""

    def __init__(self, folder: Path, on_progress: ProgressCallback | None, stop, every: float = 0.2):
        super().__init__(name="relay", daemon=True)
        self.folder, self.on_progress, self.stop, self.every = folder, on_progress, stop, every
        self.step = -1
        self._done = threading.Event()

    def poll(self) -> None:
        if self.stop is not None and self.stop.is_set():
            (self.folder / STOP).touch()
        try:
            report = json.loads((self.folder / PROGRESS).read_text())
        except (OSError, ValueError):
            return
        if report["step"] != self.step and self.on_progress is not None:
            self.on_progress(report["step"], report["loss"], report["rate"])
        self.step = report["step"]

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.poll()

    def close(self) -> None:
        self._done.set()
        self.join()
        self.poll()  # the last window's progress


@contextlib.contextmanager
def signals_restored() -> Iterator[None]:
    """The launcher turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into an exception that stops the
    workers. Afterwards this process's own handlers come back, and such a signal is delivered
    to it again, so that it ends as it would have without workers (a signal it ignores ends
    the training in one line instead: its workers are gone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from torch.distributed.elastic.multiprocessing import SignalException

    saved = {sig: signal.getsignal(sig) for sig in (getattr(signal, name) for name in LAUNCHER_SIGNALS)}

    def restore() -> None:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

    try:
        yield
    except SignalException as exc:
        restore()
        signal.raise_signal(exc.sigval)
        raise NodeError(f"training stopped: this process received {signal.Signals(exc.sigval).name}") from None
    finally:
        restore()


@contextlib.contextmanager
def quiet_launcher() -> Iterator[None]:
    """The launcher logs each worker's failure as a multi-line report, and a signal's arrival;
    the agent says what matters in one line instead (``failure_message``). Each of its modules
    sets its own logger's level, so each is quietened."""
    launcher = ("torch.distributed.elastic", "torch.distributed.launcher")
    names = [name for name in logging.root.manager.loggerDict if name.startswith(launcher)]
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def failure_message(folder: Path, failed, nproc: int) -> str:
    """The first worker's own error line, or else which rank ended how. When one rank dies the
    others fail in their next collective or are stopped by the launcher (SIGTERM): the rank
    killed by another signal is the likelier cause, then one that exited with an error."""
    for rank in range(nproc):
        path = folder / f"error-{rank}.txt"
        if path.exists():
            return path.read_text().strip()

    def suspicion(item) -> tuple[int, int]:
        rank, failure = item
        code = failure.exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2), rank

    rank, failure = min(failed.failures.items(), key=suspicion)
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return f"training on {nproc} processes failed: rank {rank} ended with {how} (its output is above)"


# ---------------------------------------------------------------------------------------------
# A worker: one rank of the group


class FileFlag:
    """Set once its file exists: the stop flag the agent raises for its workers."""

    def __init__(self, path: Path):
        self.path = path

    def is_set(self) -> bool:
        return self.path.exists()


def exit_with_parent(every: float = 0.2) -> None:
    """End this process as soon as the one that started it (the agent) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def progress_writer(path: Path) -> ProgressCallback:
    def write(step: int, loss: float, rate: float) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "loss": loss, "rate": rate}))
        os.replace(tmp, path)

    return write


def worker(job_file: str) -> NoReturn:
    """One rank: join the group, train the job's expert on its share of each batch, and (rank
    0) write the checkpoint. A stopped run exits 0 without one; an error a user can cause goes
    to error-RANK.txt for the agent and exits 1; any other is printed and exits 1.

    The process ends with os._exit once its files are written (fsynced) and its group is gone:
    at interpreter exit gloo's threads may still hold tensors whose release then aborts the
    process (SIGABRT, "terminate called without an active exception"), which the agent would
    report as a failed run; this was seen in about one run in six on a busy machine."""
    exit_with_parent()
    try:
        code = train_rank(job_file)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_rank(job_file: str) -> int:
    """The rank's work (``worker``); returns its exit code."""
    folder = Path(job_file).parent
    rank = os.environ.get("RANK", "0")
    try:
        job = ExpertJob.from_json(Path(job_file).read_text())
        if job.threads:
            torch.set_num_threads(job.threads)
        data = load_dataset_file(folder / DATA, expect_fingerprint=job.data_fingerprint)
        with process_group(job.train.device) as world:
            job.train.device = str(world.device)
            writer = progress_writer(folder / PROGRESS) if world.main else None
            run_job(job, data, world, on_progress=writer, stop=FileFlag(folder / STOP))
    except TrainStopped:
        return 0
    except KeyboardInterrupt:  # the agent was interrupted and passed it on: it reports it
        return 128 + signal.SIGINT
    except DDMError as exc:
        (folder / f"error-{rank}.txt").write_text(str(exc))
        return 1
    return 0
