"""Gradient balancers: each method's defining property, closed forms worked by hand, and
comparisons with a generic solver."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _inputs import conflicting_jacobian, random_jacobian, run
from scipy.optimize import minimize

from mtlkit.balancers._gradnorm import GradNormScaling
from mtlkit.balancers._gramian import (
    DBMTL,
    IMTL,
    AlignedMTL,
    BargainingWarning,
    CAGrad,
    NashMTL,
    UPGrad,
)
from mtlkit.balancers._mgda import MGDA
from mtlkit.balancers._surgery import GradDrop, GradVac, PCGrad

TASKS3 = ["a", "b", "c"]


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def update(balancer, jac, **kw) -> torch.Tensor:
    return run(balancer, jac, dtype=torch.float64, **kw)[0]


# ------------------------------------------------------------------ MGDA
def scipy_min_norm(gram: np.ndarray) -> float:
    """min over the simplex of a^T G a by SLSQP from several starts (a reference, not fast)."""
    k = gram.shape[0]
    best = math.inf
    for start in [np.full(k, 1 / k), *np.eye(k)]:
        r = minimize(lambda a: a @ gram @ a, start, jac=lambda a: 2 * gram @ a, method="SLSQP",
                     bounds=[(0, 1)] * k,
                     constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
                     options={"ftol": 1e-16, "maxiter": 500})
        best = min(best, float(r.fun))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_mgda_is_the_min_norm_point_of_the_hull(seed):
    k = 2 + seed % 5
    jac = conflicting_jacobian(k, 9, seed=seed, strength=0.3 * (seed % 4))
    d = update(MGDA(names(k)), jac)
    ref = scipy_min_norm((jac @ jac.T).numpy())
    assert float(d @ d) <= ref + 1e-10
    # d is in the hull, so its squared norm is at least the minimum
    _, step = run(MGDA(names(k)), jac, dtype=torch.float64)
    w = step.weight_tensor
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0)
    assert float(d @ d) >= ref - 1e-10
    # common descent: <d, g_k> >= ||d||^2 for every task
    assert (jac @ d >= (d @ d) - 1e-10).all()


def brute_force_min_norm(gram: torch.Tensor, steps: int = 200) -> float:
    """min of a^T G a over a grid of the 3-task simplex (step 1/steps), then refined on the
    best edge and interior point by the closed form of each edge: an independent check."""
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    a = torch.stack([i[keep], j[keep], steps - i[keep] - j[keep]], 1).double() / steps
    grid = float(((a @ gram) * a).sum(1).min())
    edges = []
    for p, q in ((0, 1), (0, 2), (1, 2)):
        sub = gram[[p, q]][:, [p, q]]
        gamma = ((sub[1, 1] - sub[0, 1]) / (sub[0, 0] + sub[1, 1] - 2 * sub[0, 1])).clamp(0, 1)
        w = torch.stack([gamma, 1 - gamma])
        edges.append(float(w @ sub @ w))
    return min(grid, *edges)


@pytest.mark.parametrize("seed", range(4))
def test_mgda_three_tasks_against_a_brute_force_search(seed):
    jac = conflicting_jacobian(3, 6, seed=seed, strength=0.5 + 0.3 * seed)
    gram = jac @ jac.T
    d = update(MGDA(TASKS3), jac)
    ref = brute_force_min_norm(gram)
    # the grid's resolution bounds how far above the minimum the search can be
    assert float(d @ d) <= ref + 1e-12
    assert float(d @ d) >= ref - 1e-3 * float(gram.diagonal().max())


def test_mgda_frank_wolfe_is_the_papers_approximation():
    """solver="frank_wolfe" (Algorithm 2) lands in the hull, near the exact minimum, and
    stops above it on some inputs (why the default is exact); two tasks agree exactly."""
    gaps = []
    for seed in range(12):
        k = 3 + seed % 4
        jac = conflicting_jacobian(k, 9, seed=seed, strength=0.3 * (seed % 4))
        d_fw, step = run(MGDA(names(k), solver="frank_wolfe"), jac, dtype=torch.float64)
        w = step.weight_tensor
        assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
        d = update(MGDA(names(k)), jac)
        scale = float((jac * jac).sum(1).max())
        gap = (float(d_fw @ d_fw) - float(d @ d)) / scale
        assert -1e-12 <= gap <= 1e-2
        gaps.append(gap)
    assert max(gaps) > 1e-4  # Frank-Wolfe stopped visibly off the minimiser at least once
    jac = conflicting_jacobian(2, 5, seed=1)
    torch.testing.assert_close(update(MGDA(["a", "b"], solver="frank_wolfe"), jac),
                               update(MGDA(["a", "b"]), jac))
    with pytest.raises(ValueError, match="solver must be one of"):
        MGDA(["a"], solver="fw")


def test_mgda_two_task_closed_form_by_hand():
    g1, g2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    d = update(MGDA(["a", "b"]), torch.stack([g1, g2]).double())
    # gamma = (G22 - G12) / (G11 + G22 - 2 G12) = 1 / 5
    torch.testing.assert_close(d, (0.2 * g1 + 0.8 * g2).double())
    # a vertex is the answer when it is the closest point: g2 = (0, 1), g1 = (1, 1)
    d = update(MGDA(["a", "b"]), torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_mgda_normalizations():
    jac = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    for norm, c in [("none", [1, 1]), ("l2", [4, 1]), ("loss", [2, 0.5]), ("loss+", [8, 0.5])]:
        _, step = run(MGDA(["a", "b"], normalization=norm), jac, offset=losses, dtype=torch.float64)
        c = torch.tensor(c, dtype=torch.float64)
        gh = jac / c[:, None]  # normalised gradients
        gram = gh @ gh.T
        gamma = (gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])
        expected = torch.stack([gamma, 1 - gamma]) / c
        torch.testing.assert_close(step.weight_tensor, expected)
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDA(["a"], normalization="L2")


# ------------------------------------------------------------------ PCGrad
def test_pcgrad_two_task_closed_form_by_hand():
    g1 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64)
    dot = g1 @ g2  # -2 < 0: both are projected
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    torch.testing.assert_close(update(PCGrad(["a", "b"]), torch.stack([g1, g2])), expected)
    # no conflict: the plain sum
    g3 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(update(PCGrad(["a", "b"]), torch.stack([g1, g3])), g1 + g3)


def pcgrad_by_hand(jac: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of the paper on explicit vectors, with given orders."""
    out = torch.zeros(jac.shape[1], dtype=jac.dtype)
    for i, order in enumerate(orders):
        gi = jac[i].clone()
        for j in order:
            dot = gi @ jac[j]
            if dot < 0:
                gi = gi - dot / (jac[j] @ jac[j]) * jac[j]
        out += gi
    return out


