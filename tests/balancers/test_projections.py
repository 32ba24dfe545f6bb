"""ConFIG, DualProj and PCD: defining properties on random and hard Jacobians, hand-worked
cases, and agreement with TorchJD's implementations (skipped without torchjd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hard import F32, cosines, hard_jacobians
from _inputs import conflicting_jacobian, random_jacobian, run

from mtlkit.balancers._projections import (
    PCD,
    ConFIG,
    DualProj,
    config_weights,
    nonneg_qp,
    pcd_weights,
)

F64 = torch.float64


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


# ------------------------------------------------------------------ ConFIG
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ["random", "scales_1e-4_1e4", "zero_row"])
def test_config_equal_cosines_with_every_task(seed, case):
    """The update has the same positive cosine with every (non-zero) task gradient, and its
    length is the sum of the gradients' projections on its direction (float32 model)."""
    jac = hard_jacobians(3, 6, seed)[case]
    d, step = run(ConFIG(names(3)), jac, dtype=F32)
    live = jac.norm(dim=1) > 0
    cos = cosines(d, jac)[live]
    assert float(cos.min()) > 0
    torch.testing.assert_close(cos, cos.mean().expand_as(cos), rtol=2e-3, atol=0)
    length = float((jac.double() @ d.double()).sum() / d.double().norm())
    assert float(d.double().norm()) == pytest.approx(length, rel=2e-3)
    assert bool((step.weight_tensor[~live] == 0).all())


def test_config_preference_sets_the_cosines():
    jac = random_jacobian(3, 7, seed=4)
    d, _ = run(ConFIG(names(3), pref=[1.0, 2.0, 3.0]), jac, dtype=F64)
    cos = cosines(d, jac)
    torch.testing.assert_close(cos / cos[0], torch.tensor([1.0, 2.0, 3.0], dtype=F64))


def test_config_more_tasks_than_dimensions_is_least_squares():
    """K > P: no direction has equal cosines; the direction solves min ||U v - 1|| (normal
    equations U^T (s U u - 1) = 0 at the best scale s along u = d / ||d||)."""
    jac = hard_jacobians(3)["k_gt_dim"]  # 5 tasks in 2 dimensions
    d, _ = run(ConFIG(names(5)), jac, dtype=F64)
    units = jac / jac.norm(dim=1, keepdim=True)
    u = d / d.norm()
    t = units @ u
    s = t.sum() / (t @ t)
    residual = units.T @ (s * t - 1)
    assert float(residual.abs().max()) < 1e-10


def test_config_degenerate_rows():
    cases = hard_jacobians(3)
    g = cases["identical"][0]
    d, _ = run(ConFIG(names(3)), cases["identical"], dtype=F64)
    torch.testing.assert_close(d, 3 * g)  # direction g, length 3 ||g||
    # (g, -g, g): least squares puts cosine 1/3 on g, the length is ||g|| (1 - 1 + 1)
    d, _ = run(ConFIG(names(3)), cases["opposite"], dtype=F64)
    torch.testing.assert_close(d, g)
    d, step = run(ConFIG(names(2)), cases["opposite"][:2], dtype=F64)
    assert bool((d == 0).all()) and bool((step.weight_tensor == 0).all())


def test_config_weights_invariant_to_the_scale_of_the_gramian():
    jac = random_jacobian(4, 9, seed=2)
    g = jac @ jac.T
    torch.testing.assert_close(config_weights(g * 1e-12), config_weights(g))
    torch.testing.assert_close(config_weights(g * 1e12), config_weights(g))


def test_config_agrees_with_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    for seed in range(6):
        k = 2 + seed % 4
        jac = conflicting_jacobian(k, 3 * k + 2, seed=seed, strength=(0.3, 0.8, 1.3)[seed % 3])
        d, _ = run(ConFIG(names(k)), jac, dtype=F64)
        torch.testing.assert_close(d, agg.ConFIG()(jac), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ DualProj
def _check_dual_cone_projection(jac: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                                tol: float) -> None:
    """KKT of min w^T G w s.t. w >= u: w >= u, G w >= 0, (w - u)_j (G w)_j = 0."""
    g = jac.double() @ jac.double().T
    gw = g @ w.double()
    scale = float(g.diagonal().max()) * float(w.abs().max())
    assert float((w.double() - u).min()) >= -tol * float(u.max())
    assert float(gw.min()) >= -tol * scale
    assert float(((w.double() - u) * gw).abs().max()) <= tol * scale * float(w.abs().max())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ["random", "scales_1e-4_1e4", "k_gt_dim", "zero_row", "opposite"])
