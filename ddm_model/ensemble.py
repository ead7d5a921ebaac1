"""The routed ensemble: u(x_t, t) = sum_k p(k | x_t, t) v_k(x_t, t).

Built from any velocity callables v_k(x, t[, y]) and any router callable r(x, t[, y]) ->
logits (trained modules or plain functions). Routings:

- ``ancestral``: the expert is drawn ONCE per sample, k ~ p(k) (or p(k | y) when sampling
  class y), and runs alone for the whole trajectory. Since p = sum_k pi_k p_k, this is exact
  in distribution when the experts are exact, costs one expert per step and needs no router at
  all; the paper's "Oracle" row is the same idea. The shares pi_k come with the ensemble
  (``prior``, ``class_prior``); without them the experts are taken as equally likely.
- ``full``: the whole mixture, every expert on every sample, chosen again at every step;
- ``topk`` (``top2``, ``top3``, ...): the k most probable experts, weights renormalised;
- ``top1``: the single most probable expert, re-chosen at every step.

Dispatch is sparse: an expert runs once per call, batched over exactly the samples routed to
it, so top-1 and ancestral cost about one expert evaluation per sample (top-1 plus the router).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from .errors import UsageError
from .flow import Velocity, call_velocity, guided, integrate

Router = Callable[..., torch.Tensor]  # r(x, t) or r(x, t, y) -> logits (B, K)
ANCESTRAL = "ancestral"
ROUTINGS_HELP = "'ancestral', 'full', 'top1', 'top2', ..."


def parse_routing(routing: str, num_experts: int) -> int:
    """How many experts each sample uses per step: 'ancestral' and 'top1' -> 1, 'full' -> K,
    'topk' -> k."""
    if routing == ANCESTRAL:
        return 1
    if routing == "full":
        return num_experts
    match = re.fullmatch(r"top(\d+)", routing)
    if not match or int(match.group(1)) < 1:
        raise UsageError(f"unknown routing {routing!r}; use {ROUTINGS_HELP}")
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


def shares(counts: Sequence[float] | torch.Tensor, what: str = "shares") -> torch.Tensor:
    """Counts (or weights) -> a probability vector, refusing negative, non-finite or all-zero input."""
    p = torch.as_tensor(counts, dtype=torch.float64)
    if p.dim() != 1 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise UsageError(f"{what} must be non-negative finite numbers with a positive sum, got {p.tolist()}")
    return p / p.sum()


class RoutedEnsemble:
    """K experts, a router and the experts' shares of the data.

    ``prior`` (K,) are the cluster shares pi_k (counts or weights; uniform when absent);
    ``class_prior`` (C, K) holds each class's counts per cluster, so that p(k | y) is its row
    normalised. Both only matter to ``ancestral`` routing. The router is given the labels
    (``r(x, t, y)``) when ``router_takes_labels``, by default when it is a class-conditional
    ``Router``.
    """

    def __init__(
        self,
        experts: Sequence[Velocity],
        router: Router | None,
        prior: Sequence[float] | torch.Tensor | None = None,
        class_prior: Sequence[Sequence[float]] | torch.Tensor | None = None,
        router_takes_labels: bool | None = None,
    ):
        if not experts:
            raise UsageError("an ensemble needs at least one expert")
        self.experts = list(experts)
        self.router = router
        # A class-conditional router sees the labels; by default, a Router with num_classes.
        if router_takes_labels is None:
            router_takes_labels = bool(getattr(router, "num_classes", 0))
        self.router_takes_labels = router_takes_labels
        k = len(self.experts)
        self.prior = shares([1.0] * k if prior is None else prior, "cluster shares")
        if self.prior.shape != (k,):
            raise UsageError(f"{self.prior.shape[0]} cluster shares for {k} experts")
        self.class_prior = None
        if class_prior is not None:
            table = torch.as_tensor(class_prior, dtype=torch.float64)
            if table.dim() != 2 or table.shape[1] != k:
                raise UsageError(f"class shares must be (classes, {k}), got {tuple(table.shape)}")
            if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
                raise UsageError("class shares must be non-negative finite numbers")
            self.class_prior = table
        # Rows each expert has evaluated since the last reset: the cost of routing, measured.
        self.expert_rows = [0] * k

    @classmethod
    def from_shares(cls, experts: Sequence[Velocity], router: Router | None, shares: dict) -> RoutedEnsemble:
        """From a manifest's checked shares (``protocol.shares``): its cluster shares as p(k)
        (uniform when absent) and, with per-class counts (a row of class counts per expert),
        p(k | y) from the transpose of that table."""
        classes = shares.get("classes")
        class_prior = [list(row) for row in zip(*classes, strict=True)] if classes and classes[0] else None
        return cls(experts, router, prior=shares.get("clusters"), class_prior=class_prior)

    def __len__(self) -> int:
        return len(self.experts)

    def reset_counts(self) -> None:
        self.expert_rows = [0] * len(self.experts)

    # -- per-step routing ------------------------------------------------------------------

    def weights(
        self, x: torch.Tensor, t: torch.Tensor, routing: str = "full", y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, K) mixture weights: the router's posterior, kept on the top k and renormalised."""
        if routing == ANCESTRAL:
            raise UsageError("ancestral routing draws its expert once per sample: use sampler(), not weights()")
        k = parse_routing(routing, len(self.experts))
        if self.router is None:
            raise UsageError(f"routing {routing!r} needs a router and this ensemble has none; use 'ancestral'")
        logits = self.router(x, t, y) if y is not None and self.router_takes_labels else self.router(x, t)
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
        return mix(self.experts, x, t, self.weights(x, t, routing, y), y, self.expert_rows)

    def as_velocity(self, routing: str) -> Velocity:
        """A velocity routed again at every step (not for 'ancestral': see ``sampler``)."""
        parse_routing(routing, len(self.experts))
        if routing == ANCESTRAL:
            raise UsageError("ancestral routing draws its expert once per sample: use sampler(), not as_velocity()")

        def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return self.velocity(x, t, y, routing)

        return velocity

    # -- ancestral routing -----------------------------------------------------------------

    def expert_probabilities(self, y: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) p(k), or (B, K) p(k | y_i) for labels y (a class no cluster holds falls back to p(k))."""
        if y is None:
            return self.prior
        if self.class_prior is None:
            return self.prior.expand(y.shape[0], -1)
        rows = torch.zeros((y.shape[0], len(self.experts)), dtype=torch.float64)
        known = (y >= 0) & (y < self.class_prior.shape[0])
        rows[known] = self.class_prior[y[known].cpu()]
        empty = rows.sum(dim=1) <= 0
        rows[empty] = self.prior
        return rows / rows.sum(dim=1, keepdim=True)

    def draw_experts(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One expert per sample: (n,) indices drawn from p(k) or p(k | y)."""
        p = self.expert_probabilities(y)
        if p.dim() == 1:
            return torch.multinomial(p, n, replacement=True, generator=generator)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def with_experts(self, choice: torch.Tensor) -> Velocity:
        """The velocity of each row's own expert, ``choice[i]`` for row i, dispatched sparsely.

        The choice is fixed for the whole trajectory, so each expert's rows are found once, not
        at every step (on a GPU, finding them waits for the device); an expert that holds every
        row runs on the batch itself, without a gather or a scatter."""
        choice = choice.long().cpu()
        groups = [(k, rows) for k in range(len(self.experts)) if (rows := (choice == k).nonzero().squeeze(1)).numel()]
        on_device: dict[torch.device, list[torch.Tensor]] = {}

        def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            if x.shape[0] != choice.shape[0]:
                raise UsageError(f"{choice.shape[0]} experts drawn for a batch of {x.shape[0]}")
            if x.device not in on_device:
                on_device[x.device] = [rows.to(x.device) for _, rows in groups]
            if len(groups) == 1:
                k = groups[0][0]
                self.expert_rows[k] += x.shape[0]
                return call_velocity(self.experts[k], x, t, y)
            out = torch.empty_like(x)
            for (k, _), rows in zip(groups, on_device[x.device], strict=True):
                self.expert_rows[k] += rows.numel()
                v = call_velocity(self.experts[k], x[rows], t[rows], None if y is None else y[rows])
                out[rows] = v.to(out.dtype)
            return out

        return velocity

    # -- sampling --------------------------------------------------------------------------

    def guided(self, scale: float, null_label: int) -> RoutedEnsemble:
        """The same ensemble with classifier-free guidance applied to every expert."""
        experts = [guided(e, scale, null_label) for e in self.experts]
        out = RoutedEnsemble(experts, self.router, self.prior, self.class_prior, self.router_takes_labels)
        out.expert_rows = self.expert_rows  # the guided experts' rows count here too
        return out

    def sampler(self, routing: str) -> Sampler:
        """What ``recipe.generate`` integrates for this routing: per batch, for 'ancestral', a
        draw of one expert per sample from the batch's own random stream."""
        parse_routing(routing, len(self.experts))
        if routing != ANCESTRAL:
            return fixed(self.as_velocity(routing))

        def for_batch(n: int, y: torch.Tensor | None, generator: torch.Generator | None) -> Velocity:
            return self.with_experts(self.draw_experts(n, None if y is None else y.cpu(), generator))

        return Sampler(for_batch)

    def sample(
        self,
        noise: torch.Tensor,
        steps: int,
        routing: str = ANCESTRAL,
        method: str = "euler",
        y: torch.Tensor | None = None,
        on_step: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        velocity = self.sampler(routing)(noise.shape[0], y, generator)
        return integrate(velocity, noise, steps, method, y, on_step)


class Sampler:
    """What ``recipe.generate`` integrates: for each batch of n samples (labels y, or None) it
    gives the velocity to follow, drawing what it needs per sample from the batch's own
    ``generator`` (ancestral routing draws the experts there)."""

    def __init__(self, for_batch: Callable[[int, torch.Tensor | None, torch.Generator | None], Velocity]):
        self.for_batch = for_batch

    def __call__(self, n: int, y: torch.Tensor | None, generator: torch.Generator | None) -> Velocity:
        return self.for_batch(n, y, generator)


def fixed(velocity: Velocity) -> Sampler:
    """A sampler that integrates the same velocity for every batch."""
    return Sampler(lambda n, y, generator: velocity)