def pcgrad_on_projected(jac: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """The variant some ports implement (against the already-projected gradients of the
    others): a wrong answer the test below must tell apart."""
    projected = jac.clone()
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ projected[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (projected[j] @ projected[j]) * projected[j]
    return projected.sum(0)


def test_pcgrad_projects_on_the_original_gradients_in_random_order():
    """At every step the update is Algorithm 1 on the original gradients with that step's
    orders (one independent order per task); the orders change from step to step and matter
    here; projecting on the projected gradients gives another answer."""
    from mtlkit.balancers._surgery import _random_orders

    jac = conflicting_jacobian(4, 7, seed=2, strength=0.9)
    b = PCGrad(names(4), seed=5)
    orders_seen, updates = set(), set()
    for _ in range(12):
        orders = _random_orders(b._rng(), (), 4).tolist()  # the orders of this step
        assert all(sorted(o) == [j for j in range(4) if j != i] for i, o in enumerate(orders))
        d = update(b, jac)
        torch.testing.assert_close(d, pcgrad_by_hand(jac, orders))
        assert not torch.allclose(d, pcgrad_on_projected(jac, orders), atol=1e-6)
        orders_seen.add(tuple(map(tuple, orders)))
        updates.add(tuple(d.round(decimals=8).tolist()))
    assert len(orders_seen) > 1 and len(updates) > 1


# ------------------------------------------------------------------ GradDrop
def test_graddrop_keeps_one_sign_per_coordinate():
    jac = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-3.0, 1.0, -2.0, -0.5]], dtype=torch.float64)
    b = GradDrop(["a", "b"], seed=1)
    u = b._uniform(torch.Size([4]), torch.device("cpu"), torch.float64)
    d = update(b, jac)
    purity = 0.5 * (1 + jac.sum(0) / jac.abs().sum(0))
    expected = torch.where(purity > u, jac.clamp_min(0).sum(0), jac.clamp_max(0).sum(0))
    torch.testing.assert_close(d, expected)
    # coordinates where the tasks agree are kept whatever U is
    assert d[1] == 3.0 and d[2] == -3.0
    # with full leak nothing is dropped
    torch.testing.assert_close(update(GradDrop(["a", "b"], leak=1.0), jac), jac.sum(0))


