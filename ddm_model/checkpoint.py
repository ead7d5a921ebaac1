"""Model checkpoints: safetensors weights with a JSON description in the header.

The header's ``ddm`` metadata entry holds the format, the kind of model (``expert``,
``router``, or ``student``: a DiT distilled from an ensemble, kept apart from experts so that
neither can pass for the other), its config (preset and sizes), and provenance: cluster id,
training steps and FLOPs, the data fingerprint and free-form metrics. ``load_checkpoint`` rebuilds the model
from that config and refuses, with one clear line, anything that is not exactly what the
config implies: a file that is not safetensors (a pickle renamed .safetensors included),
missing or extra tensors, wrong shapes or dtypes, non-finite values, an unknown preset,
header metadata other than the description.
Nothing here unpickles; safetensors parses a JSON header and raw little-endian buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .dit import DiT, DiTConfig
from .errors import DDMError
from .fsutil import atomic_path
from .privacy import Guarantee, PrivacyError
from .router import Router, RouterConfig

FORMAT = "ddm.checkpoint/1"
MODEL_KINDS: dict[str, tuple[type, type]] = {
    "expert": (DiTConfig, DiT),
    "router": (RouterConfig, Router),
    "student": (DiTConfig, DiT),
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
# How deep lists and objects may nest in a description: a config is flat, metrics a few levels.
MAX_DEPTH = 32


class CheckpointError(DDMError, ValueError):
    """A checkpoint that ddm refuses to load; the message says why."""


@dataclass
class CheckpointInfo:
    """The JSON description stored in a checkpoint's header."""

    kind: str
    model: dict
    cluster_id: int | None = None
    steps: int = 0
    flops: int = 0
    data_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    # A differentially private expert's guarantee (privacy.Guarantee); absent from the header
    # of any other checkpoint.
    privacy: dict | None = None

    def to_json(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "privacy" or v is not None}
        return json.dumps({"format": FORMAT, **fields}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, where: str) -> CheckpointInfo:
        """Parse and check a description; anything else than one raises CheckpointError."""
        if text is None:
            raise CheckpointError(f"{where} has no ddm description in its header; it was not written by ddm")
        data = _parse_json(text, f"{where}: the ddm description")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{where}: unsupported checkpoint format (expected {FORMAT})")
        data.pop("format")
        known = set(cls.__dataclass_fields__)
        if set(data) - known or {"kind", "model"} - set(data):
            names = [name[:40] for name in sorted(data)[:12]]
            raise CheckpointError(f"{where}: the ddm description has fields {names}, expected {sorted(known)}")
        info = cls(**data)
        if not isinstance(info.kind, str) or info.kind not in MODEL_KINDS:
            raise CheckpointError(
                f"{where}: unknown model kind {str(info.kind)[:40]!r}; expected one of {', '.join(MODEL_KINDS)}"
            )
        if not isinstance(info.model, dict):
            raise CheckpointError(f"{where}: model must be an object (the model's config)")
        if info.cluster_id is not None and (isinstance(info.cluster_id, bool) or not isinstance(info.cluster_id, int)):
            raise CheckpointError(f"{where}: cluster_id must be an integer or null")
        for name in ("steps", "flops"):
            value = getattr(info, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{where}: {name} must be a non-negative integer")
        if not isinstance(info.data_fingerprint, str) or not isinstance(info.metrics, dict):
            raise CheckpointError(f"{where}: data_fingerprint must be a string and metrics an object")
        if info.privacy is not None:
            try:
                Guarantee.from_dict(info.privacy)
            except PrivacyError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            if info.privacy["steps"] != info.steps:
                raise CheckpointError(f"{where}: its privacy guarantee counts other steps than it was trained for")
        return info


def _parse_json(text: str, what: str) -> object:
    """JSON from a stranger: CheckpointError for anything Python's parser would raise, and for
    nesting deeper than MAX_DEPTH, which later code (repr, json.dumps) would recurse over."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} is not valid JSON ({exc})") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise CheckpointError(f"{what} holds a number too long to read") from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if _depth_over(data, MAX_DEPTH):
        raise CheckpointError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
    return data


def _depth_over(value: object, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` levels deep (without recursing)."""
    pending = [(value, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                pending.append((child, depth + 1))
    return False


def _printable(text: str) -> str:
    """``text`` on one line: line breaks and other unprintable characters escaped as repr does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def model_config(kind: str, config: dict):
    """Parse a kind + JSON config into its config dataclass (ConfigError on bad input)."""
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind][0].from_dict(config)


def build_model(kind: str, config: dict, device: str | torch.device = "cpu") -> nn.Module:
    cfg = model_config(kind, config)
    with torch.device(device):
        return MODEL_KINDS[kind][1](cfg)


def kind_of(model: nn.Module) -> str:
    for kind, (_, cls) in MODEL_KINDS.items():
        if isinstance(model, cls):
            return kind
    raise CheckpointError(f"cannot checkpoint a {type(model).__name__}; expected a DiT or a Router")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cluster_id: int | None = None,
    steps: int = 0,
    flops: int = 0,
    data_fingerprint: str = "",
    metrics: dict | None = None,
    kind: str | None = None,
    privacy: dict | None = None,
) -> CheckpointInfo:
    """Write the model's float32 weights and its description, atomically. ``kind`` defaults to
    what the model is (a DiT is an expert unless it is said to be a student); ``privacy`` is a
    DP-SGD run's guarantee."""
    if kind is None:
        kind = kind_of(model)
    elif kind not in MODEL_KINDS or not isinstance(model, MODEL_KINDS[kind][1]):
        raise CheckpointError(f"a {type(model).__name__} cannot be saved as a {kind!r}")
    info = CheckpointInfo(
        kind=kind,
        model=model.config.to_dict(),
        cluster_id=cluster_id,
        steps=int(steps),
        flops=int(flops),
        data_fingerprint=data_fingerprint,
        metrics=dict(metrics or {}),
        privacy=privacy,
    )
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ddm": info.to_json()})
    return info


def _check_container(path: Path) -> None:
    """Refuse anything that does not even look like a safetensors file, before parsing it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and header_len <= min(size - 8, MAX_HEADER_BYTES):
        return  # the shape of a safetensors file; safetensors itself checks the rest
    # Not safetensors. Name the common impostors: a pickle (protocol 2+ starts with 0x80 and
    # the protocol number) or a torch.save zip archive.
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a pickle or torch.save file, not safetensors; ddm never unpickles checkpoints"
        )
    if len(head) < 9:
        raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
    raise CheckpointError(f"{path} is not a safetensors file (bad header)")


def read_checkpoint_header(path: str | Path) -> tuple[CheckpointInfo, dict[str, tuple[str, tuple[int, ...]]]]:
    """The description and the tensor table (name -> dtype, shape), reading no tensor data."""
    path = Path(path)
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            table = {}
            for name in f.keys():
                tensor_slice = f.get_slice(name)
                table[name] = (str(tensor_slice.get_dtype()), tuple(tensor_slice.get_shape()))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
    info = CheckpointInfo.from_json(metadata.get("ddm"), str(path))
    extra = sorted(set(metadata) - {"ddm"})
    if extra:  # nothing rides along, unchecked, into a signed and republished file
        names = [name[:40] for name in extra[:3]]
        raise CheckpointError(
            f"{path}: unexpected header metadata {names}; a ddm checkpoint holds only its description"
        )
    return info, table


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}.get(
        dtype, str(dtype)
    )


def verify_checkpoint(
    path: str | Path, expect_kind: str | None = None, expect_config: dict | None = None
) -> CheckpointInfo:
    """Check a checkpoint fully without building it for use: container, description, config,
    tensor names, shapes, dtypes and finiteness (one tensor in memory at a time). Returns the
    description."""
    info, _ = _verified(Path(path), expect_kind, expect_config, keep=False)
    return info


def _verified(
    path: Path, expect_kind: str | None, expect_config: dict | None, keep: bool
) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The checks of ``verify_checkpoint``; with ``keep``, also the tensors it read."""
    info, table = read_checkpoint_header(path)
    if expect_kind is not None and info.kind != expect_kind:
        raise CheckpointError(f"{path} holds a {info.kind}, expected a {expect_kind}")
    try:
        cfg = model_config(info.kind, info.model)
    except ValueError as exc:  # a ConfigError, which may quote the file's field names
        raise CheckpointError(f"{path}: {_printable(str(exc))}") from None
    if expect_config is not None and cfg.to_dict() != model_config(info.kind, expect_config).to_dict():
        raise CheckpointError(f"{path}: model config {cfg.to_dict()} differs from the expected {expect_config}")

    expected = build_model(info.kind, info.model, device="meta").state_dict()
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise CheckpointError(f"{path}: {'; '.join(parts)}")
    for name, ref in expected.items():
        dtype, shape = table[name]
        if shape != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, expected {list(ref.shape)}")
        if dtype != _dtype_name(ref.dtype):
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, expected {_dtype_name(ref.dtype)}")
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for name in expected:
            tensor = f.get_tensor(name)
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
            if keep:
                state[name] = tensor
    return info, state


def load_checkpoint(
    path: str | Path,
    expect_kind: str | None = None,
    expect_config: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """Verify, rebuild and load a model; returns (model in eval mode, description)."""
    info, state = _verified(Path(path), expect_kind, expect_config, keep=True)
    model = build_model(info.kind, info.model, device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), info