def test_dualproj_is_the_projection_onto_the_dual_cone(seed, case):
    jac = hard_jacobians(3, 6, seed)[case]
    k = jac.shape[0]
    d, step = run(DualProj(names(k), reg_eps=0.0), jac, dtype=F64)
    u = torch.full((k,), 1.0 / k, dtype=F64)
    _check_dual_cone_projection(jac, step.weight_tensor, u, tol=1e-9)
    size = float(jac.norm(dim=1).max()) ** 2 * float(step.weight_tensor.abs().sum())
    assert float((jac @ d).min()) >= -1e-9 * size


def test_dualproj_float32_scales_conflict_with_no_task():
    """Per-task scales 1e-4..1e4 on a float32 model with the default ridge: every task keeps
    <d, g_k> >= 0 up to the documented reg_eps ||g_k||^2 w_k (a ridge on the trace-normalised
    Gram matrix, as TorchJD's, loses the smallest task's constraint here)."""
    for seed in range(3):
        jac = hard_jacobians(3, 6, seed)["scales_1e-4_1e4"]
        d, step = run(DualProj(names(3)), jac, dtype=F32)
        g = jac @ jac.T
        ridge = 1e-4 * step.weight_tensor.double() * g.diagonal()
        rounding = 1e-6 * jac.norm(dim=1) * float(d.double().norm())  # float32 d
        slack = ridge + rounding
        assert bool(((jac @ d.double()) >= -slack).all())


def test_dualproj_keeps_the_mean_when_it_conflicts_with_no_task():
    jac = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=F64)
    _, step = run(DualProj(["a", "b"], reg_eps=0.0), jac, dtype=F64)
    torch.testing.assert_close(step.weight_tensor, torch.full((2,), 0.5, dtype=F64))


def test_dualproj_agrees_with_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from torchjd._linalg import QuadprogProjector
    for seed in range(6):
        k = 2 + seed % 4
        jac = conflicting_jacobian(k, 3 * k + 2, seed=seed, strength=(0.3, 0.8, 1.3)[seed % 3])
        # the same programme with a negligible ridge on both sides (see DualProj's note)
        _, step = run(DualProj(names(k), reg_eps=1e-12), jac, dtype=F64)
        projector = QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)
        ref = agg.DualProjWeighting(projector=projector)(jac @ jac.T)
        torch.testing.assert_close(step.weight_tensor, ref, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ PCD
def test_nonneg_qp_matches_kkt():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.standard_normal((4, 3))
        h = a @ a.T  # singular (rank 3)
        c = h @ rng.standard_normal(4)  # in the range of H: the problem is bounded
        mu = nonneg_qp(h, c)
        y = h @ mu + c
        assert mu.min() >= 0 and y.min() >= -1e-9 and abs(mu @ y) <= 1e-9


def _pcd_kkt(jac: torch.Tensor, weights: torch.Tensor, tau: float) -> None:
    """With unit scales: d~ = g1 + sum mu_j g_j, mu >= 0, <d~, g_j> >= tau ||g_j||^2, mu_j times
    the slack = 0 (optimal), and ||d|| = ||g1||."""
    g = jac @ jac.T
    mu = weights[1:] / weights[0]
    dt = jac[0] + mu @ jac[1:]
    slack = jac[1:] @ dt - tau * g.diagonal()[1:]
    scale = float(g.diagonal().max())
    assert float(mu.min()) >= -1e-12
    assert float(slack.min()) >= -1e-9 * scale
    assert float((mu * slack).abs().max()) <= 1e-9 * scale * max(1.0, float(mu.max()))
    assert float((weights @ jac).norm()) == pytest.approx(float(jac[0].norm()), rel=1e-9)


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_pcd_solves_its_quadratic_programme(seed, tau):
    k = 2 + seed % 3
    jac = conflicting_jacobian(k, 2 * k + 1, seed=seed, strength=1.4)
    w = pcd_weights(jac @ jac.T, torch.ones(k, dtype=F64), torch.full((k - 1,), tau, dtype=F64))
    _pcd_kkt(jac, w, tau)


def test_pcd_special_cases():
    jac = hard_jacobians(3)["random"]
    ones = torch.ones(3, dtype=F64)
    tau = torch.full((2,), 0.1, dtype=F64)
    zero_primary = jac.clone()
    zero_primary[0] = 0
    assert bool((pcd_weights(zero_primary @ zero_primary.T, ones, tau) == 0).all())
    # two opposite secondary gradients: the constraints cannot hold, the update is g1
    infeasible = torch.stack([jac[0], jac[1], -jac[1]])
    w = pcd_weights(infeasible @ infeasible.T, ones, tau)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    # a zero secondary gradient has no constraint
    zero_secondary = jac.clone()
    zero_secondary[2] = 0
    w = pcd_weights(zero_secondary @ zero_secondary.T, ones, tau)
    _pcd_kkt(zero_secondary[:2], w[:2], 0.1)
    assert float(w[2]) == 0.0


def test_pcd_secondary_progress_on_hard_inputs():
    """On a float32 model with scales 1e-4..1e4 and K > dim, every secondary task with a
    non-zero gradient progresses (<d, g_j> > 0) and ||d|| = ||g1||, unless infeasible."""
    for case in ("random", "scales_1e-4_1e4", "zero_row", "identical"):
        jac = hard_jacobians(3, 6, 1)[case]
        d, _ = run(PCD(names(3)), jac, dtype=F32)
        live = jac.norm(dim=1) > 0
        assert bool((jac[live] @ d.double() > 0).all()), case
        assert float(d.norm()) == pytest.approx(float(jac[0].norm()), rel=1e-4), case


def test_pcd_is_invariant_to_a_constant_scale_of_a_secondary_loss():
    """The scales normalise each gradient by its own running norm: multiplying a secondary
    task's loss by 1e3 at every step leaves the update unchanged (up to eps)."""
    outs = []
    for c in (1.0, 1e3):
        b = PCD(names(3), tau=0.2, beta=0.9)
        for seed in range(4):
            jac = conflicting_jacobian(3, 7, seed=seed, strength=1.3)
            jac[2] *= c
            d, _ = run(b, jac, dtype=F64)
        outs.append(d)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=0)


