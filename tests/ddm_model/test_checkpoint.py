"""Checkpoints: exact round trips, and one-line refusals of anything that is not what its config implies.

Nothing may ever be unpickled: a pickle renamed .safetensors is refused before it is parsed.
"""

from __future__ import annotations

import json
import pickle
import re
import resource
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddm_model.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint_header,
    save_checkpoint,
    verify_checkpoint,
)
from ddm_model.dit import DiT, DiTConfig
from ddm_model.errors import DDMError
from ddm_model.router import Router, RouterConfig
from tests.helpers import one_line_error

REPO = Path(__file__).resolve().parents[2]
EXPERT_CONFIG = DiTConfig("tiny", 8, 1, num_classes=10)
ROUTER_CONFIG = RouterConfig("tiny", 8, 1, 4)
METRICS = {"loss": 0.125, "fid": {"k": 3, "values": [1.5, 2.0]}, "note": "ok"}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every weight with random values: fresh DiTs and routers output exact zeros (adaLN-Zero,
    zero heads), which would make an output comparison vacuous."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def fixed_inputs(channels: int = 1):
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(3, channels, 8, 8, generator=generator)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 7, 10])  # 10 is the null label
    return x, t, y


def expert_output(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, t, y)


def router_output(model, inputs):
    x, t, _ = inputs
    with torch.no_grad():
        return model(x, t)


@pytest.fixture
def expert():
    return randomized(DiT(EXPERT_CONFIG), seed=1)


@pytest.fixture
def router():
    return randomized(Router(ROUTER_CONFIG), seed=2)


@pytest.fixture
def expert_file(tmp_path, expert):
    path = tmp_path / "expert.safetensors"
    save_checkpoint(path, expert, cluster_id=2, steps=300, flops=12_345_678_901, data_fingerprint="f" * 64)
    return path


def read_file(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, metadata


def rewrite(src, dst, edit_tensors=None, edit_description=None, metadata=None):
    """Copy a checkpoint, changing its tensors and/or its ddm description, as a tamperer would."""
    tensors, original = read_file(src)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if metadata is None:
        description = json.loads(original["ddm"])
        if edit_description is not None:
            edit_description(description)
        metadata = {"ddm": json.dumps(description)}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def expect_refused(path, *needles, **kwargs) -> str:
    """Both load_checkpoint and verify_checkpoint refuse the file with one clear line."""
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, **kwargs)
    message = one_line_error(err)
    for needle in needles:
        assert needle in message, message
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path, **kwargs)
    assert one_line_error(err) == message
    return message


# ---------------------------------------------------------------------------------------------
# round trips


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert list(left) == list(right)
    for name in left:
        assert right[name].dtype == left[name].dtype == torch.float32, name
        assert torch.equal(left[name], right[name]), name


def test_expert_round_trip(tmp_path, expert):
    path = tmp_path / "sub" / "expert.safetensors"
    saved_info = save_checkpoint(
        path, expert, cluster_id=3, steps=1000, flops=98_765_432_109_876, data_fingerprint="ab" * 32, metrics=METRICS
    )
    model, info = load_checkpoint(path)
    assert isinstance(model, DiT)
    assert model.config == EXPERT_CONFIG
    assert not model.training
    assert_same_state(expert, model)

    inputs = fixed_inputs()
    out = expert_output(model, inputs)
    assert torch.equal(out, expert_output(expert, inputs))
    assert out.shape == (3, 1, 8, 8) and out.abs().sum() > 0
    # The comparison can fail: another set of weights gives another output.
    assert not torch.equal(out, expert_output(randomized(DiT(EXPERT_CONFIG), seed=9), inputs))

    assert info == saved_info
    assert (info.kind, info.cluster_id, info.steps, info.flops) == ("expert", 3, 1000, 98_765_432_109_876)
    assert info.data_fingerprint == "ab" * 32
    assert info.metrics == METRICS
    assert info.model == EXPERT_CONFIG.to_dict()
    assert verify_checkpoint(path, expect_kind="expert", expect_config=EXPERT_CONFIG.to_dict()) == info
    assert sorted(p.name for p in path.parent.iterdir()) == ["expert.safetensors"]  # no temporary left


