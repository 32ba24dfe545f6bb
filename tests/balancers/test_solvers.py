"""The K x K solvers on their own: optimality conditions on random and conflicting problems,
and agreement with the fallback method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlkit.balancers._solvers import (
    _lower_bounded_qp_primal,
    cagrad_dual,
    lower_bounded_qp,
    min_norm_simplex,
)

F64 = torch.float64


def _gram(k: int, p: int, seed: int, conflict: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=g, dtype=F64)
    j = j - conflict * j.mean(0)  # conflict 1: the mean gradient is 0-ish, many negative pairs
    return j @ j.T


@pytest.mark.parametrize("k", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("conflict", [0.0, 0.9])
def test_lower_bounded_qp_kkt(k: int, conflict: float) -> None:
    gram = _gram(k, 3 * k + 5, seed=k, conflict=conflict)
    q = gram / gram.trace() + 1e-4 * torch.eye(k, dtype=F64)
    lower = torch.eye(k, dtype=F64) / k
    v = lower_bounded_qp(q, lower)
    y = v @ q  # multipliers of the bounds
    scale = float(lower.max())
    assert (v >= lower).all()
    assert (y >= -1e-12 * scale).all()
    assert float(((v - lower) * y).abs().max()) <= 1e-14 * scale
    torch.testing.assert_close(v, _lower_bounded_qp_primal(q, lower), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("k", [2, 3, 7, 40])
def test_min_norm_simplex_optimal(k: int) -> None:
    gram = _gram(k, 2 * k + 3, seed=10 + k, conflict=0.9)
    a = min_norm_simplex(gram)
    assert (a >= 0).all() and math.isclose(float(a.sum()), 1.0, rel_tol=1e-12)
    ga = gram @ a
    # optimality: no vertex is more opposed to x = J^T a than x itself
    assert float(a @ ga - ga.min()) <= 1e-10 * float(gram.diagonal().max())


@pytest.mark.parametrize("k", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9])
def test_cagrad_dual_fixed_point(k: int, c: float) -> None:
    gram = _gram(k, 2 * k + 3, seed=20 + k, conflict=0.5)
    w, lam = cagrad_dual(gram, c)
    g = (gram / gram.trace()).numpy()
    wn = w.numpy()
    assert (wn >= 0).all() and math.isclose(wn.sum(), 1.0, rel_tol=1e-12)
    g0 = math.sqrt(g.mean())
    s = math.sqrt(wn @ g @ wn)
    assert lam == pytest.approx(c * g0 / s, rel=1e-12)
    # w minimises w^T b + rho ||J^T w|| on the simplex: the gradient b + rho G w / s has its
    # least entry on the support of w
    grad = g.mean(1) + c * g0 * (g @ wn) / s
    on = wn > 1e-12
    assert grad[on].max() - grad.min() <= 1e-9 * np.abs(grad).max()


def _cagrad_objective(w: np.ndarray, g: np.ndarray, c: float) -> float:
    return float(w @ g.mean(1) + c * math.sqrt(g.mean()) * math.sqrt(max(w @ g @ w, 0.0)))


# 30 problems, then the 10 of seeds 0-599 on which the solver used to stop at the origin
@pytest.mark.parametrize("seed", [*range(30), 91, 250, 297, 318, 365, 410, 428, 471, 515, 586])
def test_cagrad_dual_with_more_tasks_than_gradient_dimensions(seed: int) -> None:
    """K > P + 1: the hull of the task gradients can contain the origin, where s(tau) = rho tau
    also holds at tau = 0; the solver must find the positive root, not stop at the origin
    (it did on 10 of 600 such random problems). Checked against SLSQP from several starts and
    every vertex."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 12))
    p = int(rng.integers(1, k - 1))
    j = rng.standard_normal((k, p)) * rng.uniform(0.1, 10.0, size=(k, 1))
    c = float(rng.choice([0.1, 0.4, 0.9]))
    g = j @ j.T
    g = g / np.trace(g)
    w, _ = cagrad_dual(torch.from_numpy(g), c)
    ours = _cagrad_objective(w.numpy(), g, c)
    best = min(_cagrad_objective(e, g, c) for e in np.eye(k))
    for start in [np.full(k, 1.0 / k), *rng.dirichlet(np.ones(k), size=6)]:
        r = minimize(_cagrad_objective, start, args=(g, c), method="SLSQP",
                     bounds=[(0.0, 1.0)] * k,
                     constraints=({"type": "eq", "fun": lambda v: v.sum() - 1.0},),
                     options={"ftol": 1e-14, "maxiter": 500})
        best = min(best, float(r.fun))
    assert ours <= best + 1e-7
