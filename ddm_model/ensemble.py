"""The routed ensemble: u(x_t, t) = sum_k p(k | x_t, t) v_k(x_t, t).

Built from any velocity callables v_k(x, t[, y]) and any router callable r(x, t) -> logits
(trained modules or plain functions). Routing is chosen again at every step and for every
sample:

- ``full``: the whole mixture, every expert on every sample;
- ``topk`` (``top2``, ``top3``, ...): the k most probable experts, weights renormalised;
- ``top1``: the single most probable expert.

Dispatch is sparse: an expert runs once per call, batched over exactly the samples routed to
it, so top-1 costs about one expert evaluation per sample plus the router.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from .errors import UsageError
from .flow import Velocity, call_velocity, integrate

Router = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # r(x, t) -> logits (B, K)


def parse_routing(routing: str, num_experts: int) -> int:
    """How many experts each sample uses: 'full' -> K, 'top1' -> 1, 'topk' -> k."""
    if routing == "full":
        return num_experts
    match = re.fullmatch(r"top(\d+)", routing)
    if not match or int(match.group(1)) < 1:
        raise UsageError(f"unknown routing {routing!r}; use 'full', 'top1', 'top2', ...")
    k = int(match.group(1))
    if k > num_experts:
        raise UsageError(f"routing {routing!r} asks for {k} experts but the ensemble has {num_experts}")
    return k


def mix(
    experts: Sequence[Velocity],
    x: torch.Tensor,
    t: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor | None = None,
    counts: list[int] | None = None,
) -> torch.Tensor:
    """sum_k w[:, k] v_k(x, t) with sparse dispatch: expert k runs once, batched over exactly
    the rows where its weight is non-zero (``counts[k]`` grows by that many rows)."""
    out = torch.zeros_like(x)
    for k, expert in enumerate(experts):
        rows = w[:, k].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if counts is not None:
            counts[k] += rows.numel()
        v = call_velocity(expert, x[rows], t[rows], None if y is None else y[rows])
        weight = w[rows, k].view(-1, *([1] * (x.dim() - 1))).to(v.dtype)
        out.index_add_(0, rows, (weight * v).to(out.dtype))
    return out


class RoutedEnsemble:
    def __init__(self, experts: Sequence[Velocity], router: Router):
        if not experts:
            raise UsageError("an ensemble needs at least one expert")
        self.experts = list(experts)
        self.router = router
        # Rows each expert has evaluated since the last reset: the cost of routing, measured.
        self.expert_rows = [0] * len(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def reset_counts(self) -> None:
        self.expert_rows = [0] * len(self.experts)

    def weights(self, x: torch.Tensor, t: torch.Tensor, routing: str = "full") -> torch.Tensor:
        """(B, K) mixture weights: the router's posterior, kept on the top k and renormalised."""
        k = parse_routing(routing, len(self.experts))
        logits = self.router(x, t)
        # Half-precision logits (autocast) are softmaxed in float32; float64 stays float64.
        probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        if probs.shape != (x.shape[0], len(self.experts)):
            raise UsageError(
                f"router returned shape {tuple(probs.shape)}, expected ({x.shape[0]}, {len(self.experts)})"
            )
        if k == len(self.experts):
            return probs
        top, index = probs.topk(k, dim=-1)
        return torch.zeros_like(probs).scatter_(-1, index, top / top.sum(dim=-1, keepdim=True))

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, routing: str = "full"
    ) -> torch.Tensor:
        return mix(self.experts, x, t, self.weights(x, t, routing), y, self.expert_rows)

    def as_velocity(self, routing: str) -> Velocity:
        def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return self.velocity(x, t, y, routing)

        return velocity

    def sample(
        self,
        noise: torch.Tensor,
        steps: int,
        routing: str = "top1",
        method: str = "euler",
        y: torch.Tensor | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        return integrate(self.as_velocity(routing), noise, steps, method, y, on_step)
