"""Inputs for the gradient-balancer tests: Jacobians with controlled rank, conflict and scale,
losses whose gradients are exactly those Jacobians, and small models."""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor, nn

# The gradient families register their names on import (until balancers/__init__ exports them).
for _module in ("_gradnorm", "_gramian", "_mgda", "_surgery", "_torchjd"):
    importlib.import_module(f"mtlkit.balancers.{_module}")

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_jacobian(k: int, p: int, *, seed: int = 0, rank: int | None = None,
                    scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """A K x P Jacobian of the given rank (full by default), entries of order ``scale``."""
    g = generator(seed)
    r = min(k, p) if rank is None else rank
    if r == 0:
        return torch.zeros(k, p, dtype=dtype)
    left = torch.randn(k, r, generator=g, dtype=F64)
    right = torch.randn(r, p, generator=g, dtype=F64)
    return (scale * left @ right / math.sqrt(r)).to(dtype)


def conflicting_jacobian(k: int, p: int, *, seed: int = 0, strength: float = 0.8,
                         dtype: torch.dtype = F64) -> Tensor:
    """Rows that conflict: ``g_i = u_i - (strength / K) sum_j u_j`` for random unit ``u``. For
    orthonormal ``u`` the inner products are ``strength (strength - 2) / K``, negative for
    ``0 < strength < 2``; at ``strength = 1`` the rows sum to zero (rank K - 1)."""
    g = generator(seed)
    u = torch.randn(k, p, generator=g, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    return (u - strength / k * u.sum(0, keepdim=True)).to(dtype)


def degenerate_jacobians(k: int = 3, p: int = 5) -> dict[str, Tensor]:
    """The inputs every gradient method must survive with finite weights and update. The
    ``tiny`` and ``huge`` cases are ``scaled_base(k, p)`` times 1e-10 and 1e15."""
    base = scaled_base(k, p)
    one = base[:1]
    opposite = torch.cat([one, -one, *([one] * (k - 2))])
    one_zero = base.clone()
    one_zero[1] = 0
    return {
        "zero": torch.zeros(k, p, dtype=F64),
        "identical": one.expand(k, p).clone(),
        "opposite": opposite,
        "tiny": base * 1e-10,
        "huge": base * 1e15,
        "one_zero": one_zero,
        "rank_one": random_jacobian(k, p, seed=3, rank=1),
        "single_task": base[:1].clone(),
    }


def scaled_base(k: int = 3, p: int = 5) -> Tensor:
    """The generic Jacobian that the ``tiny`` and ``huge`` degenerate cases rescale."""
    return random_jacobian(k, p, seed=11)


def linear_losses(jac: Tensor, offset: float | Tensor = 1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[nn.Parameter, list[Tensor]]:
    """A shared parameter p (zeros) and losses ``L_k = offset_k + <J_k, p>``: at p = 0 the
    gradients are exactly the rows of J and the losses equal ``offset`` (positive, so
    log-transforming methods are defined)."""
    p = nn.Parameter(torch.zeros(jac.shape[1], dtype=dtype))
    j = jac.to(dtype)
    off = torch.as_tensor(offset, dtype=dtype).expand(jac.shape[0])
    return p, [off[i] + j[i] @ p for i in range(jac.shape[0])]


def run(balancer, jac: Tensor, offset: float | Tensor = 1.0,
        dtype: torch.dtype = torch.float32):
    """One step on the linear losses of ``jac``; returns (update written to p, step)."""
    p, losses = linear_losses(jac, offset, dtype)
    step = balancer.backward(losses, shared=[p])
    return p.grad, step


class CountBackward(torch.autograd.Function):
    """Identity that counts how many backward passes go through it (a vectorised backward over
    K tasks counts once). Supports ``torch.vmap`` (``is_grads_batched``)."""

    calls = 0
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        CountBackward.calls += 1
        return grad


class Net(nn.Module):
    """Trunk (Linear-Tanh-Linear-Tanh, with a backward counter after its first layer) and one
    linear head per task; a task in ``detached`` reads the raw input instead of the trunk."""

    def __init__(self, tasks: list[str], scales: list[float] | None = None,
                 detached: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tasks = tasks
        self.scales = scales or [1.0] * len(tasks)
        self.first = nn.Linear(6, 8)
        self.last = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(6 if t in detached else 8, 1) for t in tasks})
        self.detached = detached

    def shared(self) -> list[nn.Parameter]:
        return [*self.first.parameters(), *self.last.parameters()]

    def losses(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        h = CountBackward.apply(self.first(x))
        z = torch.tanh(self.last(torch.tanh(h)))
        out = {}
        for i, (t, s) in enumerate(zip(self.tasks, self.scales)):
            pred = self.heads[t](x if t in self.detached else z).squeeze(-1)
            out[t] = s * (pred - y[:, i]).pow(2).mean()
        return out, z


def batches(n: int, k: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = generator(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, k, generator=g)) for _ in range(n)]
