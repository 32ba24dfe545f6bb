"""MGDA: the minimum-norm point of the convex hull of the task gradients (and MGDA-UB)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting
from mtlkit.balancers._registry import register
from mtlkit.balancers._solvers import frank_wolfe_min_norm, min_norm_simplex, to_host

Normalization = Literal["none", "l2", "loss", "loss+"]
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "loss", "loss+")
Solver = Literal["exact", "frank_wolfe"]
SOLVERS: tuple[str, ...] = ("exact", "frank_wolfe")


def two_task_min_norm(gramian: Tensor) -> Tensor:
    """Closed form of the min-norm point of the segment [g_1, g_2], as weights (gamma, 1-gamma).

    ``gamma = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``; computed on the device, without a
    host transfer. Equal gradients (a zero denominator) give (1/2, 1/2).
    """
    g11, g12, g22 = gramian[0, 0], gramian[0, 1], gramian[1, 1]
    denom = g11 + g22 - 2 * g12
    gamma = ((g22 - g12) / denom.clamp_min(torch.finfo(denom.dtype).tiny)).clamp(0, 1)
    gamma = torch.where(denom > 0, gamma, torch.full_like(gamma, 0.5))
    return torch.stack([gamma, 1 - gamma])


@register("mgda")
class MGDA(GramianWeighting):
    r"""Multiple-gradient descent: the update is the minimum-norm point of the convex hull of the
    task gradients, a direction that decreases every task's loss (or 0 at a Pareto-stationary
    point).

    Proposed for multi-task learning in Sener & Koltun, *Multi-Task Learning as Multi-Objective
    Optimization* (NeurIPS 2018, arXiv:1810.04650), Algorithm 2, after Désidéri's MGDA (2012):

    .. math::  \alpha^\star = \arg\min_{\alpha \in \Delta^K} \Big\| \sum_k \alpha_k \hat g_k
        \Big\|^2, \qquad \hat g_k = g_k / c_k, \qquad d = \sum_k \alpha^\star_k \hat g_k,

    so the effective weights are :math:`w_k = \alpha^\star_k / c_k` and
    :math:`\langle d, g_j \rangle \ge c_j \|d\|^2 \ge 0` for every task. The normaliser
    :math:`c_k` is 1 (``"none"``), :math:`\|g_k\|` (``"l2"``), :math:`L_k` (``"loss"``) or
    :math:`L_k \|g_k\|` (``"loss+"``), the options of the authors' code. With
    ``grad_on="features"`` this is MGDA-UB (the paper's upper bound, Section 3.3): the hull is
    taken of the gradients of the shared representation.

    Two tasks are solved by the closed form
    :math:`\gamma = \mathrm{clip}((G_{22} - G_{12}) / (G_{11} + G_{22} - 2 G_{12}), 0, 1)` on the
    device. More tasks go to the host (one K x K transfer), where ``solver="exact"`` (default)
    runs Wolfe's finite active-set algorithm, which returns the minimiser itself, and
    ``solver="frank_wolfe"`` the paper's Algorithm 2 (Frank-Wolfe from the uniform weights, line
    search by the same two-point closed form, at most 250 steps, stop when the weights move by
    less than 1e-5: the constants of the authors' code).

    .. note:: Frank-Wolfe converges sublinearly and stops at a tolerance, off the minimiser;
       hence the exact default (checked against a generic QP solver in the tests). The
       authors' Frank-Wolfe clips its step to [0.001, 0.999] at the segment's ends; ours takes
       the exact step in [0, 1]. The authors' code multiplies the *unnormalised* losses by
       :math:`\alpha` after solving on normalised gradients; we apply
       :math:`w_k = \alpha_k / c_k`, the weights of the direction that was actually solved for,
       which keeps the common-descent guarantee. Ties (non-unique weights, e.g. equal gradients)
       are broken deterministically.

    Args:
        tasks: task names.
        normalization: ``"none"`` (paper, Algorithm 2; default), ``"l2"``, ``"loss"`` or
            ``"loss+"``. The loss normalisers use :math:`|L_k|`. A zero normaliser (zero
            gradient or zero loss) leaves that gradient at zero.
        solver: ``"exact"`` (default) or ``"frank_wolfe"`` (the paper's), for K > 2.
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._mgda import MGDA
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> losses = [p @ torch.tensor([1.0, 0.0]), p @ torch.tensor([0.0, 2.0])]
        >>> step = MGDA(["a", "b"]).backward(losses, shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 0.8, 'b': 0.2}
        >>> p.grad  # the min-norm point of the segment [(1, 0), (0, 2)]
        tensor([0.8000, 0.4000])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        normalization: Normalization = "none",
        solver: Solver = "exact",
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        self.normalization = normalization
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver

    def _normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            return norms
        if self.normalization == "loss":
            return losses.to(gramian.dtype).abs()
        if self.normalization == "loss+":
            return losses.to(gramian.dtype).abs() * norms
        return torch.ones_like(norms)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        if k == 1:
            return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
        g = gramian.double()
        c = self._normalizers(g, losses)
        usable = c > 0
        inv = torch.where(usable, 1.0 / c.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
        normalized = g * inv[:, None] * inv[None, :]
        if k == 2:
            alpha = two_task_min_norm(normalized)
        else:
            solve = min_norm_simplex if self.solver == "exact" else frank_wolfe_min_norm
            alpha = solve(to_host(normalized)).to(gramian.device)
        return (alpha * inv).to(gramian.dtype)

    def extra_repr(self) -> str:
        return (f"normalization={self.normalization!r}, solver={self.solver!r}, "
                f"{super().extra_repr()}")
