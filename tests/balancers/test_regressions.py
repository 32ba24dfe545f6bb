"""Regression tests for the bugs a cross-check against a peer library and the property tests
found (issue 11). Each failed on the code before the fix (commit fc6911a); they use only the
public ``create`` API, so they run against that code too."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from _inputs import random_jacobian, run, scaled_base

from mtlkit import balancers

F64 = torch.float64


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


# ------------------------------------------------------------------ scale invariance
@pytest.mark.parametrize("scales", sorted(set(itertools.permutations([1e-4, 1.0, 1e4]))))
def test_imtl_g_is_invariant_to_the_scale_of_each_loss(scales):
    """IMTL-G's defining property, equal projections of the update on the unit task gradients,
    holds in float32 when the losses' scales differ by up to 1e8; the direction is that of the
    unscaled problem. (A pseudo-inverse cut relative to G's largest eigenvalue dropped the small
    task: weights like [0.011, 0.988, 0.0008] instead of [0.0006, 0.053, 0.947].)"""
    base = random_jacobian(3, 8, seed=7)
    jac = base * torch.tensor(scales, dtype=F64)[:, None]
    d, _ = run(balancers.create("imtl", tasks=names(3)), jac)  # float32 gradients
    ref, _ = run(balancers.create("imtl", tasks=names(3)), base, dtype=F64)
    unit = jac / jac.norm(dim=1, keepdim=True)
    proj = unit @ d.double()
    assert float(proj.max() - proj.min()) <= 1e-4 * float(proj.abs().max())
    assert cos(d, ref) == pytest.approx(1.0, abs=1e-6)


def aligned_mtl_reference(jac: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1 in float64 (full rank, sigma = smallest eigenvalue, w = 1/K)."""
    g = jac @ jac.T
    lam, vec = torch.linalg.eigh(g)
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    return jac.T @ (b @ torch.full((jac.shape[0],), 1.0 / jac.shape[0], dtype=F64))


@pytest.mark.parametrize("seed", range(3))
def test_aligned_mtl_keeps_every_independent_direction(seed):
    """Losses scaled by 1e2, 1 and 1e-2 (float32 gradients): every direction is kept, as in a
    float64 implementation of the paper's algorithm (the rank cut relative to G's largest
    eigenvalue dropped the small task's: cosine 0.82)."""
    jac = random_jacobian(3, 8, seed=seed) * torch.tensor([1e2, 1.0, 1e-2], dtype=F64)[:, None]
    d, _ = run(balancers.create("aligned_mtl", tasks=names(3)), jac)
    assert cos(d, aligned_mtl_reference(jac)) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ CAGrad, c >= 1
def test_cagrad_with_c_at_least_one_never_conflicts():
    """With c >= 1 the ball around g0 contains 0, so the optimum conflicts with no task: no task
    gradient has a negative inner product with the update, on every input, including more
    tasks than dimensions (where the hull often holds the origin and the update is 0)."""
    checked = 0
    for seed in range(40):
        k, p = 2 + seed % 7, 1 + seed % 5
        jac = random_jacobian(k, p, seed=seed)
        for c in (1.0, 1.5, 4.0):
            d, step = run(balancers.create("cagrad", tasks=names(k), c=c), jac, dtype=F64)
            norms = jac.norm(dim=1)
            # rounding of J^T w: at most a few eps of sum_j |w_j| ||g_j||, times ||g_k||
            tol = 1e-12 * norms * float(step.weight_tensor.abs() @ norms)
            assert (jac @ d >= -tol).all(), (seed, c, k, p, (jac @ d).tolist())
            checked += 1
    assert checked == 120


# ------------------------------------------------------------------ overflow
def test_db_mtl_is_finite_for_huge_gradients_at_zero_loss():
    """Task gradients of 1e15 with losses at 0: the log-loss gradients are 1e23, whose float32
    squared norms overflowed (NaN update)."""
    b = balancers.create("db_mtl", tasks=names(3))
    for scale in (1e15, 1e12):
        d, step = run(b, scaled_base(3) * scale, offset=0.0)
        assert torch.isfinite(d).all() and float(d.norm()) > 0, d
        assert torch.isfinite(step.weight_tensor).all(), step.weights


@pytest.mark.parametrize("name", ["nash_mtl", "imtl", "grad_norm_scaling", "graddrop", "gradvac"])
def test_no_zero_or_nan_when_the_float32_gram_matrix_overflows(name):
    """Gradients of 1e20 (their float32 Gram matrix is inf): the update is not zero, has the
    direction it has at scale 1, and the weights are finite (Nash-MTL, IMTL and gradient-norm
    scaling returned zero updates; GradDrop and GradVac reported NaN weights)."""
    base = scaled_base(3)
    ref, _ = run(balancers.create(name, tasks=names(3)), base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bargaining warning either
        d, step = run(balancers.create(name, tasks=names(3)), base * 1e20)
    assert torch.isfinite(d).all() and float(d.norm()) > 0
    assert torch.isfinite(step.weight_tensor).all(), step.weights
    assert cos(d, ref) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad", "graddrop", "gradvac", "db_mtl",
                                  "imtl", "gradnorm"])
def test_a_parameter_listed_twice_in_shared_is_an_error(name):
    """It doubled that parameter's update for every parameter-level gradient method."""
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(4, 2))
    losses = [(p * (k + 1)).sum() + (q * k).sum() for k in range(3)]
    with pytest.raises(ValueError, match="twice"):
        balancers.create(name, tasks=names(3)).backward(losses, shared=[q, p, q])


@pytest.mark.parametrize("name", ["dwa", "gradnorm", "uw", "gradvac"])
def test_state_saved_for_other_tasks_is_refused(name):
    """Per-task state was mapped by position onto whatever tasks the loader had."""
    saved = balancers.create(name, tasks=["seg", "depth", "normals"]).state_dict()
    for tasks in (["depth", "seg", "normals"], ["seg", "depth", "edges"]):
        with pytest.raises(ValueError, match="saved for tasks"):
            balancers.create(name, tasks=tasks).load_state_dict(saved)
