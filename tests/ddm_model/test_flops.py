"""FLOP counts are measured, and exact on ops with known cost."""

import torch
import torch.nn.functional as F

from ddm_model.dit import DiT, DiTConfig
from ddm_model.flops import count_flops


def test_linear_forward_and_backward():
    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 16 * 32
    # backward: grad wrt input and wrt weight, each another 2*B*I*O
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 16 * 32


def test_cpu_attention_is_counted():
    b, h, n, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * n * n * d


def test_model_flops_scale_with_batch():
    model = DiT(DiTConfig("tiny", 8, 1))

    def step(batch):
        return lambda: model(torch.randn(batch, 1, 8, 8), torch.rand(batch)).sum().backward()

    assert count_flops(step(32)) == 2 * count_flops(step(16)) > 0
