"""The training loop: learning, isolation, exact resume (in process and after SIGKILL), FLOPs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddm_model.dit import DiTConfig
from ddm_model.flow import ALL_ROWS
from ddm_model.train import RESUME_FILE, TrainConfig, TrainError, train_expert

REPO = Path(__file__).resolve().parents[2]


def small_cfg(**kw):
    base = dict(steps=20, batch_size=16, lr=2e-3, warmup=5, checkpoint_every=5, log_every=5, seed=3)
    return TrainConfig(**{**base, **kw})


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_loss_goes_down(digits):
    shard = digits.subset(range(300))
    result = train_expert(shard, DiTConfig("tiny", 8, 1), small_cfg(steps=150, lr=3e-3, log_every=10), progress=False)
    assert result.steps == 150 and len(result.losses) == 15
    assert sum(result.losses[-3:]) / 3 < 0.8 * sum(result.losses[:3]) / 3
    assert result.flops == 150 * result.flops_per_step > 0


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits, tmp_path):
    shard = digits.subset(range(200))
    cfg = DiTConfig("tiny", 8, 1, num_classes=10)
    straight = train_expert(shard, cfg, small_cfg(), tmp_path / "a", progress=False)
    first = train_expert(shard, cfg, small_cfg(steps=10), tmp_path / "b", progress=False)
    assert first.steps == 10
    resumed = train_expert(shard, cfg, small_cfg(), tmp_path / "b", progress=False)
    assert resumed.steps == 20
    assert_same_weights(straight.model, resumed.model)  # EMA weights
    a = torch.load(tmp_path / "a" / RESUME_FILE, weights_only=True)
    b = torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name])
    assert torch.equal(a["rng"], b["rng"])
    assert a["losses"] == b["losses"]
    # and a different seed really gives different weights (the comparison above has teeth)
    other = train_expert(shard, cfg, small_cfg(seed=4), None, progress=False)
    assert not torch.equal(other.model.state_dict()["out.weight"], straight.model.state_dict()["out.weight"])


def test_a_finished_run_is_not_trained_again(digits, tmp_path):
    shard = digits.subset(range(100))
    cfg = DiTConfig("tiny", 8, 1)
    done = train_expert(shard, cfg, small_cfg(steps=10), tmp_path, progress=False)
    again = train_expert(shard, cfg, small_cfg(steps=10), tmp_path, progress=False)
    assert again.steps == 10 and again.seconds == 0.0
    assert_same_weights(done.model, again.model)


def test_resume_refuses_a_different_run(digits, tmp_path):
    shard = digits.subset(range(100))
    train_expert(shard, DiTConfig("tiny", 8, 1), small_cfg(steps=5), tmp_path, progress=False)
    with pytest.raises(TrainError, match="different run"):
        train_expert(shard, DiTConfig("tiny", 8, 1), small_cfg(steps=10, lr=1e-2), tmp_path, progress=False)
    with pytest.raises(TrainError, match="different run"):
        train_expert(
            digits.subset(range(1, 101)), DiTConfig("tiny", 8, 1), small_cfg(steps=10), tmp_path, progress=False
        )


def poison(monkeypatch, at_step, bad):
    """Replace the loss of training step ``at_step`` (counted from 0) by ``bad(model, loss)``."""
    from ddm_model import train as train_module

    original = train_module.flow_matching_loss
    calls = []

    def spy(model, x1, times, generator, y=None, rows=ALL_ROWS):
        loss = original(model, x1, times, generator, y, rows)
        calls.append(loss)
        return bad(model, loss) if len(calls) == at_step + 2 else loss  # the first call measures FLOPs

    monkeypatch.setattr(train_module, "flow_matching_loss", spy)


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_loss_gone_non_finite_mid_window_stops_the_run_and_nothing_past_it_is_saved(digits, tmp_path, monkeypatch):
    """The loss is checked at the end of each log window and before each resume file, not every
    step: a NaN at step 6 of the window 5..9 is caught before the resume file due at step 8."""
    shard = digits.subset(range(200))
    cfg = DiTConfig("tiny", 8, 1)
    train = small_cfg(log_every=5, checkpoint_every=4)
    poison(monkeypatch, 6, lambda model, loss: loss * float("nan"))  # NaN gradients: the weights go NaN too
    with pytest.raises(TrainError, match=r"^expert: loss became nan at step 6; lower the learning rate$"):
        train_expert(shard, cfg, train, tmp_path / "bad", progress=False)
    state = torch.load(tmp_path / "bad" / RESUME_FILE, weights_only=True)
    assert state["step"] == 4  # the last resume file before the bad step stays
    assert all_finite(state["model"].values()) and all_finite(state["ema"].values())
    assert all(all_finite(moments.values()) for moments in state["optimizer"]["state"].values())
    # and it is usable: resumed, it gives the weights of a run that never went bad
    monkeypatch.undo()
    resumed = train_expert(shard, cfg, train, tmp_path / "bad", progress=False)
    straight = train_expert(shard, cfg, train, tmp_path / "good", progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 20
    assert_same_weights(straight.model, resumed.model)


def test_weights_gone_non_finite_under_a_finite_loss_are_neither_saved_nor_returned(digits, tmp_path, monkeypatch):
    def nan_gradient(model, loss):
        # sqrt(0) adds nothing to the loss, but its slope is infinite: the gradient is inf * 0 = NaN
        return loss + (next(model.parameters()) * 0).sum().sqrt()

    shard = digits.subset(range(100))
    cfg = DiTConfig("tiny", 8, 1)
    poison(monkeypatch, 9, nan_gradient)  # the last step: no later loss shows it
    message = r"^expert: the weights became non-finite by step 10; lower the learning rate$"
    with pytest.raises(TrainError, match=message):
        train_expert(shard, cfg, small_cfg(steps=10, checkpoint_every=5), tmp_path, progress=False)
    state = torch.load(tmp_path / RESUME_FILE, weights_only=True)
    assert state["step"] == 5 and all_finite(state["model"].values()) and all_finite(state["ema"].values())
    monkeypatch.undo()
    poison(monkeypatch, 9, nan_gradient)
    with pytest.raises(TrainError, match=message):  # without a resume file: nothing is returned
        train_expert(shard, cfg, small_cfg(steps=10, checkpoint_every=0), None, progress=False)


KILL_SCRIPT = """
import sys
from ddm_model.data import load_digits
from ddm_model.dit import DiTConfig
from ddm_model.train import TrainConfig, train_expert
from ddm_model.checkpoint import save_checkpoint
out = sys.argv[1]
shard = load_digits().subset(range(200))
cfg = TrainConfig(steps=int(sys.argv[2]), batch_size=16, lr=2e-3, warmup=5, checkpoint_every=10, seed=3)
result = train_expert(shard, DiTConfig("tiny", 8, 1), cfg, out, progress=False)
save_checkpoint(out + "/final.safetensors", result.model, steps=result.steps)
"""


def run_script(out, steps):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(steps)], env=env)


@pytest.mark.slow  # a real process killed mid-run and resumed: about 15 s
def test_training_killed_with_sigkill_resumes_exactly(tmp_path):
    from ddm_model.checkpoint import load_checkpoint

    steps = 400
    assert run_script(tmp_path / "straight", steps).wait(timeout=240) == 0
    victim = run_script(tmp_path / "killed", steps)
    resume = tmp_path / "killed" / RESUME_FILE
    deadline = time.time() + 120
    while time.time() < deadline:
        if resume.exists():
            step = torch.load(resume, weights_only=True)["step"]
            if step >= 20:
                break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = torch.load(resume, weights_only=True)["step"]
    assert 20 <= killed_at < steps, "the run must be killed part-way through"
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    assert run_script(tmp_path / "killed", steps).wait(timeout=240) == 0
    a, _ = load_checkpoint(tmp_path / "straight" / "final.safetensors")
    b, _ = load_checkpoint(tmp_path / "killed" / "final.safetensors")
    assert_same_weights(a, b)


def test_expert_sees_only_its_shard(digits, monkeypatch):
    """The loop is given copies of one cluster's samples: nothing else is reachable from it."""
    shard = digits.subset([5, 6, 7])
    assert shard.images.untyped_storage().data_ptr() != digits.images.untyped_storage().data_ptr()
    assert shard.images.untyped_storage().nbytes() == 3 * 64 * 4
    seen = []
    from ddm_model import train as train_module

    original = train_module.flow_matching_loss

    def spy(model, x1, times, generator, y=None, rows=ALL_ROWS):
        seen.append(x1.clone())
        return original(model, x1, times, generator, y, rows)

    monkeypatch.setattr(train_module, "flow_matching_loss", spy)
    train_expert(shard, DiTConfig("tiny", 8, 1), small_cfg(steps=5, checkpoint_every=0), progress=False)
    allowed = {tuple(img.flatten().tolist()) for img in shard.images}
    batches = seen[1:]  # the first call measures FLOPs on the same data
    assert batches and all(tuple(img.flatten().tolist()) in allowed for batch in batches for img in batch)


def test_clear_errors_for_mismatched_data(digits):
    with pytest.raises(TrainError, match="model expects 1x16x16"):
        train_expert(digits, DiTConfig("tiny", 16, 1), small_cfg(), progress=False)
    with pytest.raises(TrainError, match="no labels"):
        train_expert(digits.without_labels(), DiTConfig("tiny", 8, 1, num_classes=10), small_cfg(), progress=False)
