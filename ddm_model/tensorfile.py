"""Safetensors files that carry a JSON description: clusterings and dataset shards.

The description sits in the header's metadata under ``ddm``, with a ``format`` field naming
what the file is; reading refuses a file of another format with one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .fsutil import atomic_path


def write_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], description: dict) -> None:
    """Write atomically; the same tensors and description always give the same bytes."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ddm": json.dumps(description, sort_keys=True)})


def read_tensor_file(
    path: str | Path, fmt: str, what: str, error: type[Exception]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors) of a file whose description names format ``fmt``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            description = json.loads((f.metadata() or {}).get("ddm", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:  # ValueError: bad JSON, a number too long to read
        raise error(f"{path} is not a ddm {what} file: {str(exc)[:200]}") from None
    except RecursionError:
        raise error(f"{path} is not a ddm {what} file: its description is nested too deeply") from None
    if not isinstance(description, dict) or description.get("format") != fmt:
        raise error(f"{path} is not a ddm {what} file (format {fmt} expected)")
    return description, tensors