def test_router_round_trip(tmp_path, router):
    path = tmp_path / "router.safetensors"
    saved_info = save_checkpoint(path, router, steps=50, flops=7, metrics={"accuracy": 0.75})
    model, info = load_checkpoint(path, expect_kind="router", expect_config=ROUTER_CONFIG.to_dict())
    assert isinstance(model, Router)
    assert model.config == ROUTER_CONFIG
    assert not model.training
    assert_same_state(router, model)
    inputs = fixed_inputs()
    out = router_output(model, inputs)
    assert out.shape == (3, 4) and out.abs().sum() > 0
    assert torch.equal(out, router_output(router, inputs))
    assert not torch.equal(out, router_output(randomized(Router(ROUTER_CONFIG), seed=9), inputs))
    assert info == saved_info
    assert (info.kind, info.cluster_id, info.steps, info.flops, info.data_fingerprint) == ("router", None, 50, 7, "")
    assert info.metrics == {"accuracy": 0.75}


def test_header_describes_the_checkpoint_without_loading(expert_file, expert):
    info, table = read_checkpoint_header(expert_file)
    assert info.kind == "expert" and info.cluster_id == 2 and info.steps == 300
    assert info.flops == 12_345_678_901 and info.data_fingerprint == "f" * 64 and info.metrics == {}
    expected = {name: ("F32", tuple(t.shape)) for name, t in expert.state_dict().items()}
    assert table == expected
    raw = expert_file.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    description = json.loads(header["__metadata__"]["ddm"])
    assert description["format"] == FORMAT
    assert description["model"] == EXPERT_CONFIG.to_dict()
    assert CheckpointInfo.from_json(header["__metadata__"]["ddm"], "x") == info


def test_checkpoint_info_json_round_trip():
    info = CheckpointInfo("router", ROUTER_CONFIG.to_dict(), cluster_id=None, steps=4, flops=5, metrics={"a": [1]})
    text = info.to_json()
    assert json.loads(text)["format"] == FORMAT
    assert CheckpointInfo.from_json(text, "here") == info


# ---------------------------------------------------------------------------------------------
# refusals: not safetensors at all


class WriteMarker:
    """Unpickling this object would create the marker file (arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_live(tmp_path):
    """Control: the payload used below really runs code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(WriteMarker(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_raw_pickle_renamed_safetensors_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": WriteMarker(marker)}, protocol=protocol))
    message = expect_refused(path, "evil.safetensors")
    if protocol >= 2:
        assert "pickle" in message
    assert not marker.exists()


def test_torch_save_renamed_safetensors_is_refused(tmp_path, expert):
    path = tmp_path / "expert.safetensors"
    torch.save(expert.state_dict(), path)
    expect_refused(path, "pickle")
    legacy = tmp_path / "legacy.safetensors"
    torch.save(expert.state_dict(), legacy, _use_new_zipfile_serialization=False)
    expect_refused(legacy, "pickle")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 5, bytes(range(256)) * 8, b"\x10" + b"\x00" * 7 + b"[]" + b" " * 14],
    ids=["empty", "short", "bytes", "not-an-object-header"],
)
def test_non_safetensors_bytes_are_refused(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    expect_refused(path, "junk.safetensors")


def test_random_bytes_are_refused(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        path = tmp_path / f"random{i}.safetensors"
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).tolist()))
        expect_refused(path)


def test_missing_file_is_refused(tmp_path):
    expect_refused(tmp_path / "nope.safetensors", "does not exist")


# ---------------------------------------------------------------------------------------------
# refusals: valid safetensors, wrong contents


def test_missing_tensor(tmp_path, expert_file):
    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=lambda t: t.pop("out.weight"))
    expect_refused(path, "missing", "out.weight")


def test_extra_tensor(tmp_path, expert_file):
    def add(tensors):
        tensors["backdoor.weight"] = torch.zeros(4)

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=add)
    expect_refused(path, "unexpected", "backdoor.weight")


