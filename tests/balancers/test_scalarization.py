"""STCH, COSMOS, PBI and GO4Align: each one's defining formula against autograd or a hand-worked
value, hard inputs (float32, loss scales 1e-4..1e4, zero losses, one task), state and resume,
and agreement with TorchJD's scalarizers (skipped without torchjd)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mtlkit import balancers
from mtlkit.balancers._go4align import GO4Align, group_means, kmeans_1d
from mtlkit.balancers._scalarization import (
    COSMOS,
    PBI,
    STCH,
    cosmos_weights,
    pbi_weights,
    stch_weights,
)

F64 = torch.float64
SCALES = torch.tensor([1e-4, 3e-2, 1.0, 7e1, 1e4])


def step_weights(balancer, values: Tensor) -> Tensor:
    """Weights of one backward on losses L_k = p_k (p = values): p.grad is the weight vector,
    and must equal the reported effective weights."""
    p = nn.Parameter(values.clone())
    step = balancer.backward(list(p.unbind()))
    assert torch.equal(p.grad, step.weight_tensor.to(p.grad.dtype))
    return step.weight_tensor


def autograd_weights(fn, values: Tensor) -> Tensor:
    v = values.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(v), v)
    return g


def host(fn, *args) -> Tensor:
    """A pure weight function (NumPy in, float64 NumPy out) called with tensors."""
    return torch.from_numpy(fn(*[a.numpy() if isinstance(a, Tensor) else a for a in args]))


def random_values(k: int, seed: int) -> Tensor:
    return torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3 + 0.1


# ---------------------------------------------------------------------------- STCH
@pytest.mark.parametrize("seed", range(4))
def test_stch_weights_are_the_gradient_of_the_smooth_max(seed):
    k = 2 + seed
    values = random_values(k, seed)
    pref = torch.softmax(torch.randn(k, generator=torch.Generator().manual_seed(9), dtype=F64), 0)
    ref = 0.05 * torch.arange(k, dtype=F64)
    mu = 0.3
    expected = autograd_weights(
        lambda v: mu * torch.logsumexp(pref * (v - ref) / mu, 0), values)
    torch.testing.assert_close(host(stch_weights, values, pref, mu, ref), expected)


def test_stch_tends_to_the_tchebycheff_weights_as_mu_shrinks():
    values = torch.tensor([1.0, 3.0, 2.0], dtype=F64)
    pref = torch.tensor([0.5, 0.2, 0.3], dtype=F64)  # weighted: 0.5, 0.6, 0.6 - 1e-9
    values[2] -= 1e-9 / 0.3
    w = host(stch_weights, values, pref, 1e-4, torch.zeros(3, dtype=F64))
    # All of the weight on the worst weighted loss (task 1: 0.6), up to exp(-0.1/1e-4) = 0 on
    # task 0 and half on the near-tie within 1e-9 of it.
    torch.testing.assert_close(w, torch.tensor([0.0, 0.1, 0.15], dtype=F64), atol=1e-6, rtol=0)


def test_stch_on_float32_losses_from_1e_4_to_1e4_and_one_task():
    b = STCH(["a", "b", "c", "d", "e"], mu=1.0)
    w = step_weights(b, SCALES.clone())
    assert torch.isfinite(w).all() and (w >= 0).all()
    # The largest loss (1e4) takes all of the weight: the smooth max of the losses.
    torch.testing.assert_close(w, torch.tensor([0, 0, 0, 0, 0.2]), atol=1e-6, rtol=0)
    assert step_weights(STCH(["a"]), torch.tensor([1e4])).tolist() == [1.0]
    w = step_weights(STCH(["a", "b"]), torch.zeros(2))
    assert w.tolist() == [0.25, 0.25]


def test_stch_is_registered_with_paper_defaults():
    b = balancers.create("stch", tasks=["a", "b"])
    assert isinstance(b, STCH) and b.mu == 1.0 and b.preference.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="mu"):
        balancers.create("stch", tasks=["a", "b"], mu=0)
    with pytest.raises(ValueError, match="preference"):
        balancers.create("stch", tasks=["a", "b"], preference={"a": -1.0, "b": 1.0})


# ---------------------------------------------------------------------------- COSMOS
def _cosmos(v: Tensor, r: Tensor, lam: float) -> Tensor:
    return r @ v - lam * (r @ v) / (r.norm() * v.norm())


@pytest.mark.parametrize("seed", range(4))
def test_cosmos_weights_are_the_gradient_of_the_penalised_objective(seed):
    k = 2 + seed
    values = random_values(k, seed)
    r = torch.distributions.Dirichlet(torch.ones(k, dtype=F64)).sample()
    expected = autograd_weights(lambda v: _cosmos(v, r, 2.0), values)
    torch.testing.assert_close(host(cosmos_weights, values, r, 2.0), expected)


def test_cosmos_on_the_preference_ray_is_linear_and_degenerate_losses_stay_finite():
    r = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    # L parallel to r: cos = 1 is a maximum, its gradient vanishes: w = r.
    torch.testing.assert_close(host(cosmos_weights, 7 * r, r, 5.0), r)
    torch.testing.assert_close(host(cosmos_weights, torch.zeros(3, dtype=F64), r, 5.0), r)
    w32 = host(cosmos_weights, SCALES.clone(), torch.full((5,), 0.2), 2.0)
    w64 = autograd_weights(lambda v: _cosmos(v, torch.full((5,), 0.2, dtype=F64), 2.0),
                           SCALES.double())
    torch.testing.assert_close(w32.double(), w64, rtol=1e-5, atol=1e-7)
    assert step_weights(COSMOS(["a"]), torch.tensor([3.0])).tolist() == [1.0]


def test_cosmos_preferences_are_dirichlet_draws_fixed_by_seed_and_step():
    b = COSMOS(list("abc"), alpha=1.2, seed=3)
    draws = torch.stack([b.preference_at(t) for t in range(3000)])
    torch.testing.assert_close(draws.sum(1), torch.ones(3000, dtype=F64))
    assert (draws > 0).all()
    # Dir(1.2, 1.2, 1.2): mean 1/3, variance (1/3)(2/3) / (3.6 + 1) = 0.0483.
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3, dtype=F64), atol=0.01,
                               rtol=0)
    torch.testing.assert_close(draws.var(0), torch.full((3,), 2 / 9 / 4.6, dtype=F64),
                               atol=0.004, rtol=0)
    assert torch.equal(COSMOS(list("abc"), alpha=1.2, seed=3).preference_at(17), draws[17])
    assert not torch.equal(draws[0], draws[1])
    # The step's weights use the draw of that step: resume needs only the step counter.
    v = torch.tensor([1.0, 2.0, 3.0])
    w = [step_weights(b, v) for _ in range(3)]
    for t in range(3):
        torch.testing.assert_close(w[t], host(cosmos_weights, v, b.preference_at(t), 1.0).float())
    c = COSMOS(list("abc"), alpha=1.2, seed=3)
    c.load_state_dict(b.state_dict())
    torch.testing.assert_close(step_weights(c, v), step_weights(b, v))


# ---------------------------------------------------------------------------- PBI
def _pbi(v: Tensor, w: Tensor, theta: float, z: Tensor) -> Tensor:
    w_hat = w / w.norm()
    d1 = (v - z) @ w_hat
    return d1 + theta * (v - z - d1 * w_hat).norm()


@pytest.mark.parametrize("seed", range(4))
def test_pbi_weights_are_the_gradient_of_d1_plus_theta_d2(seed):
    k = 2 + seed
    values = random_values(k, seed)
    w = torch.rand(k, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.1
    z = torch.full((k,), 0.05, dtype=F64)
    expected = autograd_weights(lambda v: _pbi(v, w, 5.0, z), values)
    torch.testing.assert_close(host(pbi_weights, values, w, 5.0, z), expected)


def test_pbi_is_scale_invariant_in_float32_and_on_the_ray_follows_the_preference():
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    ref = host(pbi_weights, SCALES.double(), w.double(), 5.0, torch.zeros(5, dtype=F64))
    for c in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        got = host(pbi_weights, SCALES * c, w, 5.0, torch.zeros(5))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # On the preference ray d2 = 0: the weights are the unit preference (no NaN from 0 / 0).
    w_hat = w / w.norm()
    torch.testing.assert_close(host(pbi_weights, 3 * w, w, 5.0, torch.zeros(5)).float(), w_hat)
    torch.testing.assert_close(host(pbi_weights, torch.zeros(5), w, 5.0, torch.zeros(5)).float(),
                               w_hat)
    # A loss above the ray weighs more than the others, one below it less.
    got = pbi_weights(np.array([2.0, 1.0]), np.ones(2), 5.0, np.zeros(2))
    assert got[0] > 0 > got[1]
    assert step_weights(PBI(["a"]), torch.tensor([4.0])).tolist() == [1.0]


# ---------------------------------------------------------------------------- TorchJD peers
@pytest.mark.parametrize("seed", range(3))
def test_scalarizations_agree_with_torchjd(seed):
    sc = pytest.importorskip("torchjd.scalarization")
    k = 3 + seed
    values = random_values(k, seed)
    pref = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    pref = pref / pref.sum()
    ref = torch.full((k,), 0.05, dtype=F64)
    peers = [
        (sc.STCH(0.3, weights=pref, reference=ref), host(stch_weights, values, pref, 0.3, ref)),
        (sc.COSMOS(2.0, weights=pref), host(cosmos_weights, values, pref, 2.0)),
        (sc.PBI(5.0, weights=pref, reference=ref), host(pbi_weights, values, pref, 5.0, ref)),
    ]
    for peer, ours in peers:
        # TorchJD's PBI adds a constant under its square root (1e-6 or less on the value).
        torch.testing.assert_close(ours, autograd_weights(peer, values), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- GO4Align
def _brute_force_sse(values: list[float], groups: int) -> float:
    best = math.inf
    for labels in itertools.product(range(groups), repeat=len(values)):
        sse = 0.0
        for g in range(groups):
            members = [v for v, lab in zip(values, labels) if lab == g]
            if members:
                m = sum(members) / len(members)
                sse += sum((v - m) ** 2 for v in members)
        best = min(best, sse)
    return best


@pytest.mark.parametrize(("seed", "groups"), [(0, 2), (1, 3), (2, 2), (3, 4)])
def test_kmeans_1d_finds_the_global_optimum(seed, groups):
    values = torch.rand(7, generator=torch.Generator().manual_seed(seed), dtype=F64) ** 3
    labels = kmeans_1d(values, groups)
    centres = group_means(values, labels)
    assert len(set(labels.tolist())) == groups
    got = float(((values - centres) ** 2).sum())
    assert got == pytest.approx(_brute_force_sse(values.tolist(), groups), abs=1e-12)


def test_kmeans_1d_two_groups_is_optimal_on_ties_and_spread_scales():
    """Two groups take their own flat path: optimal on values with ties and on values spread
    over 16 orders of magnitude (checked against the general dynamic programme on 50,000
    random cases when it was written: the same labels)."""
    gen = torch.Generator().manual_seed(7)
    for trial in range(60):
        n = 2 + trial % 6
        if trial % 2:
            values = torch.randint(0, 3, (n,), generator=gen).to(F64)
        else:
            values = 10.0 ** (16 * torch.rand(n, generator=gen, dtype=F64) - 8)
        labels = kmeans_1d(values, 2)
        got = float(((values - group_means(values, labels)) ** 2).sum())
        assert got == pytest.approx(_brute_force_sse(values.tolist(), 2), rel=1e-9, abs=1e-300)
        assert sorted(set(labels.tolist())) == [0, 1]


def test_go4align_with_one_group_per_task_balances_the_loss_scales():
    tasks = list("abcde")
    b = GO4Align(tasks, num_groups=5)
    values = SCALES.clone()
    w = step_weights(b, values)
    # w_k L_k = omega_k sum_j L_j, with omega = softmax(-eta L) after one step.
    omega = torch.softmax(-1e-4 * values.double(), 0)
    torch.testing.assert_close((w * values).double(), omega * values.double().sum(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(b.omega, omega)
    # Second step: omega proportional to exp(-eta (L1 + L2)).
    w2 = step_weights(b, 2 * values)
    torch.testing.assert_close(b.omega, torch.softmax(-3e-4 * values.double(), 0))
    torch.testing.assert_close((w2 * 2 * values).double(), b.omega * 2 * values.double().sum(),
                               rtol=1e-5, atol=0)


def test_go4align_groups_share_their_mean_indicator():
    b = GO4Align(list("abcd"), num_groups=2, step_size=0.0)
    values = torch.tensor([1.0, 1.1, 50.0, 60.0])
    w = step_weights(b, values)
    beta = values.sum() / values
    indicators = beta / 4
    expected = torch.tensor([*[indicators[:2].mean()] * 2, *[indicators[2:].mean()] * 2])
    torch.testing.assert_close(w, expected)


def test_go4align_hard_inputs_stay_finite():
    for values in (torch.zeros(3), torch.tensor([0.0, 1.0, 1e4]), torch.tensor([1e-30, 1e30, 1.0])):
        w = step_weights(GO4Align(list("abc")), values)
        # (a loss of 1e30 sends its risk weight exp(-eta L) to 0: a weight of 0, not NaN)
        assert torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0, values
    assert step_weights(GO4Align(["a"]), torch.tensor([5.0])).tolist() == [1.0]
    with pytest.raises(ValueError, match="num_groups"):
        balancers.create("go4align", tasks=["a", "b"], num_groups=0)


def test_go4align_state_round_trips_and_resumes_exactly():
    seq = [random_values(3, s).float() for s in range(40)]
    full = GO4Align(list("abc"), step_size=0.05)
    ref = [step_weights(full, v) for v in seq]
    first = GO4Align(list("abc"), step_size=0.05)
    for v in seq[:20]:
        step_weights(first, v)
    second = GO4Align(list("abc"), step_size=0.05)
    second.load_state_dict(first.state_dict())
    got = [step_weights(second, v) for v in seq[20:]]
    for a, b in zip(got, ref[20:]):
        assert torch.equal(a, b)
    fresh = GO4Align(list("abc"), step_size=0.05)
    assert not torch.equal(step_weights(fresh, seq[20]), ref[20])  # the state matters
