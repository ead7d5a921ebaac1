"""DP-SGD for an expert (ddm_model.privacy): the guarantee is Opacus's own accounting of the run
as configured, one sample's gradient is clipped as a whole however many noise/time pairs it is
drawn with, a resumed private run is the uninterrupted one, and the guarantee travels in the
checkpoint's header (with no loss beside it)."""

import copy
import threading

import pytest
import torch

from ddm_model.checkpoint import CheckpointError, read_checkpoint_header, save_checkpoint
from ddm_model.data import load_digits
from ddm_model.dit import DiT, DiTConfig
from ddm_model.flow import TimeSampler, flow_matching_loss
from ddm_model.privacy import DPConfig, Guarantee, PrivacyError, PrivateTraining, plan, quiet_hooks
from ddm_model.train import TrainConfig, TrainError, TrainStopped, train_expert

MODEL = DiTConfig(preset="tiny", image_size=8, in_channels=1)
N, BATCH, STEPS = 120, 12, 30


@pytest.fixture(scope="module")
def silo():
    return load_digits().subset(list(range(N)), name="silo")


def test_the_guarantee_is_opacus_own_accounting_of_the_configured_run(silo):
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant

    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, log_every=10, checkpoint_every=0)
    result = train_expert(silo, MODEL, cfg, progress=False, privacy=DPConfig(epsilon=4.0, clip=0.5))
    g = Guarantee.from_dict(result.privacy)
    assert (g.steps, g.sample_rate, g.clip, g.delta, g.accountant) == (STEPS, BATCH / N, 0.5, 1e-5, "rdp")
    assert 3.9 < g.epsilon <= 4.0

    # Opacus's own engine, given the same data size, batch and epochs, picks the same noise...
    model = DiT(MODEL)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(silo.images), batch_size=BATCH)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, private_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        target_epsilon=4.0,
        target_delta=1e-5,
        epochs=STEPS * BATCH // N,
        max_grad_norm=0.5,
    )
    assert optimizer.noise_multiplier == g.noise_multiplier
    # ...and its accountant, having counted the steps it ran, spends the same epsilon.
    steps = 0
    with quiet_hooks():
        while steps < STEPS:
            for (x,) in private_loader:
                optimizer.zero_grad()
                if x.shape[0]:
                    flow_matching_loss(module, x, TimeSampler(), None).backward()
                else:
                    for p in model.parameters():
                        p.grad_sample = torch.zeros((0, *p.shape))
                optimizer.step()
                steps += 1
                if steps == STEPS:
                    break
    assert engine.get_epsilon(1e-5) == pytest.approx(g.epsilon, rel=1e-9)
    accountant = RDPAccountant()
    accountant.history = [(g.noise_multiplier, g.sample_rate, g.steps)]
    assert accountant.get_epsilon(1e-5) == pytest.approx(g.epsilon, rel=1e-9)
    assert g.verify() == g


def test_one_sample_is_clipped_whole_however_many_pairs_it_is_drawn_with(silo):
    """With m noise/time pairs a sample's rows are folded into its own gradient before clipping:
    the per-sample gradient is exactly the gradient of its mean loss over its pairs."""
    pairs, drawn = 3, 4
    private = PrivateTraining(DPConfig(epsilon=8.0, noise_pairs=pairs), N, BATCH, STEPS)
    model = DiT(MODEL)
    reference = copy.deepcopy(model)
    module, _ = private.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.Generator())
    x = private.repeat(silo.images[:drawn])
    assert x.shape[0] == drawn * pairs and torch.equal(x[:pairs], silo.images[:1].expand(pairs, -1, -1, -1))
    with quiet_hooks():
        flow_matching_loss(module, x, TimeSampler(), torch.Generator().manual_seed(5)).backward()
    params = list(model.parameters())
    private.per_sample(params, drawn)
    # The same draws, one sample at a time, on a plain copy of the model.
    g = torch.Generator().manual_seed(5)
    t = TimeSampler()(drawn * pairs, g)
    noise = torch.randn(x.shape, generator=g)
    for i in range(drawn):
        rows = slice(i * pairs, (i + 1) * pairs)
        reference.zero_grad()
        xt = (1 - t[rows].view(-1, 1, 1, 1)) * noise[rows] + t[rows].view(-1, 1, 1, 1) * x[rows]
        loss = ((reference(xt, t[rows]) - (x[rows] - noise[rows])) ** 2).mean()
        loss.backward()
        for p, q in zip(params, reference.parameters(), strict=True):
            assert p.grad_sample.shape == (drawn, *p.shape)
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6)
    private.detach()