def test_wrong_shape(tmp_path, expert_file):
    def shrink(tensors):
        tensors["blocks.0.attn.qkv.weight"] = tensors["blocks.0.attn.qkv.weight"][:, :16].clone()

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=shrink)
    expect_refused(path, "blocks.0.attn.qkv.weight", "[96, 16]", "[96, 32]")


@pytest.mark.parametrize("dtype, name", [(torch.float16, "F16"), (torch.float64, "F64"), (torch.bfloat16, "BF16")])
def test_wrong_dtype(tmp_path, expert_file, dtype, name):
    def convert(tensors):
        tensors["y_embed.weight"] = tensors["y_embed.weight"].to(dtype)

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=convert)
    expect_refused(path, "y_embed.weight", name, "F32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(tmp_path, expert_file, bad):
    def poison(tensors):
        tensors["t_embed.mlp.0.weight"][5, 7] = bad

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=poison)
    expect_refused(path, "t_embed.mlp.0.weight", "NaN")


def test_unknown_preset(tmp_path, expert_file):
    def huge(description):
        description["model"]["preset"] = "huge/1"

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_description=huge)
    expect_refused(path, "huge/1")


@pytest.mark.parametrize("field, value", [("hidden", 64), ("depth", 3), ("heads", 4), ("patch", 4), ("mlp_ratio", 4.0)])
def test_sizes_that_disagree_with_the_preset(tmp_path, expert_file, field, value):
    def edit(description):
        description["model"][field] = value

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_description=edit)
    expect_refused(path, field, "tiny")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["model"].update(image_size=7), "image_size"),  # not a multiple of the patch
        (lambda d: d["model"].update(in_channels=0), "in_channels"),
        (lambda d: d["model"].update(num_classes=-1), "num_classes"),
        (lambda d: d["model"].update(colour="red"), "colour"),
        (lambda d: d["model"].pop("image_size"), "image_size"),
        (lambda d: d.update(kind="vae"), "vae"),
        (lambda d: d.update(format="ddm.checkpoint/0"), "format"),
        (lambda d: d.update(steps=-1), "steps"),
        (lambda d: d.update(flops="many"), "flops"),
        (lambda d: d.update(cluster_id=True), "cluster_id"),
        (lambda d: d.update(metrics=[1, 2]), "metrics"),
        (lambda d: d.update(owner="mallory"), "owner"),
        (lambda d: d.pop("model"), "model"),
    ],
)
def test_bad_description_fields(tmp_path, expert_file, edit, needle):
    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_description=edit)
    expect_refused(path, needle)


@pytest.mark.parametrize(
    "metadata, needle",
    [
        ({}, "no ddm description"),
        ({"other": "x"}, "no ddm description"),
        ({"ddm": "{oops"}, "JSON"),
        ({"ddm": "[]"}, "format"),
    ],
)
def test_missing_or_unreadable_ddm_metadata(tmp_path, expert_file, metadata, needle):
    path = rewrite(expert_file, tmp_path / "t.safetensors", metadata=metadata)
    expect_refused(path, needle)


def test_metadata_beside_the_description_is_refused(tmp_path, expert_file):
    """Nothing may ride along, unchecked, in a file that gets signed and republished."""
    description = read_checkpoint_header(expert_file)[0].to_json()
    metadata = {"ddm": description, "torch_pickle": "\x80\x04K\x01."}
    expect_refused(rewrite(expert_file, tmp_path / "t.safetensors", metadata=metadata), "torch_pickle")


def test_expect_kind_mismatch(tmp_path, router, expert_file):
    router_file = tmp_path / "router.safetensors"
    save_checkpoint(router_file, router)
    expect_refused(router_file, "router", "expert", expect_kind="expert")
    expect_refused(expert_file, "router", "expert", expect_kind="router")


def test_expect_config_mismatch(expert_file):
    other = DiTConfig("tiny", 8, 1, num_classes=9).to_dict()
    expect_refused(expert_file, "differs", expect_config=other)
    unconditional = DiTConfig("tiny", 8, 1).to_dict()
    expect_refused(expert_file, "differs", expect_kind="expert", expect_config=unconditional)
    # The matching config (with or without the derived trunk sizes) is accepted.
    load_checkpoint(expert_file, expect_config=EXPERT_CONFIG.to_dict())
    load_checkpoint(expert_file, expect_config={"preset": "tiny", "image_size": 8, "in_channels": 1, "num_classes": 10})


