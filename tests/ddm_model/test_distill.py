"""Distillation: the student follows exact teachers, teachers run sparsely on their own rows
only, the FLOP count includes them, and a run resumes exactly."""

import pytest
import torch

from ddm_model.checkpoint import CheckpointError, load_checkpoint
from ddm_model.data import ImageDataset
from ddm_model.distill import (
    class_probabilities,
    distill_objective,
    teacher_counts,
    teacher_gap,
    teacher_samples,
    teacher_velocity,
    train_student,
)
from ddm_model.dit import DiT, DiTConfig
from ddm_model.errors import UsageError
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


# ---------------------------------------------------------------------------------------------
# Class-conditional distillation

CLASSES = 2


def labelled_mixture() -> GaussianMixture:
    """Two clusters (teachers) of two classes each: component 2k + y is class y of cluster k."""
    pattern = torch.linspace(-1, 1, SIDE * SIDE)
    stripes = torch.tensor([1.0, -1.0]).repeat(SIDE * SIDE // 2)
    means = torch.stack([0.9 * pattern, -0.9 * pattern, 0.9 * stripes, -0.9 * stripes])
    return GaussianMixture(means, torch.full((4,), 0.2), torch.ones(4))


def mixture_velocity(mixture: GaussianMixture, components: list[int], x: torch.Tensor, t: torch.Tensor):
    """Exact velocity of the equal-weight mixture of ``components`` (posterior-weighted)."""
    logits = torch.stack([mixture.component_log_density(j, x, t) for j in components], dim=1)
    w = logits.softmax(dim=1)
    return sum(w[:, i : i + 1] * mixture.component_velocity(j, x, t) for i, j in enumerate(components))


def labelled_teachers(mixture: GaussianMixture):
    """Teacher k's exact velocity given the label y, or over both its classes given the null label."""

    def teacher(k):
        def velocity(x, t, y):
            flat = x.flatten(1).double()
            out = mixture_velocity(mixture, [2 * k, 2 * k + 1], flat, t)
            for label in range(CLASSES):
                rows = y == label
                out[rows] = mixture.component_velocity(2 * k + label, flat[rows], t[rows])
            return as_images(out)

        return velocity

    return [teacher(0), teacher(1)]


def test_a_class_conditional_student_learns_each_class_and_the_null_label():
    mixture = labelled_mixture()
    flat, component = mixture.sample(1024, torch.Generator().manual_seed(0))
    labels, cluster = component % 2, component // 2
    data = ImageDataset(as_images(flat), torch.arange(1024), labels, CLASSES, name="labelled")
    teachers = labelled_teachers(mixture)
    cfg = DiTConfig("tiny", SIDE, 1, num_classes=CLASSES, class_dropout=0.3)
    result = train_student(
        data, cluster, teachers, ["a", "b"], cfg, settings(steps=500, log_every=50), data_weight=0.0, progress=False
    )
    assert result.model.num_classes == CLASSES

    xt, t, _ = noised(data.images[:512], TimeSampler(), torch.Generator().manual_seed(9))
    y, flat_xt = labels[:512], xt.flatten(1)
    # Given y, the target is the mixture of class y's components over both clusters; given the
    # null label, the mixture of all four.
    conditional = torch.zeros_like(flat_xt, dtype=torch.float64)
    for label in range(CLASSES):
        rows = y == label
        conditional[rows] = mixture_velocity(mixture, [label, 2 + label], flat_xt[rows], t[rows])
    unconditional = mixture.global_velocity(flat_xt, t)
    with torch.no_grad():
        given_y = result.model(xt, t, y).flatten(1).double()
        given_null = result.model(xt, t, torch.full_like(y, CLASSES)).flatten(1).double()

    def mse(a, b):
        return (a - b).pow(2).mean().item()

    # No model blind to the label can come closer to the conditional velocity than the
    # unconditional one does (it is the label-blind minimiser): the student does, by far.
    blind = mse(unconditional, conditional)
    # (Trained with the label dropped 95% of the time it stays above blind: ratio 1.4.)
    assert mse(given_y, conditional) < 0.35 * blind
    # With the null label it follows the unconditional velocity, not a conditional one.
    assert mse(given_null, unconditional) < 0.5 * blind
    # Its gap to each sample's own teacher given the label, as teacher_gap measures it, shrank.
    untrained = seeded(DiT, cfg, 1).eval()
    images, teacher_of, times = data.images[:512], cluster[:512], TimeSampler()
    before = teacher_gap(untrained, teachers, images, teacher_of, times, seed=5, labels=y)
    assert teacher_gap(result.model, teachers, images, teacher_of, times, seed=5, labels=y) < 0.2 * before


def test_label_dropout_gives_the_null_label_to_student_and_teacher_alike():
    seen = {"student": [], "teachers": []}

    def teacher(x, t, y):
        seen["teachers"].append(y.clone())
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()

    def student(x, t, y):
        seen["student"].append(y.clone())
        return y.float().view(-1, 1, 1, 1).expand_as(x)

    n, null = 4000, 7
    labels = torch.arange(n) % null
    target = torch.stack([torch.arange(n) % 2, labels], dim=1)
    objective = distill_objective([teacher, teacher], TimeSampler(), 0.0, num_classes=null, class_dropout=0.25)
    loss = objective(student, torch.zeros(n, 1, SIDE, SIDE), target, torch.Generator().manual_seed(0))
    # The student returns its own label and each teacher its own: a zero loss means that every
    # row's teacher saw exactly the student's label.
    assert loss.item() == 0.0
    (given,) = seen["student"]
    assert sorted(len(y) for y in seen["teachers"]) == [n // 2, n // 2]
    dropped = given == null
    assert 0.22 < dropped.float().mean().item() < 0.28
    assert torch.equal(given[~dropped], labels[~dropped])


def test_a_conditional_student_needs_labels_and_teachers_with_its_classes():
    _, data, component = mixture_data(16)
    cfg = DiTConfig("tiny", SIDE, 1, num_classes=3)
    conditional = [seeded(DiT, cfg, 10).eval()]
    with pytest.raises(TrainError, match="class-conditional but the data has no labels"):
        train_student(data, component * 0, conditional, ["a"], cfg, settings(steps=0), progress=False)
    labelled = ImageDataset(data.images, data.ids, torch.arange(16) % 3, 3, name="labelled")
    unconditional = [seeded(DiT, DiTConfig("tiny", SIDE, 1), 10).eval()]
    with pytest.raises(TrainError, match="teacher 0 has 0 classes, the student 3"):
        train_student(labelled, component * 0, unconditional, ["a"], cfg, settings(steps=0), progress=False)
    too_many = ImageDataset(data.images, data.ids, torch.arange(16) % 4, 4, name="labelled")
    with pytest.raises(TrainError, match=r"labels must lie in \[0, 3\)"):
        train_student(too_many, component * 0, conditional, ["a"], cfg, settings(steps=0), progress=False)
    # A conditional DiT teacher with the same classes is accepted.
    assert train_student(labelled, component * 0, conditional, ["a"], cfg, settings(steps=0), progress=False)


# ---------------------------------------------------------------------------------------------
# Samples drawn from the teachers (siloed)


def test_teacher_counts_follow_the_cluster_shares():
    assert teacher_counts(10, [30, 10, 0, 60], 4) == [3, 1, 0, 6]
    assert teacher_counts(1000, [0.5, 0.25, 0.25], 3) == [500, 250, 250]
    assert teacher_counts(7, None, 3) == [3, 2, 2]  # uniform; the remainder goes to the first
    assert teacher_counts(10, [1, 2], 2) == [3, 7]  # 3.33 and 6.67: largest remainder
    assert sum(teacher_counts(1001, [5, 3, 2, 7], 4)) == 1001
    for bad, match in (([1, 2], "2 cluster shares for 3"), ([1, -1, 1], "non-negative"), ([0, 0, 0], "positive sum")):
        with pytest.raises(UsageError, match=match):
            teacher_counts(10, bad, 3)


def test_teacher_samples_follow_the_shares_and_call_each_teacher_with_its_classes():
    calls = {0: [], 1: [], 2: []}

    def teacher(k):
        def velocity(x, t, y):
            calls[k].append(y.clone())
            return torch.zeros_like(x)

        return velocity

    classes = [[0, 30, 10, 0], [5, 0, 0, 0], None]  # teacher 2's row: unknown, so uniform
    images, teacher_of, labels = teacher_samples(
        [teacher(0), teacher(1), teacher(2)],
        2000,
        (1, SIDE, SIDE),
        steps=1,
        batch_size=4096,
        cluster_shares=[2, 1, 1],
        num_classes=4,
        class_shares=[row or [0, 0, 0, 0] for row in classes],
    )
    assert images.shape == (2000, 1, SIDE, SIDE) and images.abs().max() <= 1
    assert torch.bincount(teacher_of, minlength=3).tolist() == [1000, 500, 500]
    for k in range(3):
        (got,) = calls[k]  # one batched call per teacher and step
        assert torch.equal(got, labels[teacher_of == k])
    ones = labels[teacher_of == 0]
    assert set(ones.tolist()) == {1, 2} and 0.70 < (ones == 1).float().mean().item() < 0.80
    assert labels[teacher_of == 1].tolist() == [0] * 500
    assert set(labels[teacher_of == 2].tolist()) == {0, 1, 2, 3}

    # Unconditional teachers get no label; counts without shares are equal.
    plain = [lambda x, t: torch.zeros_like(x)] * 2
    _, teacher_of, labels = teacher_samples(plain, 9, (1, SIDE, SIDE), steps=1)
    assert labels is None and torch.bincount(teacher_of).tolist() == [5, 4]
    with pytest.raises(UsageError, match="at most 4 numbers"):
        class_probabilities([[1, 1, 1, 1, 1]], 1, 4)
