"""FairGrad: task weights from alpha-fair utility maximisation (a pure ``gramian -> weights``
solver, :func:`alpha_fair_weights`, and the class)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting, positive
from mtlkit.balancers._functional import GRADIENT_EPS
from mtlkit.balancers._registry import register
from mtlkit.balancers._solvers import min_norm_simplex, to_host

_F64 = torch.float64


def _utility(w: Tensor, alpha: float) -> Tensor:
    """sum_i phi(w_i) with phi'(w) = w^(-1/alpha)."""
    if alpha == 1.0:
        return torch.log(w).sum()
    e = 1.0 - 1.0 / alpha
    return (w**e / e).sum()


def alpha_fair_weights(gramian: Tensor, alpha: float, *, tol: float = 1e-10,
                       max_iter: int = 200) -> Tensor | None:
    r"""The positive solution of :math:`G w = w^{-1/\alpha}` (elementwise), or None if there is
    none.

    It is the minimiser of the strictly convex
    :math:`f(w) = \tfrac12 w^\top G w - \sum_i \varphi(w_i)`, :math:`\varphi'(w) = w^{-1/\alpha}`
    (:math:`\log w` for :math:`\alpha = 1`), found by Newton steps with a backtracking line search
    that keeps :math:`w > 0`. The problem is solved on :math:`G / \|G\|_F` and rescaled
    (:math:`w` scales as :math:`s^{-\alpha/(\alpha+1)}` when G is multiplied by s). It has no
    solution exactly when no direction improves every task (0 is in the convex hull of the
    gradients); the iterates then diverge and None is returned.

    Args:
        gramian: (K, K) Gram matrix with a positive diagonal.
        alpha: :math:`\alpha > 0`.

    Returns:
        (K,) float64 CPU weights, or None.
    """
    k = gramian.shape[0]
    g = to_host(gramian)
    scale = float(torch.linalg.matrix_norm(g))
    if not scale > 0 or not math.isfinite(scale):
        return None
    g = g / scale
    # the solution when the gradients are orthogonal and of equal norm: sets each task's scale
    start = (g.diagonal().clamp_min(1e-300) * k) ** (-alpha / (alpha + 1.0))
    w = start
    inv = 1.0 / alpha
    for _ in range(max_iter):
        gw = g @ w
        if float((gw * w**inv - 1.0).abs().max()) <= tol:
            return w * scale ** (-alpha / (alpha + 1.0))
        grad = gw - w ** (-inv)
        hess = g + torch.diag(inv * w ** (-inv - 1.0))
        step, info = torch.linalg.solve_ex(hess, grad)
        if int(info) != 0 or not bool(torch.isfinite(step).all()):
            return None
        t = 1.0
        shrink = step > 0
        if bool(shrink.any()):  # stay strictly positive
            t = min(1.0, 0.99 * float((w[shrink] / step[shrink]).min()))
        f0 = 0.5 * float(w @ gw) - float(_utility(w, alpha))
        slope = float(grad @ step)  # the squared Newton decrement
        # near the solution the decrease of f is below its rounding: take Newton's full step
        while slope > 1e-8 and t > 1e-12:
            new = w - t * step
            f1 = 0.5 * float(new @ g @ new) - float(_utility(new, alpha))
            if f1 <= f0 - 1e-4 * t * slope:
                break
            t /= 2
        w = (w - t * step).clamp_min(1e-300)
        if float((w / start).max()) > 1e12:
            return None
    return None


def _pareto_stationary(gramian: Tensor) -> bool:
    """Whether 0 is in the convex hull of the gradients, up to their float32 rounding."""
    lam = min_norm_simplex(gramian)
    tol = 10 * gramian.shape[0] * GRADIENT_EPS
    return float(lam @ gramian @ lam) <= tol * float(gramian.diagonal().max())


@register("fairgrad")
class FairGrad(GramianWeighting):
    r"""FairGrad: the update maximises an :math:`\alpha`-fair sum of the tasks' improvements.

    Proposed in Ban & Ji, *Fair Resource Allocation in Multi-Task Learning* (ICML 2024,
    arXiv:2402.15638), Algorithm 1. With :math:`d = \sum_k w_k g_k`, the weights solve

    .. math::  G w = w^{-1/\alpha} \quad(\text{elementwise}), \qquad
        \text{i.e.}\ \langle g_k, d\rangle = w_k^{-1/\alpha} > 0 \text{ for every task},

    the optimality condition of :math:`\max_d \sum_k u_\alpha(\langle g_k, d\rangle)` with the
    :math:`\alpha`-fair utility. :math:`\alpha = 1` is proportional fairness (Nash-MTL's
    condition), :math:`\alpha \to \infty` max-min fairness, and :math:`\alpha = 0` the plain mean
    (equal weights 1/K). Solved exactly by Newton on the K weights (:func:`alpha_fair_weights`),
    after one K x K host transfer.

    .. note:: The official code solves the condition with SciPy's ``least_squares`` (bounded,
       stopped at its tolerances); the solver here reaches it to 1e-10 relative. When no
       direction improves every task (0 is in the convex hull of the gradients: a
       Pareto-stationary point) the condition has no solution and the update is 0, as MGDA's
       there. A task whose gradient is exactly zero takes no part (weight 0). The default
       :math:`\alpha = 2` is the one in the authors' scripts (CelebA, QM9); the paper tunes it
       per benchmark.

    Args:
        tasks: task names.
        alpha: fairness :math:`\alpha \ge 0` (default 2.0).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._fairness import FairGrad
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> step = FairGrad(["a", "b"], alpha=1.0).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 1.0, 'b': 0.5}
        >>> p.grad  # <d, g_k> = 1 / w_k
        tensor([1., 1.])
    """

    def __init__(self, tasks: Sequence[str], *, alpha: float = 2.0, **options: Any) -> None:
        super().__init__(tasks, **options)
        self.alpha = positive("alpha", alpha, allow_zero=True)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        if self.alpha == 0:
            return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
        g = to_host(gramian)
        weights = torch.zeros(k, dtype=_F64)
        active = (g.diagonal() > 0).nonzero().flatten()
        if active.numel():
            sub = g[active][:, active]
            w = alpha_fair_weights(sub, self.alpha)
            if w is not None:
                weights[active] = w
            elif not _pareto_stationary(sub):  # a solution exists: the solver must find it
                raise RuntimeError(f"fairgrad: G w = w^(-1/alpha) was not solved at step "
                                   f"{int(self.step)} although a solution exists")
        return weights.to(device=gramian.device, dtype=gramian.dtype, non_blocking=True)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