def test_verify_checks_the_header_before_building_a_real_model(tmp_path, expert_file):
    """A header claiming an XL/2 model (675M parameters, 2.7 GB) over tiny tensors is refused from
    the tensor table alone: the expected model is built on the meta device, never in memory."""

    def claim_xl(description):
        description["model"] = DiTConfig("XL/2", 256, 4, num_classes=10).to_dict()

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_description=claim_xl)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    expect_refused(path, "missing tensors")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB while verifying a tiny file"


def test_wrong_shape_is_caught_by_verify_not_by_load_state_dict(tmp_path, expert_file):
    """The shape error comes from the header check (a CheckpointError), not torch's load_state_dict."""

    def swap(tensors):
        tensors["out.weight"] = tensors["out.weight"].t().contiguous()

    path = rewrite(expert_file, tmp_path / "t.safetensors", edit_tensors=swap)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    message = one_line_error(err)
    assert "out.weight" in message and "shape" in message
    # The header itself is still readable and reports the stored shape.
    _, table = read_checkpoint_header(path)
    assert table["out.weight"] == ("F32", (32, 4))


def test_checkpoint_error_is_a_ddm_error():
    assert issubclass(CheckpointError, DDMError) and issubclass(CheckpointError, ValueError)


def test_save_refuses_a_model_that_is_not_a_dit_or_router(tmp_path):
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))
    one_line_error(err)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# nothing in the project unpickles


def _call_arguments(text: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[open_paren : i + 1]
    return text[open_paren:]


def unsafe_loads(text: str) -> list[str]:
    found = []
    for match in re.finditer(r"\bpickle\.load", text):
        found.append(f"pickle.load at offset {match.start()}")
    for match in re.finditer(r"\ballow_pickle\s*=\s*True", text):
        found.append(f"allow_pickle=True at offset {match.start()}")
    for match in re.finditer(r"\btorch\.load\s*\(", text):
        args = _call_arguments(text, match.end() - 1)
        if not re.search(r"\bweights_only\s*=\s*True\b", args):
            found.append(f"torch.load without weights_only=True at offset {match.start()}")
    return found


def test_unsafe_load_scanner_finds_what_it_should():
    assert unsafe_loads("x = pickle.load(f)") and unsafe_loads("pickle.loads(b)")
    assert unsafe_loads("np.load(p, allow_pickle=True)")
    assert unsafe_loads("torch.load(p)") and unsafe_loads("torch.load(p, weights_only=False)")
    assert unsafe_loads("torch.load(\n    p,\n    map_location='cpu',\n)")
    assert not unsafe_loads("torch.load(p, map_location=dev, weights_only=True)")
    assert not unsafe_loads("torch.load(\n  p,\n  weights_only=True,\n)")
    assert not unsafe_loads("np.load(p, allow_pickle=False)")


def test_package_source_never_unpickles():
    folders = [REPO / name for name in ("ddm_model", "coordinator", "client", "protocol")]
    folders = [folder for folder in folders if folder.is_dir()]
    assert REPO / "ddm_model" in folders
    sources = sorted(p for folder in folders for p in folder.rglob("*.py"))
    assert any(p.name == "checkpoint.py" for p in sources)
    problems = [
        f"{path.relative_to(REPO)}: {problem}"
        for path in sources
        for problem in unsafe_loads(path.read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_a_header_length_that_looks_like_a_pickle_opcode_still_loads(tmp_path, expert):
    """A safetensors file starts with its header length; a low byte of 0x80 is not a pickle."""
    for pad in range(400):
        path = tmp_path / f"padded-{pad}.safetensors"
        save_checkpoint(path, expert, metrics={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    model, info = load_checkpoint(path)
    assert info.metrics["pad"] == "x" * pad
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), expert.state_dict().values(), strict=True)
    )
