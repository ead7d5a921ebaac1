"""Counting floating-point operations, so that runs can be compared FLOP-for-FLOP.

Counts come from PyTorch's FlopCounterMode run over one real call, not from a hand formula,
so they follow whatever the model does. Its table lacks the CPU flavour of fused attention;
it is added here with PyTorch's own attention formulas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter

aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    extra = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = formula
    return extra


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward, and backward if ``fn`` runs one)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())
