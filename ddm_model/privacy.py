"""Differential privacy for an expert: DP-SGD through Opacus, and the guarantee it earns.

An island that trains with ``DPConfig`` (``ddm-client join --dp-epsilon E``) makes its expert
(E, delta)-differentially private with respect to the samples it trains on: adding or removing
any one sample changes the distribution of the published weights by at most that much.
The pieces are Opacus's, not ddm's own:

- per-sample gradients (``opacus.GradSampleModule``; every layer of the DiT, adaLN
  modulation and attention projections included, is a Linear, Conv2d or Embedding, which
  Opacus differentiates per sample with hooks);
- clipping each sample's gradient to ``clip`` and adding Gaussian noise of standard deviation
  ``noise_multiplier * clip`` to their sum (``opacus.optimizers.DPOptimizer``);
- the accountant (``rdp`` by default, or ``prv``) that turns (noise multiplier, sample rate,
  steps) into epsilon at the given delta, and the search for the noise multiplier that
  reaches the asked epsilon (``opacus.accountants.utils.get_noise_multiplier``).

ddm's part is to feed them what their theorems assume:

- **Poisson sampling**: each step takes every sample independently with probability
  ``sample_rate = batch_size / N``, so a batch's size varies (and may be 0), and the
  noise is scaled by the expected batch size.
- **Noise/time pairs**: with ``noise_pairs`` m > 1 each drawn sample is seen with m noise and
  time draws in one step. Its m rows' per-row gradients are averaged into one per-sample
  gradient *before* clipping, so one sample still moves the sum by at most ``clip`` and the
  accounting is that of m = 1 (treating the m rows as m samples would multiply the
  sensitivity by m).
- **Exact resume**: the sampling, the flow-matching draws and the DP noise come from the
  run's one generator, saved in its resume state; the guarantee is planned once for the whole
  run, so a resumed run spends exactly what an uninterrupted one does.

Everything computed from the private weights afterwards is post-processing and costs no
more privacy: the EMA of the weights (what ddm exports), samples drawn from the expert, and
therefore a siloed coordinator's router and distilled student, which learn only from expert
samples. What the island reports besides the weights is outside the guarantee unless it is
left out: training losses are (heartbeats and the checkpoint carry none from a private run)
and exact data counts are (``--share-counts`` is refused beside DP). The sample rate in the
guarantee states N, the silo's size, as every DP-SGD guarantee does.

The noise comes from torch's generator, not a cryptographically secure one (Opacus's
``secure_mode`` needs torchcsprng, which no current torch release has); a guarantee that must
hold against an attacker who can predict the generator's stream needs that mode.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .errors import DDMError

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5
MAX_NOISE_PAIRS = 64
# A declaration's epsilon must be what the accountant gives for its own figures to this
# relative precision (the accountants are deterministic; the slack is for floating point).
EPSILON_RTOL = 1e-6


class PrivacyError(DDMError, ValueError):
    """Differential-privacy settings that cannot be met, or a guarantee that does not add up."""


def _number(name: str, value: object, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PrivacyError(f"{name} must be a finite number, got {value!r}")
    if not (low < value if low_open else low <= value) or not value < high:
        raise PrivacyError(f"{name} must lie in {'(' if low_open else '['}{low:g}, {high:g}), got {value!r}")
    return float(value)


def default_delta(samples: int) -> float:
    """delta when none is given: 1e-5, or a tenth of 1/N for a silo of more than 10,000 samples
    (a delta near 1/N would allow publishing one sample in the clear)."""
    return min(DEFAULT_DELTA, 0.1 / max(samples, 1))


@dataclass(frozen=True)
class DPConfig:
    """What an island asks for: a target (epsilon, delta), the per-sample clipping norm, noise
    and time draws per sample and step, and the accountant. ``delta`` None: ``default_delta``."""

    epsilon: float
    delta: float | None = None
    clip: float = 1.0
    noise_pairs: int = 1
    accountant: str = "rdp"

    def __post_init__(self):
        _number("--dp-epsilon", self.epsilon, 0, 1e4)
        if self.delta is not None:
            _number("--dp-delta", self.delta, 0, 1)
        _number("--dp-clip", self.clip, 0, 1e6)
        if isinstance(self.noise_pairs, bool) or not isinstance(self.noise_pairs, int):
            raise PrivacyError(f"noise_pairs must be an integer, got {self.noise_pairs!r}")
        if not 1 <= self.noise_pairs <= MAX_NOISE_PAIRS:
            raise PrivacyError(f"noise_pairs must lie in [1, {MAX_NOISE_PAIRS}], got {self.noise_pairs}")
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> DPConfig:
        if not isinstance(data, dict) or set(data) - {f.name for f in fields(cls)} or "epsilon" not in data:
            raise PrivacyError(f"differential-privacy settings must be an object with {[f.name for f in fields(cls)]}")
        return cls(**data)


def _accountant_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # PRV's note that its error bound is loose for few steps
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Guarantee:
    """What travels with a private expert: (epsilon, delta) with respect to one of its training
    samples, and the figures an accountant derives epsilon from. ``epsilon`` is the accountant's
    for the whole run (at most the target asked for); ``noise_pairs`` says how many noise/time
    draws shared one clipped per-sample gradient."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    accountant: str
    noise_pairs: int = 1
    unit: str = "sample"  # what one "neighbouring dataset" adds or removes
    mechanism: str = "DP-SGD, Poisson sampling, Gaussian noise (Opacus)"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def samples(self) -> float:
        """The silo's size the sample rate implies (expected batch / rate)."""
        return 1.0 / self.sample_rate

    @classmethod
    def from_dict(cls, data: object) -> Guarantee:
        """A declaration read from a checkpoint, checked field by field (not yet ``verify``-ed)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            got = sorted(data)[:12] if isinstance(data, dict) else type(data).__name__
            raise PrivacyError(f"a privacy guarantee must have exactly the fields {names}, got {got}")
        _number("epsilon", data["epsilon"], 0, math.inf, low_open=False)
        _number("delta", data["delta"], 0, 1)
        _number("noise_multiplier", data["noise_multiplier"], 0, 1e7)
        _number("clip", data["clip"], 0, 1e6)
        _number("sample_rate", data["sample_rate"], 0, 1)
        for name, high in (("steps", 1 << 40), ("noise_pairs", MAX_NOISE_PAIRS + 1)):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
                raise PrivacyError(f"{name} must be an integer in [0, {high}), got {value!r}")
        if data["accountant"] not in ACCOUNTANTS:
            raise PrivacyError(f"unknown accountant {str(data['accountant'])[:20]!r}")
        if data["unit"] != cls.unit or data["mechanism"] != cls.mechanism:
            raise PrivacyError("a privacy guarantee names a unit or mechanism ddm does not produce")
        return cls(**{**data, "epsilon": float(data["epsilon"])})

    def accounted_epsilon(self) -> float:
        """epsilon as this guarantee's accountant computes it from its own figures."""
        return _accountant_epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant)

    def verify(self) -> Guarantee:
        """Check that the declared epsilon is what the accountant gives for the declared noise,
        rate and steps (the arithmetic; not that training used them: see the README)."""
        want = self.accounted_epsilon()
        if not math.isclose(self.epsilon, want, rel_tol=EPSILON_RTOL, abs_tol=1e-9):
            raise PrivacyError(
                f"the declared epsilon {self.epsilon:.6g} is not what the {self.accountant} accountant gives"
                f" for its noise multiplier, sample rate and steps ({want:.6g})"
            )
        return self


