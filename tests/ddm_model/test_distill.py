"""Distillation: the student follows exact teachers, teachers run sparsely on their own rows
only, the FLOP count includes them, and a run resumes exactly."""

import pytest
import torch

from ddm_model.checkpoint import CheckpointError, load_checkpoint
from ddm_model.data import ImageDataset
from ddm_model.distill import teacher_gap, teacher_velocity, train_student
from ddm_model.dit import DiT, DiTConfig
from ddm_model.flops import count_flops
from ddm_model.flow import TimeSampler, noised
from ddm_model.train import TrainConfig, TrainError, seeded, train_expert
from tests.mixture import GaussianMixture

SIDE = 4  # 1x4x4 images: a 16-dimensional Gaussian mixture


def image_mixture() -> GaussianMixture:
    pattern = torch.linspace(-1, 1, SIDE * SIDE)
    return GaussianMixture(
        means=torch.stack([0.6 * pattern, -0.6 * pattern.flip(0)]),
        stds=torch.tensor([0.15, 0.25]),
        weights=torch.tensor([0.5, 0.5]),
    )


def as_images(flat: torch.Tensor) -> torch.Tensor:
    return flat.float().view(-1, 1, SIDE, SIDE)


def exact_teachers(mixture: GaussianMixture):
    """Each component's exact velocity, on images."""
    return [
        lambda x, t, k=k: as_images(mixture.component_velocity(k, x.flatten(1).double(), t)) for k in range(mixture.k)
    ]


def mixture_data(n: int, seed: int = 0):
    mixture = image_mixture()
    flat, component = mixture.sample(n, torch.Generator().manual_seed(seed))
    return mixture, ImageDataset(as_images(flat), torch.arange(n), name="mixture"), component


def settings(**kw):
    base = dict(steps=20, batch_size=32, lr=3e-3, warmup=10, checkpoint_every=5, log_every=10, seed=1)
    return TrainConfig(**{**base, **kw})


def test_the_student_learns_the_exact_ensemble_velocity():
    mixture, data, component = mixture_data(512)
    teachers = exact_teachers(mixture)
    cfg = DiTConfig("tiny", SIDE, 1)
    result = train_student(
        data, component, teachers, ["a", "b"], cfg, settings(steps=100, log_every=20), data_weight=0.0, progress=False
    )
    assert result.losses[-1] < 0.1 * result.losses[0]
    untrained = seeded(DiT, cfg, 1).eval()
    times = TimeSampler()
    before = teacher_gap(untrained, teachers, data.images, component, times, seed=5)
    after = teacher_gap(result.model, teachers, data.images, component, times, seed=5)
    assert after < 0.1 * before

    # The student aims at the marginal velocity sum_k p(k | x_t) v_k, known here in closed form.
    generator = torch.Generator().manual_seed(9)
    xt, t, _ = noised(data.images[:256], times, generator)
    exact = as_images(mixture.global_velocity(xt.flatten(1), t))
    with torch.no_grad():
        student_error = (result.model(xt, t) - exact).pow(2).mean().item()
        untrained_error = (untrained(xt, t) - exact).pow(2).mean().item()
    assert student_error < 0.1 * untrained_error


def test_each_teacher_runs_once_on_exactly_its_rows():
    calls = []

    def teacher(k):
        def velocity(x, t):
            calls.append((k, x.shape[0]))
            return torch.full_like(x, float(k + 1))

        return velocity

    x = torch.randn(10, 1, SIDE, SIDE)
    teacher_of = torch.tensor([2, 0, 2, 2, 1, 0, 2, 2, 0, 2])
    v = teacher_velocity([teacher(0), teacher(1), teacher(2), teacher(3)], x, torch.rand(10), teacher_of)
    assert sorted(calls) == [(0, 3), (1, 1), (2, 6)]  # teacher 3 has no row and never runs
    assert torch.equal(v[:, 0, 0, 0], (teacher_of + 1).float())


def test_training_flops_include_the_teacher_forward_passes():
    _, data, component = mixture_data(64)
    cfg = DiTConfig("tiny", SIDE, 1)
    teachers = [seeded(DiT, cfg, 10 + k).eval() for k in range(2)]
    student_step = train_student(data, component, teachers, ["a", "b"], cfg, settings(steps=0), progress=False)
    expert_step = train_expert(data, cfg, settings(steps=0), progress=False)
    x, t = torch.randn(32, 1, SIDE, SIDE), torch.rand(32)
    with torch.no_grad():
        teacher_forward = count_flops(lambda: teachers[0](x, t))
    assert teacher_forward > 0
    assert student_step.flops_per_step == expert_step.flops_per_step + teacher_forward


def test_a_distillation_resumes_exactly_and_only_with_its_own_teachers(tmp_path):
    _, data, component = mixture_data(128)
    cfg = DiTConfig("tiny", SIDE, 1)
    teachers = [seeded(DiT, cfg, 10 + k).eval() for k in range(2)]

    def run(steps, folder, ids=("a", "b")):
        return train_student(
            data, component, teachers, list(ids), cfg, settings(steps=steps), 0.25, folder, progress=False
        )

    straight = run(20, tmp_path / "a")
    assert run(10, tmp_path / "b").steps == 10
    resumed = run(20, tmp_path / "b")
    assert resumed.resumed_from == 10 and resumed.steps == 20
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    with pytest.raises(TrainError, match="different run"):
        run(30, tmp_path / "b", ids=("a", "c"))

    # Saved as a student: it loads as one and never passes for an expert.
    path = tmp_path / "student.safetensors"
    info = resumed.export(path, data.fingerprint(), metrics={"data_weight": 0.25}, kind="student")
    assert info.kind == "student" and info.flops == 20 * resumed.flops_per_step
    model, loaded = load_checkpoint(path, expect_kind="student")
    assert isinstance(model, DiT) and loaded.steps == 20
    with pytest.raises(CheckpointError, match="holds a student, expected a expert"):
        load_checkpoint(path, expect_kind="expert")


def test_bad_distillation_inputs_are_refused():
    _, data, component = mixture_data(16)
    cfg = DiTConfig("tiny", SIDE, 1)
    teachers = [seeded(DiT, cfg, 10).eval()]
    with pytest.raises(TrainError, match=r"teacher labels must lie in \[0, 1\)"):
        train_student(data, component, teachers, ["a"], cfg, settings(steps=0), progress=False)
    with pytest.raises(TrainError, match="unconditional"):
        train_student(data, component * 0, teachers, ["a"], DiTConfig("tiny", SIDE, 1, 10), settings(), progress=False)
