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
