"""Hard Jacobians for the property tests of the issue-11 methods: float32, per-task scales from
1e-4 to 1e4, more tasks than gradient dimensions, and zero, identical and opposite rows."""

from __future__ import annotations

import torch
from _inputs import random_jacobian
from torch import Tensor

F32 = torch.float32


def hard_jacobians(k: int = 3, p: int = 6, seed: int = 0) -> dict[str, Tensor]:
    """Named (K, P) Jacobians (float64 values; ``run`` feeds them to a float32 model unless told
    otherwise). ``k_gt_dim`` has K + 2 rows in K - 1 dimensions."""
    base = random_jacobian(k, p, seed=seed)
    scales = torch.logspace(-4, 4, k, dtype=base.dtype)
    zero_row = base.clone()
    zero_row[1] = 0
    g = base[0]
    return {
        "random": base,
        "scales_1e-4_1e4": base * scales[:, None],
        "k_gt_dim": random_jacobian(k + 2, k - 1, seed=seed + 1),
        "zero_row": zero_row,
        "identical": g.expand(k, p).clone(),
        "opposite": torch.stack([g, -g, *([g] * (k - 2))]),
    }


def cosines(d: Tensor, jac: Tensor) -> Tensor:
    """cos(d, g_k) for every row (float64)."""
    d, jac = d.double(), jac.double()
    return (jac @ d) / (jac.norm(dim=1) * d.norm())