# ------------------------------------------------------------------ GradVac
def test_gradvac_with_zero_targets_is_pcgrad_for_two_tasks():
    jac = conflicting_jacobian(2, 6, seed=4, strength=0.9)
    torch.testing.assert_close(update(GradVac(["a", "b"], beta=0.0), jac),
                               update(PCGrad(["a", "b"]), jac))


def test_gradvac_raises_cosine_to_the_target():
    jac = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cosine 0
    b = GradVac(["a", "b"], beta=1.0, group="whole")
    b.targets = torch.full((1, 2, 2), 0.5, dtype=torch.float64)  # desired cosine 0.5
    d = update(b, jac)
    # g1' = g1 + w g2 with cos(g1', g2) = 0.5: w = tan(30 degrees); same for g2'
    w = math.tan(math.pi / 6)
    torch.testing.assert_close(d, torch.tensor([1 + w, 1 + w], dtype=torch.float64))
    g1p = torch.tensor([1.0, w], dtype=torch.float64)
    assert float(g1p @ jac[1] / g1p.norm()) == pytest.approx(0.5)
    # targets became the observed cosine (beta = 1)
    assert b.targets[0, 0, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_gradvac_groups_are_per_tensor():
    # two parameter tensors: conflict in the first only
    p1 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a1, b1 = torch.tensor([1.0, 0.0]).double(), torch.tensor([-1.0, 1.0]).double()
    a2, b2 = torch.tensor([1.0, 1.0]).double(), torch.tensor([1.0, 0.0]).double()
    losses = [a1 @ p1 + a2 @ p2, b1 @ p1 + b2 @ p2]
    b = GradVac(["a", "b"], beta=0.0, group="tensor")
    b.backward(losses, shared=[p1, p2])
    # group 1 is PCGrad on (a1, b1); group 2 has no conflict (targets 0, cosine > 0)
    torch.testing.assert_close(p1.grad, (a1 + 0.5 * b1) + (b1 + a1))
    torch.testing.assert_close(p2.grad, a2 + b2)
    assert b.targets.shape == (2, 2, 2)


def pcgrad_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad's two-task closed form."""
    dot = g1 @ g2
    if dot >= 0:
        return g1 + g2
    return (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)


def test_gradvac_default_groups_are_layers():
    """group="layer" (default): a layer is a weight matrix and the tensors after it (bias). With
    zero targets and beta = 0, two-task GradVac is PCGrad within each group, so each layer's
    update is PCGrad on that layer's own (weight, bias) gradient."""
    torch.manual_seed(6)
    first, last = torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = last(torch.tanh(first(x)))
    losses = [out[:, 0].sum(), -(out[:, 1] + out[:, 0]).pow(2).mean()]
    shared = [*first.parameters(), *last.parameters()]
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    b = GradVac(["a", "b"], beta=0.0)
    assert b.group == "layer"
    b.backward(losses, shared=shared)
    assert b.targets.shape == (2, 2, 2)  # two layers
    for layer in ((0, 1), (2, 3)):
        flat = [torch.cat([g[i].flatten() for i in layer]) for g in per_task]
        expected = pcgrad_two(*flat)
        got = torch.cat([shared[i].grad.flatten() for i in layer])
        torch.testing.assert_close(got, expected)
    # explicit sizes (2, 2) are the same grouping; "tensor" is another one
    for group, n_groups in (((2, 2), 2), ("tensor", 4), ("whole", 1), ((1, 3), 2)):
        out = last(torch.tanh(first(x)))
        losses = [out[:, 0].sum(), -(out[:, 1] + out[:, 0]).pow(2).mean()]
        other = GradVac(["a", "b"], beta=0.0, group=group)
        other.backward(losses, shared=shared)
        assert other.targets.shape[0] == n_groups
    with pytest.raises(ValueError, match="group sizes \\[1, 2\\] cover 3 shared tensors"):
        out = last(torch.tanh(first(x)))
        GradVac(["a", "b"], group=(1, 2)).backward([out[:, 0].sum(), out[:, 1].sum()],
                                                   shared=shared)
    with pytest.raises(ValueError, match="group sizes must be positive integers"):
        GradVac(["a", "b"], group=(2, 0))


# ------------------------------------------------------------------ CAGrad
@pytest.mark.parametrize("seed", range(6))
def test_cagrad_maximises_the_worst_improvement_in_the_ball(seed):
    k = 2 + seed % 3
    jac = conflicting_jacobian(k, 8, seed=seed, strength=0.6)
    c = 0.4
    d = update(CAGrad(names(k), c=c, rescale=0), jac)
    g0 = jac.mean(0)
    radius = c * g0.norm()
    assert float((d - g0).norm()) <= float(radius) * (1 + 1e-9)
    worst = float((jac @ d).min())
    # no point of the ball does better: sample its surface and interior
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(20000, jac.shape[1], generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(20000, 1, generator=g, dtype=torch.float64)
    others = g0 + radius * u
    assert float((others @ jac.T).min(1).values.max()) <= worst + 1e-9
    # rescale divides by 1 + c^2
    torch.testing.assert_close(update(CAGrad(names(k), c=c), jac), d / (1 + c**2))


def test_cagrad_zero_radius_is_the_mean():
    jac = random_jacobian(3, 5, seed=1)
    torch.testing.assert_close(update(CAGrad(TASKS3, c=0.0, rescale=0), jac), jac.mean(0))


# ------------------------------------------------------------------ IMTL
@pytest.mark.parametrize("seed", range(4))
def test_imtl_equal_projections_and_scale_invariance(seed):
    k = 2 + seed % 3
    jac = random_jacobian(k, 7, seed=seed)
    d = update(IMTL(names(k)), jac)
    unit = jac / jac.norm(dim=1, keepdim=True)
    proj = unit @ d
    torch.testing.assert_close(proj, proj[:1].expand(k), rtol=1e-9, atol=1e-12)
    scaled = jac.clone()
    scaled[0] *= 10  # the first loss multiplied by 10
    d10 = update(IMTL(names(k)), scaled)
    torch.testing.assert_close(d10 / d10.norm(), d / d.norm(), rtol=1e-9, atol=1e-12)


def test_imtl_loss_scales_are_learned_from_their_own_losses():
    b = IMTL(["a", "b"], loss_scale=True)
    with torch.no_grad():
        b.log_scales.copy_(torch.tensor([0.5, -1.0]))
    jac = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    losses = torch.tensor([3.0, 0.5], dtype=torch.float64)
    _, step = run(b, jac, offset=losses, dtype=torch.float64)
    # d/ds (e^s L - s) = e^s L - 1
    expected = torch.tensor([math.exp(0.5) * 3.0 - 1, math.exp(-1.0) * 0.5 - 1])
    torch.testing.assert_close(b.log_scales.grad, expected.float())
    # the shared direction is still IMTL-G's (scale invariant)
    d = torch.tensor([step.weight_tensor[0] * 1.0, step.weight_tensor[1] * 2.0])
    assert float(d[0]) == pytest.approx(float(d[1]))


# ------------------------------------------------------------------ Nash-MTL
@pytest.mark.parametrize("seed", range(5))
def test_nash_mtl_bargaining_condition_holds(seed):
    k = 2 + seed
    jac = conflicting_jacobian(k, 3 * k, seed=seed, strength=0.5)
    _, step = run(NashMTL(names(k), max_norm=0.0), jac, dtype=torch.float64)
    a = step.weight_tensor
    gram = jac @ jac.T
    torch.testing.assert_close(gram @ a, 1 / a, rtol=1e-7, atol=0)
    assert (a > 0).all()
    # with max_norm the direction is the same and ||d|| = max_norm (||d||^2 = K at the solution)
    d = update(NashMTL(names(k), max_norm=1.0), jac)
    assert float(d.norm()) == pytest.approx(1.0)
    torch.testing.assert_close(d, (a @ jac) / math.sqrt(k))


def test_nash_mtl_fails_loudly_without_a_solution():
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # exactly opposite
    with pytest.warns(BargainingWarning, match="G a = 1/a has no solution"):
        d, step = run(NashMTL(["a", "b"]), jac, dtype=torch.float64)
    assert (step.weight_tensor == 0).all() and (d == 0).all()
    with pytest.raises(RuntimeError, match="bargaining condition"):
        run(NashMTL(["a", "b"], on_failure="raise"), jac)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a task with a zero gradient just takes no part; no warning
        _, step = run(NashMTL(["a", "b"], max_norm=0.0),
                      torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
                      dtype=torch.float64)
    torch.testing.assert_close(step.weight_tensor, torch.tensor([0.5, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------ Aligned-MTL
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_aligns_the_gradients(mode):
    jac = random_jacobian(3, 6, seed=7)
    b = AlignedMTL(TASKS3, scale_mode=mode)
    gram = jac @ jac.T
    bt = b.balance_transformation(gram)
    aligned = bt @ jac
    ag = aligned @ aligned.T  # orthogonal rows of equal norm: sigma * I
    lam = torch.linalg.eigvalsh(gram)
    sigma = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[mode]
    torch.testing.assert_close(ag, sigma * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(update(b, jac), aligned.mean(0))


def test_aligned_mtl_rank_deficient():
    jac = random_jacobian(3, 6, seed=1, rank=2)
    b = AlignedMTL(TASKS3)
    aligned = b.balance_transformation(jac @ jac.T) @ jac
    s = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(s[0], s[1])  # the two kept directions have equal singular values
    assert float(s[2]) < 1e-6 * float(s[0])


# ------------------------------------------------------------------ UPGrad
@pytest.mark.parametrize("seed", range(6))
def test_upgrad_never_conflicts(seed):
    k = 2 + seed % 5
    jac = conflicting_jacobian(k, 10, seed=seed, strength=0.95)
    assert (jac @ jac.T < 0).any()
    d = update(UPGrad(names(k), reg_eps=0.0), jac)
    assert (jac @ d >= -1e-10 * float(jac.norm()) ** 2).all()
    # with the default regularisation the conflict is at most reg_eps * trace(G) * v
    d = update(UPGrad(names(k)), jac)
    assert (jac @ d >= -1e-4 * float((jac * jac).sum()) * 2).all()
    # and UPGrad of non-conflicting gradients is their mean
    easy = random_jacobian(k, 10, seed=seed).abs()
    torch.testing.assert_close(update(UPGrad(names(k), reg_eps=0.0), easy), easy.mean(0))


# ------------------------------------------------------------------ DB-MTL
def test_db_mtl_log_losses_and_max_norm_rescaling():
    jac = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.25], dtype=torch.float64)
    b = DBMTL(["a", "b"], beta=0.5, eps=1e-12)
    # step 1: EMA = (1 - 0.5) * grad log L = 0.5 * (1.5, 0), 0.5 * (0, 2)
    d, step = run(b, jac, offset=losses, dtype=torch.float64)
    torch.testing.assert_close(b.grad_ema, torch.tensor([[0.75, 0.0], [0.0, 1.0]]).double())
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(step.weight_tensor, torch.tensor([4 / 3 / 2.0, 1.0 / 0.25]).double())
    # step 2: the average moves halfway to the new gradients
    jac2 = torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    d, _ = run(b, jac2, offset=losses, dtype=torch.float64)
    torch.testing.assert_close(b.grad_ema, torch.tensor([[0.625, 0.0], [0.0, 1.5]]).double())
    torch.testing.assert_close(d, torch.tensor([1.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="negative loss for \\['a'\\]"):
        run(DBMTL(["a", "b"]), jac, offset=torch.tensor([-1.0, 1.0]))


# ------------------------------------------------------------------ gradient-norm scaling
def test_grad_norm_scaling_is_the_sum_of_unit_gradients():
    jac = random_jacobian(3, 5, seed=2)
    d = update(GradNormScaling(TASKS3), jac)
    torch.testing.assert_close(d, (jac / jac.norm(dim=1, keepdim=True)).sum(0))
