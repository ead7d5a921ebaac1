"""The expert network and its presets."""

import pytest
import torch

from ddm_model.dit import PRESETS, ConfigError, DiT, DiTConfig


def test_output_has_input_shape_and_starts_at_zero():
    model = DiT(DiTConfig("tiny", 8, 3, num_classes=10))
    x = torch.randn(5, 3, 8, 8)
    out = model(x, torch.rand(5), torch.randint(0, 10, (5,)))
    assert out.shape == x.shape
    # adaLN-Zero: the final projection is zero-initialised, so a fresh model predicts zero
    assert torch.equal(out, torch.zeros_like(out))


def test_conditioning_reaches_the_output_once_trained_away_from_zero():
    torch.manual_seed(0)
    model = DiT(DiTConfig("tiny", 8, 1, num_classes=10))
    for p in model.parameters():  # leave the zero init so every path is live
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.3])
    a = model(x, t, torch.tensor([1, 1]))
    b = model(x, t, torch.tensor([2, 2]))
    null = model(x, t)  # no labels: the null label
    assert not torch.allclose(a, b)
    assert torch.allclose(null, model(x, t, torch.tensor([10, 10])))
    assert not torch.allclose(model(x, torch.tensor([0.9, 0.9]), torch.tensor([1, 1])), a)


def test_unpatchify_inverts_the_patch_layout():
    model = DiT(DiTConfig("tiny", 8, 2))
    p, g = model.patch, model.embed.grid
    x = torch.randn(3, 2, 8, 8)
    tokens = x.view(3, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(3, g * g, p * p * 2)
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("preset,millions", [("S/2", 33), ("B/2", 130), ("L/2", 458), ("XL/2", 675)])
def test_paper_presets_match_dit_parameter_counts(preset, millions):
    """DiT paper, Table 1 (256x256 images as 32x32x4 latents, 1000 classes)."""
    with torch.device("meta"):
        model = DiT(DiTConfig(preset, 32, 4, num_classes=1000))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)


def test_every_preset_is_a_valid_config():
    for name, trunk in PRESETS.items():
        cfg = DiTConfig(name, 8 * trunk.patch, 3)
        assert cfg.to_dict()["hidden"] == trunk.hidden
        assert DiTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data,match",
    [
        ({"preset": "huge/1", "image_size": 8, "in_channels": 1}, "unknown model preset"),
        ({"preset": "tiny", "image_size": 7, "in_channels": 1}, "multiple of"),
        ({"preset": "tiny", "image_size": 8, "in_channels": 0}, "in_channels"),
        ({"preset": "tiny", "image_size": 10**6, "in_channels": 1}, "image_size"),
        ({"preset": "tiny", "image_size": 8.0, "in_channels": 1}, "image_size"),
        ({"preset": "tiny", "image_size": 8, "in_channels": 1, "hidden": 999}, "preset 'tiny' has 32"),
        ({"preset": "tiny", "image_size": 8, "in_channels": 1, "evil": 1}, "unknown fields"),
        ({"preset": "tiny", "image_size": 8}, "missing fields"),
        ({"preset": "tiny", "image_size": 8, "in_channels": 1, "class_dropout": 1.5}, "class_dropout"),
        ({"preset": 3, "image_size": 8, "in_channels": 1}, "must be a string"),
        ([], "JSON object"),
    ],
)
def test_bad_configs_are_refused_clearly(data, match):
    with pytest.raises(ConfigError, match=match) as err:
        DiTConfig.from_dict(data)
    assert "\n" not in str(err.value)
