"""An island's expert trained by N local processes (client/nodes.py, ddm_model/distributed.py).

The fast tests check the arithmetic in one process (the parts of a split batch draw and
average to the whole batch) and the refusals. The slow ones launch real gloo processes
through torch's elastic launcher, with this test process as their agent (or a child process,
where it is SIGKILLed): two ranks against one process, the checkpoint, a stop and a kill
followed by a resume, a worker's error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.cli import app
from client.nodes import ExpertJob, NodeError, check_nproc, launch, run_job, split_error
from ddm_model.checkpoint import load_checkpoint, read_checkpoint_header
from ddm_model.data import save_dataset_file
from ddm_model.distributed import DistributedError, World, per_process
from ddm_model.dit import DiT, DiTConfig
from ddm_model.flow import TimeSampler, noised
from ddm_model.train import RESUME_FILE, TrainConfig, TrainStopped, expert_objective, seeded
from tests.helpers import one_line_error

REPO = Path(__file__).resolve().parents[2]
MODEL = DiTConfig("tiny", 8, 1, num_classes=10)
STEPS = 60
# Long enough that a stop or a kill lands part-way even at full speed (about 150 steps a second
# on an idle 2-core CPU), however late the stop is relayed.
LONG = 600
# The loss trajectory of 2 gloo ranks against one process at the same global batch: measured
# max relative difference 2.8e-7 over 40 steps and 60 steps (this machine, torch 2.13 CPU);
# the tolerance is 30x that.
LOSS_RTOL = 1e-5


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=16, lr=2e-3, warmup=5, checkpoint_every=5, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def make_job(folder: Path, data, **kw) -> ExpertJob:
    fingerprint = data.fingerprint()
    return ExpertJob(
        model=MODEL,
        train=train_cfg(**kw),
        checkpoint_dir=folder,
        out=folder / "expert.safetensors",
        description="expert 0",
        data_fingerprint=fingerprint,
        export_fingerprint=fingerprint,
        cluster_id=0,
        threads=1,
    )


def resume_state(job: ExpertJob) -> dict:
    return torch.load(job.checkpoint_dir / RESUME_FILE, weights_only=True)


# -- fast: the arithmetic, in one process ------------------------------------------------------------


def test_the_rows_of_a_split_batch_draw_what_one_process_draws():
    x1 = torch.randn(12, 1, 8, 8)
    whole = noised(x1, TimeSampler(), torch.Generator().manual_seed(5))
    parts = [noised(x1, TimeSampler(), torch.Generator().manual_seed(5), World(r, 3, torch.device("cpu")).rows(12))
             for r in range(3)]  # fmt: skip
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([part[i] for part in parts]))


def test_the_mean_of_the_parts_gradients_is_the_whole_batch_gradient():
    """What DDP computes (the mean over ranks of each rank's gradient on its rows) against one
    process's gradient on the whole batch, with label dropout drawn for the whole batch."""
    model = seeded(DiT, MODEL, 0)
    objective = expert_objective(MODEL, TimeSampler())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def gradient(rows):
        model.zero_grad()
        loss = objective(model, x, y, torch.Generator().manual_seed(1), rows)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole_loss, whole = gradient(slice(None))
    parts = [gradient(World(r, 2, torch.device("cpu")).rows(16)) for r in range(2)]
    assert torch.allclose((parts[0][0] + parts[1][0]) / 2, whole_loss, rtol=1e-6)
    for g, a, b in zip(whole, parts[0][1], parts[1][1], strict=True):
        assert torch.allclose((a + b) / 2, g, rtol=1e-4, atol=1e-7)


def test_a_batch_is_split_into_equal_contiguous_rows_or_refused():
    rows = [World(r, 4, torch.device("cpu")).rows(16) for r in range(4)]
    assert [(s.start, s.stop) for s in rows] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    with pytest.raises(DistributedError) as excinfo:
        per_process(15, 2)
    assert one_line_error(excinfo) == "a batch of 15 does not split evenly over 2 processes"
    assert split_error(16, 2) is None and split_error(16, 1) is None
    assert "batch of 15 does not split evenly over --nproc-per-node 2" in split_error(15, 2)


@pytest.mark.parametrize(
    ("nproc", "device", "says"),
    [
        (0, "cpu", "--nproc-per-node must be at least 1, got 0"),
        (-2, "cuda", "--nproc-per-node must be at least 1, got -2"),
        (2, "cuda", "--nproc-per-node 2 with --device cuda needs 2 GPUs; this machine has"),
        (2, "cuda:1", "pass --device cuda, not cuda:1"),
        (2, "mps", "runs on --device cpu or cuda, not 'mps'"),
    ],
)
def test_a_number_of_processes_the_machine_cannot_run_is_refused_in_one_line(nproc, device, says):
    if device == "cuda" and nproc == 2 and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    with pytest.raises(NodeError) as excinfo:
        check_nproc(nproc, device)
    assert says in one_line_error(excinfo)
    check_nproc(1, "cpu")
    check_nproc(2, "cpu")


@pytest.mark.parametrize("nproc", ["0", "-3"])
def test_join_refuses_a_bad_nproc_before_touching_anything(nproc, tmp_path):
    state = tmp_path / "state"
    args = ["join", "--coordinator", "127.0.0.1:1", "--state-dir", str(state), "--insecure", "--nproc-per-node", nproc]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: --nproc-per-node must be at least 1, got {nproc}"]
    assert not state.exists()


def test_an_expert_job_travels_as_json(digits, tmp_path):
    job = make_job(tmp_path, digits.subset(range(40)))
    job.metrics = {"counts": {"samples": 40}}
    assert ExpertJob.from_json(job.to_json()) == job


# -- slow: real gloo processes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    """One process and two gloo ranks, each trained without interruption on the same shard."""
    root = tmp_path_factory.mktemp("straight")
    data = digits.subset(range(300))
    one, two = make_job(root / "one", data), make_job(root / "two", data)
    started = time.perf_counter()
    run_job(one, data)
    one_seconds = time.perf_counter() - started
    reports = []
    started = time.perf_counter()
    launch(two, data, 2, on_progress=lambda *report: reports.append(report))
    two_seconds = time.perf_counter() - started
    print(f"\n{STEPS} steps: one process {one_seconds:.1f} s, two gloo ranks {two_seconds:.1f} s (with their start)")
    return data, one, two, reports


@pytest.fixture(scope="module")
def uninterrupted(straight, tmp_path_factory):
    """A longer two-rank run, the reference of the interrupted ones."""
    data = straight[0]
    job = make_job(tmp_path_factory.mktemp("uninterrupted"), data, steps=LONG)
    launch(job, data, 2)
    return data, job


@pytest.mark.slow
def test_two_gloo_ranks_follow_the_single_process_trajectory(straight):
    """Measured on this machine: the per-step losses differ by at most 2.8e-7 (relative); the
    weights by at most 2e-7, except the attention's key bias, whose gradient is zero in exact
    arithmetic (softmax ignores a shift shared by all keys): there AdamW turns rounding noise
    into steps of the learning rate's size, different in each run and with no effect on the
    output, so the models are compared by their output (measured gap 1.3e-6 of 2.8)."""
    _, one, two, reports = straight
    a, b = resume_state(one), resume_state(two)
    assert a["step"] == b["step"] == STEPS and len(a["losses"]) == STEPS
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    print(f"max relative loss difference: {np.max(np.abs(la - lb) / np.abs(la)):.2e}")
    np.testing.assert_allclose(lb, la, rtol=LOSS_RTOL)
    assert la[-5:].mean() < 0.8 * la[:5].mean()  # it learned: the comparison is not of two flat lines
    assert torch.equal(a["rng"], b["rng"])  # every random number drawn, drawn alike
    # What the heartbeat heard from rank 0 is the global batch's loss, as one process reports it.
    assert reports and reports[-1][0] == STEPS
    for step, loss, rate in reports:
        assert loss == pytest.approx(la[step - 1], rel=LOSS_RTOL) and rate > 0

    for name, wa in a["model"].items():
        wa, wb = wa.clone(), b["model"][name].clone()
        if name.endswith("attn.qkv.bias"):
            third = wa.shape[0] // 3
            key_bias = slice(third, 2 * third)
            wa[key_bias], wb[key_bias] = 0, 0
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-5, msg=name)
    ma, _ = load_checkpoint(one.out)
    mb, _ = load_checkpoint(two.out)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 1, 8, 8, generator=g), torch.rand(64, generator=g)
    y = torch.randint(0, MODEL.num_classes + 1, (64,), generator=g)  # the null label too
    with torch.no_grad():
        torch.testing.assert_close(mb(x, t, y), ma(x, t, y), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_two_rank_checkpoint_is_one_process_checkpoint(straight):
    data, one, two, _ = straight
    expect = dict(expect_kind="expert", expect_config=MODEL.to_dict())
    _, ia = load_checkpoint(one.out, **expect)
    _, ib = load_checkpoint(two.out, **expect)
    (_, ta), (_, tb) = read_checkpoint_header(one.out), read_checkpoint_header(two.out)
    assert ta == tb and not any(name.startswith("module.") for name in tb)
    assert (ib.kind, ib.model, ib.cluster_id, ib.steps, ib.flops, ib.data_fingerprint) == (
        ia.kind, ia.model, ia.cluster_id, ia.steps, ia.flops, ia.data_fingerprint
    )  # fmt: skip
    assert ib.data_fingerprint == data.fingerprint() and ib.steps == STEPS
    assert ib.metrics.keys() == ia.metrics.keys() == {"final_loss"}
    assert ib.metrics["final_loss"] == pytest.approx(ia.metrics["final_loss"], rel=LOSS_RTOL)
    assert not (two.checkpoint_dir / "node").exists()  # the shared files are gone


def assert_same_run(a: ExpertJob, b: ExpertJob) -> None:
    """Two runs of two ranks, one of them interrupted: the same losses, bit for bit, and the
    same weights, model and EMA."""
    sa, sb = resume_state(a), resume_state(b)
    assert sa["losses"] == sb["losses"] and torch.equal(sa["rng"], sb["rng"])
    for part in ("model", "ema", "optimizer"):
        torch.testing.assert_close(sb[part], sa[part], rtol=0, atol=0)
    ma, _ = load_checkpoint(a.out)
    mb, _ = load_checkpoint(b.out)
    torch.testing.assert_close(mb.state_dict(), ma.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
def test_a_stopped_two_rank_run_resumes_to_the_uninterrupted_run(uninterrupted, tmp_path):
    """The stop (a lost lease) is set on the agent; both ranks stop at the same step, save, and
    a second launch continues to the weights of the run that never stopped."""
    data, reference = uninterrupted
    job = make_job(tmp_path / "stopped", data, steps=LONG)
    stop = threading.Event()

    def stop_at_20(step, loss, rate):
        if step >= 20:
            stop.set()

    with pytest.raises(TrainStopped):
        launch(job, data, 2, on_progress=stop_at_20, stop=stop)
    stopped_at = resume_state(job)["step"]
    assert 20 <= stopped_at < LONG and not job.out.exists()
    launch(job, data, 2)
    assert_same_run(reference, job)


AGENT = """
import sys
from pathlib import Path
from client.nodes import ExpertJob, launch
from ddm_model.data import load_dataset_file
launch(ExpertJob.from_json(Path(sys.argv[1]).read_text()), load_dataset_file(sys.argv[2]), 2)
"""


def saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return None  # not there yet, or replaced while reading


@pytest.mark.slow
def test_a_killed_agent_takes_its_workers_along_and_the_run_resumes(uninterrupted, tmp_path):
    import psutil

    data, reference = uninterrupted
    job = make_job(tmp_path / "killed", data, steps=LONG)
    (tmp_path / "job.json").write_text(job.to_json())
    save_dataset_file(data, tmp_path / "data.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, tmp_path / "job.json", tmp_path / "data.safetensors"], env=env
    )
    resume = job.checkpoint_dir / RESUME_FILE
    deadline = time.monotonic() + 120
    while (saved_step(resume) or 0) < 10:
        assert agent.poll() is None and time.monotonic() < deadline, "the run must be killed part-way through"
        time.sleep(0.02)
    workers = psutil.Process(agent.pid).children(recursive=True)
    assert len(workers) == 2
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "orphaned workers kept training"
    killed_at = saved_step(resume)
    assert 10 <= killed_at < LONG and not job.out.exists()

    launch(job, data, 2)
    assert_same_run(reference, job)


@pytest.mark.slow
def test_a_workers_error_reaches_the_agent_as_one_line(straight, tmp_path):
    """Every rank refuses a resume file of another run at once; none waits for the others."""
    data, one, _, _ = straight
    job = make_job(tmp_path, data, seed=4)  # another seed: another run
    tmp_path.joinpath(RESUME_FILE).write_bytes((one.checkpoint_dir / RESUME_FILE).read_bytes())
    with pytest.raises(NodeError) as excinfo:
        launch(job, data, 2)
    assert "belongs to a different run" in one_line_error(excinfo)
    assert not job.out.exists()


@pytest.mark.slow
def test_a_worker_killed_ends_the_run_in_one_line(uninterrupted, tmp_path):
    """Rank 1 dies (SIGKILL) mid-run: the launcher stops rank 0, which would otherwise wait in
    its next all-reduce, and the agent names the rank and how it ended."""
    import psutil

    data, _ = uninterrupted
    job = make_job(tmp_path, data, steps=LONG)

    def kill_rank_1(step, loss, rate):
        if step >= 10:
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.environ().get("RANK") == "1":
                        child.kill()

    with pytest.raises(NodeError) as excinfo:
        launch(job, data, 2, on_progress=kill_rank_1)
    assert one_line_error(excinfo) == (
        "training on 2 processes failed: rank 1 ended with signal SIGKILL (its output is above)"
    )
    assert not job.out.exists() and not (job.checkpoint_dir / "node").exists()


@pytest.mark.slow
def test_a_run_resumes_with_another_number_of_processes(straight, tmp_path):
    """Two ranks train the first half, one process the second (the step budget may grow on a
    resume): the losses are those of one process throughout, within the same tolerance."""
    data, one, _, _ = straight
    job = make_job(tmp_path, data, steps=STEPS // 2)
    launch(job, data, 2)
    job.train.steps = STEPS
    run_job(job, data)
    a, b = resume_state(one), resume_state(job)
    assert b["step"] == STEPS
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=LOSS_RTOL)
