"""Small training problems shared by the balancer tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts how often gradients flow through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        CountBackward.calls += 1
        return grad


class TinyMTL(nn.Module):
    """Linear-tanh trunk and one linear head per task; losses of very different scales."""

    def __init__(self, tasks: list[str], scales: list[float] | None = None) -> None:
        super().__init__()
        self.tasks = tasks
        self.scales = scales or [1.0] * len(tasks)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})
        self.count = False

    def losses(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        z = self.trunk(x)
        if self.count:
            z = CountBackward.apply(z)
        out = {
            t: s * (self.heads[t](z).squeeze(-1) - y[:, i]).pow(2).mean()
            for i, (t, s) in enumerate(zip(self.tasks, self.scales))
        }
        return out, z


def make_batches(n: int, k: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, k, generator=g)) for _ in range(n)]


def train(
    model: TinyMTL,
    balancer,
    batches: list[tuple[Tensor, Tensor]],
    *,
    epoch_every: int = 5,
    context: Callable[[int], dict] | None = None,
    lr: float = 0.01,
    opt: torch.optim.Optimizer | None = None,
) -> tuple[list[dict[str, float]], torch.optim.Optimizer]:
    """Run the batches; returns the weights of every step (and the optimiser, to resume)."""
    if opt is None:
        opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=lr)
    out = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        losses, z = model.losses(x, y)
        ctx = context(i) if context else {}
        step = balancer.backward(losses, shared=model.trunk.parameters(), features=z, **ctx)
        opt.step()
        if balancer.needs_after_step:
            with torch.no_grad():
                balancer.after_step(model.losses(x, y)[0])
        out.append(step.weights)
        if (i + 1) % epoch_every == 0:
            balancer.new_epoch()
    return out, opt