def plan(dp: DPConfig, samples: int, batch_size: int, steps: int) -> Guarantee:
    """The guarantee a run of ``steps`` steps at an expected batch of ``batch_size`` out of
    ``samples`` earns: the smallest noise multiplier the accountant finds for the target epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    if samples < 2:
        raise PrivacyError(f"differential privacy needs at least 2 training samples, the data holds {samples}")
    if batch_size >= samples:
        raise PrivacyError(
            f"the batch of {batch_size} is not smaller than the {samples} training samples; Poisson sampling"
            " needs a sample rate below 1 (a smaller batch, or more data)"
        )
    rate = batch_size / samples
    delta = dp.delta if dp.delta is not None else default_delta(samples)
    if delta * samples >= 1:
        raise PrivacyError(
            f"--dp-delta {delta:g} is not below 1/N for the {samples} training samples (such a delta allows"
            " publishing a sample in the clear); leave it out for the default"
        )
    if steps == 0:
        return Guarantee(0.0, delta, 0.0, dp.clip, rate, 0, dp.accountant, dp.noise_pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=dp.epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=dp.accountant
            )
        except ValueError as exc:
            raise PrivacyError(f"no noise level reaches epsilon {dp.epsilon:g} for this run: {exc}") from None
    epsilon = _accountant_epsilon(sigma, rate, steps, delta, dp.accountant)
    return Guarantee(epsilon, delta, float(sigma), dp.clip, rate, steps, dp.accountant, dp.noise_pairs)


class PrivateTraining:
    """The DP-SGD side of one training run (``train.fit``): draws Poisson batches, repeats
    each sample for its noise/time pairs, and turns the model and optimizer into Opacus's
    per-sample-gradient module and noisy optimizer, with the run's generator as the noise's
    source."""

    def __init__(self, dp: DPConfig, samples: int, batch_size: int, steps: int):
        self.guarantee = plan(dp, samples, batch_size, steps)
        self.batch_size = batch_size
        self.pairs = dp.noise_pairs
        self._module = None

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        g = self.guarantee
        self._module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        noisy = DPOptimizer(
            optimizer,
            noise_multiplier=g.noise_multiplier,
            max_grad_norm=g.clip,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        return self._module, noisy

    def detach(self) -> None:
        """Remove Opacus's hooks from the model."""
        if self._module is not None:
            self._module._close()
            self._module = None

    def draw(self, samples: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """A Poisson batch: each sample's index with probability ``sample_rate``, independently."""
        taken = torch.rand(samples, generator=generator, device=device) < self.guarantee.sample_rate
        return taken.nonzero().squeeze(1)

    def repeat(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Each sample's row ``pairs`` times in a row, for its own noise and time draws."""
        return x if x is None or self.pairs == 1 else x.repeat_interleave(self.pairs, dim=0)

    def per_sample(self, params: list[nn.Parameter], drawn: int) -> None:
        """Make each parameter's per-row gradients per-sample ones: the mean over a sample's
        pairs, so that clipping bounds one sample's whole contribution. An empty batch gets
        empty ones (the step then adds noise alone, as the analysis assumes)."""
        for p in params:
            if drawn == 0:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            elif self.pairs > 1:
                p.grad_sample = p.grad_sample.view(drawn, self.pairs, *p.shape).mean(1)


@contextlib.contextmanager
def quiet_hooks() -> Iterator[None]:
    """Opacus's full backward hooks warn when the input needs no gradient (the images never
    do); the warning says nothing about the per-parameter gradients, which are complete."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield
