"""FairGrad: the alpha-fair condition G w = w^(-1/alpha) on random and hard Jacobians, its
special cases (alpha = 0, 1), Pareto-stationary inputs, and agreement with TorchJD."""

from __future__ import annotations

import pytest
import torch
from _hard import F32, cosines, hard_jacobians
from _inputs import conflicting_jacobian, random_jacobian, run

from mtlkit.balancers._fairness import FairGrad, alpha_fair_weights
from mtlkit.balancers._gramian import NashMTL

F64 = torch.float64


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def improving(k: int, p: int, seed: int) -> torch.Tensor:
    """Rows with a common descent direction (so that the condition has a solution)."""
    jac = random_jacobian(k, p, seed=seed)
    jac[:, 0] += 2.0
    return jac


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("seed", range(3))
def test_fairgrad_solves_the_alpha_fair_condition(alpha, seed):
    """<g_k, d> = w_k^(-1/alpha) > 0 for every task, at per-task scales 1e-4..1e4 and with
    more tasks than dimensions."""
    for jac in (conflicting_jacobian(3, 7, seed=seed, strength=0.8),
                improving(3, 6, seed) * torch.logspace(-4, 4, 3, dtype=F64)[:, None],
                improving(6, 3, seed)):
        w = alpha_fair_weights(jac @ jac.T, alpha)
        assert w is not None and bool((w > 0).all())
        progress = jac @ (w @ jac)
        torch.testing.assert_close(progress * w ** (1 / alpha), torch.ones_like(w), rtol=1e-8,
                                   atol=0)


def test_fairgrad_float32_model_with_scales():
    for seed in range(3):
        jac = improving(3, 6, seed) * torch.logspace(-4, 4, 3, dtype=F64)[:, None]
        d, step = run(FairGrad(names(3)), jac, dtype=F32)
        w = step.weight_tensor.double()
        torch.testing.assert_close((jac @ d.double()) * w**0.5, torch.ones(3, dtype=F64),
                                   rtol=1e-4, atol=0)


def test_fairgrad_alpha_one_is_nash_mtl_and_alpha_zero_the_mean():
    for seed in range(3):
        jac = conflicting_jacobian(3, 7, seed=seed, strength=0.8)
        _, fair = run(FairGrad(names(3), alpha=1.0), jac, dtype=F64)
        _, nash = run(NashMTL(names(3), max_norm=0.0), jac, dtype=F64)
        torch.testing.assert_close(fair.weight_tensor, nash.weight_tensor)
        _, mean = run(FairGrad(names(3), alpha=0.0), jac, dtype=F64)
        torch.testing.assert_close(mean.weight_tensor, torch.full((3,), 1 / 3, dtype=F64))


def test_fairgrad_larger_alpha_is_fairer():
    """As alpha grows the improvements <g_k, d> / ||d|| even out (max-min fairness)."""
    jac = improving(3, 6, 1) * torch.tensor([[1.0], [3.0], [0.3]], dtype=F64)
    spread = []
    for alpha in (0.5, 2.0, 20.0):
        w = alpha_fair_weights(jac @ jac.T, alpha)
        d = w @ jac
        progress = jac @ d / d.norm()
        spread.append(float(progress.max() / progress.min()))
    assert spread[0] > spread[1] > spread[2] > 1.0


def test_fairgrad_pareto_stationary_and_degenerate_inputs():
    cases = hard_jacobians(3, 6, 0)
    for case in ("opposite", "zero_row", "identical", "k_gt_dim"):
        jac = cases[case]
        k = jac.shape[0]
        d, step = run(FairGrad(names(k)), jac, dtype=F32)
        assert torch.isfinite(d).all() and torch.isfinite(step.weight_tensor).all(), case
        if case == "opposite":  # no direction improves every task: no update
            assert bool((d == 0).all())
        if case == "zero_row":
            assert float(step.weight_tensor[1]) == 0.0
            live = [0, 2]
            assert bool((jac[live] @ d.double() > 0).all())
        if case == "identical":
            assert float(cosines(jac[0], d[None].double())[0]) > 1 - 1e-6


def test_fairgrad_agrees_with_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("scipy.optimize")
    for alpha in (0.5, 1.0, 2.0):
        for seed in range(3):
            k = 2 + seed
            jac = improving(k, 2 * k + 1, seed)
            _, step = run(FairGrad(names(k), alpha=alpha), jac, dtype=F64)
            ref = agg.FairGradWeighting(alpha=alpha, max_iters=10_000)(jac @ jac.T)
            torch.testing.assert_close(step.weight_tensor, ref, rtol=1e-5, atol=1e-8)


def test_validation():
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(["a", "b"], alpha=-1.0)