def test_pcd_direction_does_not_depend_on_the_scale_of_all_losses():
    """No absolute epsilon: gradients 1e-10 or 1e15 times a Jacobian give its direction."""
    jac = conflicting_jacobian(3, 7, seed=5, strength=1.3)
    ref, _ = run(PCD(names(3), tau=0.2), jac, dtype=F32)
    for scale in (1e-10, 1e15):
        d, _ = run(PCD(names(3), tau=0.2), jac * scale, dtype=F32)
        assert float(cosines(ref, d[None].double())[0]) > 1 - 1e-6


def test_pcd_primary_option_reorders():
    jac = conflicting_jacobian(3, 7, seed=3, strength=1.3)
    perm = [2, 0, 1]
    d1, _ = run(PCD(["a", "b", "c"], primary="c", tau=0.1), jac, dtype=F64)
    d2, _ = run(PCD(["c", "a", "b"], tau=0.1), jac[perm], dtype=F64)
    torch.testing.assert_close(d1, d2)


def test_pcd_agrees_with_torchjd_over_steps():
    agg = pytest.importorskip("torchjd.aggregation")
    for k in (2, 3, 5):
        ours = PCD(names(k), tau=0.1, beta=0.9, eps=1e-8)
        ref = agg.PCDWeighting(tau=0.1, beta=0.9, eps=1e-8)
        for seed in range(5):
            jac = conflicting_jacobian(k, 2 * k + 3, seed=seed + 10 * k, strength=1.5)
            jac = jac * torch.linspace(0.5, 3.0, k, dtype=F64)[:, None]
            _, step = run(ours, jac, dtype=F64)
            torch.testing.assert_close(step.weight_tensor, ref(jac @ jac.T), rtol=1e-6,
                                       atol=1e-9)


def test_validation():
    with pytest.raises(ValueError, match="pref"):
        ConFIG(["a", "b"], pref=[1.0, -1.0])
    with pytest.raises(ValueError, match="reg_eps"):
        DualProj(["a", "b"], reg_eps=-1)
    with pytest.raises(ValueError, match="tau"):
        PCD(["a", "b"], tau=1.5)
    with pytest.raises(ValueError, match="primary"):
        PCD(["a", "b"], primary="z")
    with pytest.raises(ValueError, match="secondary"):
        PCD(["a", "b"], tau={"a": 0.1})