def test_a_resumed_private_run_is_the_uninterrupted_run(silo, tmp_path):
    cfg = TrainConfig(steps=20, batch_size=BATCH, log_every=5, checkpoint_every=0)
    dp = DPConfig(epsilon=8.0, noise_pairs=2)
    whole = train_expert(silo, MODEL, cfg, progress=False, privacy=dp)

    stop = threading.Event()

    def at(step, loss, rate):
        if step == 10:
            stop.set()

    with pytest.raises(TrainStopped):
        train_expert(silo, MODEL, cfg, tmp_path, progress=False, on_progress=at, stop=stop, privacy=dp)
    resumed = train_expert(silo, MODEL, cfg, tmp_path, progress=False, privacy=dp)
    assert resumed.resumed_from == 10
    assert resumed.privacy == whole.privacy  # planned once, for the whole run: nothing spent twice
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same batches, draws and noise: the same weights

    # A resume under another guarantee (here: more steps) is refused, as is one without DP.
    with pytest.raises(TrainError, match="different run"):
        train_expert(silo, MODEL, TrainConfig(steps=30, batch_size=BATCH), tmp_path, progress=False, privacy=dp)
    with pytest.raises(TrainError, match="different run"):
        train_expert(silo, MODEL, cfg, tmp_path, progress=False)


def test_the_guarantee_travels_in_the_header_and_no_loss_with_it(silo, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=BATCH, log_every=5, checkpoint_every=0)
    result = train_expert(silo, MODEL, cfg, progress=False, privacy=DPConfig(epsilon=2.0, delta=1e-6))
    assert result.losses  # the island's operator still sees its losses locally
    path = tmp_path / "expert.safetensors"
    result.export(path, "", cluster_id=0)
    info, _ = read_checkpoint_header(path)
    assert info.privacy == result.privacy and info.privacy["delta"] == 1e-6
    assert "final_loss" not in info.metrics

    # A declaration that does not fit the checkpoint is refused on reading...
    model = DiT(MODEL)
    for bad, words in (
        ({**info.privacy, "steps": 11}, "other steps"),
        ({**info.privacy, "epsilon": "2"}, "finite number"),
        ({k: v for k, v in info.privacy.items() if k != "clip"}, "exactly the fields"),
    ):
        save_checkpoint(path, model, steps=10, privacy=bad)
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint_header(path)
    # ...and one whose epsilon is not what its own figures give fails verification.
    with pytest.raises(PrivacyError, match="not what the rdp accountant gives"):
        Guarantee.from_dict({**info.privacy, "epsilon": 1.0}).verify()


def test_settings_that_cannot_be_met_are_refused_in_one_line(silo):
    for kwargs, words in (
        ({"epsilon": 0.0}, "--dp-epsilon must lie in"),
        ({"epsilon": float("nan")}, "finite number"),
        ({"epsilon": 1.0, "delta": 1.0}, "--dp-delta must lie in"),
        ({"epsilon": 1.0, "clip": -1.0}, "--dp-clip must lie in"),
        ({"epsilon": 1.0, "noise_pairs": 0}, "noise_pairs must lie in"),
        ({"epsilon": 1.0, "accountant": "gdp?"}, "unknown accountant"),
    ):
        with pytest.raises(PrivacyError, match=words):
            DPConfig(**kwargs)
    with pytest.raises(PrivacyError, match="not smaller than the 120 training samples"):
        plan(DPConfig(epsilon=1.0), N, N, 10)
    with pytest.raises(PrivacyError, match="--dp-delta 0.01 is not below 1/N for the 120 training samples"):
        plan(DPConfig(epsilon=1.0, delta=0.01), N, BATCH, 10)
    assert plan(DPConfig(epsilon=1.0), 1_000_000, 100, 10).delta == pytest.approx(1e-7)  # well below 1/N
