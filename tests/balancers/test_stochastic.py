"""MoCo, MoDo and SDMGrad: hand-worked updates, their defining limits (MGDA's min-norm weights),
the two-batch interface (second_losses=, heads get the mean of both batches), hard inputs,
state and resume, and agreement with TorchJD's MoDo and SDMGrad weightings."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtlkit import balancers
from mtlkit.balancers._solvers import min_norm_simplex
from mtlkit.balancers._stochastic import (
    MoCo,
    MoDo,
    SDMGrad,
    _gram_and_cross,
    moco_step,
    modo_step,
    project_simplex,
    sdmgrad_solve,
)

F64 = torch.float64


def jac(k: int, p: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def two_batches(b, j1: Tensor, j2: Tensor, heads1: Tensor | None = None,
                heads2: Tensor | None = None, dtype=F64):
    """One step on L1_k = 1 + <J1_k, p> + a_k h_k and L2_k = 1 + <J2_k, p> + b_k h_k (p shared,
    h the heads: one entry per task). Returns (p.grad, h.grad, step)."""
    k = j1.shape[0]
    p = nn.Parameter(torch.zeros(j1.shape[1], dtype=dtype))
    h = nn.Parameter(torch.zeros(k, dtype=dtype))
    a = torch.ones(k, dtype=dtype) if heads1 is None else heads1.to(dtype)
    c = torch.ones(k, dtype=dtype) if heads2 is None else heads2.to(dtype)
    first = [1 + j1[i].to(dtype) @ p + a[i] * h[i] for i in range(k)]
    second = [1 + j2[i].to(dtype) @ p + c[i] * h[i] for i in range(k)]
    step = b.backward(first, shared=[p], second_losses=second)
    return p.grad, h.grad, step


# ---------------------------------------------------------------------------- simplex
def _projection_by_bisection(v: Tensor) -> Tensor:
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((v - mid).clamp_min(0).sum()) > 1 else (lo, mid)
    return (v - (lo + hi) / 2).clamp_min(0)


@pytest.mark.parametrize("seed", range(5))
def test_project_simplex_matches_the_threshold_found_by_bisection(seed):
    v = torch.randn(2 + seed, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3
    torch.testing.assert_close(project_simplex(v), _projection_by_bisection(v))


# ---------------------------------------------------------------------------- MoDo
def test_modo_step_and_update_by_hand_and_heads_get_the_mean_of_both_batches():
    j1, j2 = jac(3, 5, 0), jac(3, 5, 1)
    b = MoDo(list("abc"), gamma=0.05, rho=0.1)
    a, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 7.0, 11.0])
    grad_p, grad_h, step = two_batches(b, j1, j2, a, c)
    lam = torch.full((3,), 1 / 3, dtype=F64)
    expected = _projection_by_bisection(lam - 0.05 * (j1 @ j2.T @ lam + 0.1 * lam))
    torch.testing.assert_close(step.weight_tensor, expected)
    torch.testing.assert_close(grad_p, (j1 + j2).T @ expected / 2)
    torch.testing.assert_close(grad_h, ((a + c) / 2).double())
    torch.testing.assert_close(step.gramian, j1 @ j1.T)


def test_modo_weights_tend_to_the_min_norm_weights():
    # Same gradients on both batches, no regulariser: lambda <- P(lambda - gamma G lambda) is
    # projected gradient descent on lambda' G lambda / 2 over the simplex: MGDA's problem.
    j = jac(3, 6, 4)
    lam = torch.full((3,), 1 / 3, dtype=F64)
    for _ in range(3000):
        lam = modo_step(lam, j @ j.T, 0.02, 0.0)
    torch.testing.assert_close(lam, min_norm_simplex(j @ j.T).double(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- SDMGrad
def test_sdmgrad_solves_its_direction_oriented_problem():
    # Two tasks, g_a = e1, g_b = 2 e2, lambda = 0.3: argmin over the simplex of
    # ||w_a e1 + 2 w_b e2 + 0.3 (e1 + 2 e2) / 2||^2 is w = (0.89, 0.11) by hand, and the update
    # weights (w + 0.3 / 2) / 1.3 = (0.8, 0.2).
    g = torch.diag(torch.tensor([1.0, 4.0], dtype=F64))
    w, eff = sdmgrad_solve(torch.full((2,), 0.5, dtype=F64), g, 0.3, 0.05, 0.5, 2000)
    torch.testing.assert_close(w, torch.tensor([0.89, 0.11], dtype=F64))
    torch.testing.assert_close(eff, torch.tensor([0.8, 0.2], dtype=F64))
    # lambda = 0 is stochastic MGDA: the min-norm weights.
    j = jac(4, 7, 2)
    w, eff = sdmgrad_solve(torch.full((4,), 0.25, dtype=F64), j @ j.T, 0.0, 0.05, 0.5, 4000)
    torch.testing.assert_close(eff, min_norm_simplex(j @ j.T).double(), atol=1e-6, rtol=0)


def test_sdmgrad_update_uses_both_batches():
    j1, j2 = jac(3, 5, 5), jac(3, 5, 6)
    b = SDMGrad(list("abc"))
    grad_p, grad_h, step = two_batches(b, j1, j2)
    _, eff = sdmgrad_solve(torch.full((3,), 1 / 3, dtype=F64), j1 @ j2.T, 0.3, 10.0, 0.5, 20)
    torch.testing.assert_close(step.weight_tensor, eff)
    torch.testing.assert_close(grad_p, (j1 + j2).T @ eff / 2)
    torch.testing.assert_close(grad_h, torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------- TorchJD peers
def test_modo_and_sdmgrad_agree_with_torchjd_over_several_steps():
    agg = pytest.importorskip("torchjd.aggregation")
    ours_modo, ours_sdm = MoDo(list("abcd"), gamma=0.05, rho=0.1), SDMGrad(list("abcd"))
    peer_modo, peer_sdm = agg.MoDoWeighting(gamma=0.05, rho=0.1), agg.SDMGradWeighting()
    for s in range(5):
        j1, j2 = jac(4, 9, 10 + s), jac(4, 9, 20 + s)
        _, _, step = two_batches(ours_modo, j1, j2)
        torch.testing.assert_close(step.weight_tensor, peer_modo(j1 @ j2.T), atol=1e-9, rtol=0)
        _, _, step = two_batches(ours_sdm, j1, j2)
        torch.testing.assert_close(step.weight_tensor, peer_sdm(j1 @ j2.T), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------- MoCo
def test_moco_weights_tend_to_mgda_on_tracked_gradients():
    # Constant gradients: Y tends to J, and the weight update is projected gradient descent on
    # lambda' (Y Y') lambda / 2: MGDA's min-norm weights of the tracked gradients.
    j = jac(3, 6, 7)
    y, lam = torch.zeros(3, 6, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)
    for _ in range(3000):
        y, lam = moco_step(y, lam, j, 0.5, 0.02, 0.0)
    torch.testing.assert_close(y, j)
    torch.testing.assert_close(lam, min_norm_simplex(j @ j.T).double(), atol=1e-6, rtol=0)


def test_moco_first_steps_by_hand():
    j1, j2 = jac(2, 3, 8), jac(2, 3, 9)
    b = MoCo(["a", "b"], rho=0.5, normalize=True)  # the authors' code's normalisation
    lam = torch.full((2,), 0.5, dtype=F64)
    y = torch.zeros(2, 3, dtype=F64)
    for t, (j, off) in enumerate([(j1, 2.0), (j2, 3.0)], start=1):
        p = nn.Parameter(torch.zeros(3, dtype=F64))
        step = b.backward([off + j[i] @ p for i in range(2)], shared=[p])
        g = j / j.norm(dim=1, keepdim=True) * off  # L_k g_k / ||g_k||
        y = y - 0.5 / t**0.5 * (y - g)
        lam = _projection_by_bisection(lam - 0.1 / t**0.5 * (y @ y.T + 0.5 * torch.eye(2)) @ lam)
        torch.testing.assert_close(step.weight_tensor, lam, atol=1e-6, rtol=0)
        torch.testing.assert_close(p.grad, y.T @ lam, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- hard inputs
CASES = {
    "zero": torch.zeros(3, 4, dtype=F64),
    "identical": jac(1, 4, 1).expand(3, 4).clone(),
    "opposite": torch.cat([jac(1, 4, 1), -jac(1, 4, 1), jac(1, 4, 2)]),
    "tiny": jac(3, 4, 3, 1e-10),
    "huge": jac(3, 4, 3, 1e15),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["modo", "sdmgrad", "moco"])
def test_degenerate_gradients_give_finite_simplex_weights_in_float32(name, case):
    j = CASES[case]
    b = balancers.create(name, tasks=list("abc"))
    for _ in range(2):
        if name == "moco":
            p = nn.Parameter(torch.zeros(4))
            step = b.backward([1 + j[i].float() @ p for i in range(3)], shared=[p])
            grad = p.grad
        else:
            grad, _, step = two_batches(b, j, j, dtype=torch.float32)
        w = step.weight_tensor
        assert torch.isfinite(w).all() and (w >= 0).all(), w
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.isfinite(grad).all(), grad
    if case == "identical":  # K copies of g: the update is c g with c > 0
        c = float(grad.double() @ j[0] / (j[0] @ j[0]))
        assert c > 0
        torch.testing.assert_close(grad.double(), c * j[0], rtol=1e-4, atol=1e-7)
        if name != "moco":  # (MoCo's tracked gradient starts at 0 and catches up)
            assert c == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("name", ["modo", "sdmgrad", "moco"])
def test_single_task_gets_its_own_gradient(name):
    b = balancers.create(name, tasks=["a"])
    j = jac(1, 4, 0)
    if name == "moco":  # the tracked gradient after one step: beta_1 g
        p = nn.Parameter(torch.zeros(4, dtype=F64))
        step = b.backward([1 + j[0] @ p], shared=[p])
        torch.testing.assert_close(p.grad, 0.5 * j[0])
    else:
        grad, _, step = two_batches(b, j, j)
        torch.testing.assert_close(grad, j[0])
    assert step.weight_tensor.tolist() == [1.0]


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_each_batch_is_differentiated_through_its_own_graph_once_per_task(name, chunk_size):
    # Two forwards through a tanh trunk, K = 3: each batch's trunk is reached by K ordinary
    # passes (the loop) or one per chunk, never by the other batch's passes (the earlier single
    # call over 2K losses ran every pass through both graphs). The same loss tensors passed as
    # both batches share their graph, which the first pass must keep: the same step results.
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 5), nn.Linear(5, 3)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 4, generator=gen, dtype=torch.float32) for _ in range(2)]
    calls = [0, 0]

    def losses(b: int, hook: bool = True) -> list[Tensor]:
        z = torch.tanh(trunk(xs[b]))
        if hook:
            z.register_hook(lambda g: calls.__setitem__(b, calls[b] + 1))
        out = heads(z)
        return [(out[:, i] - i).pow(2).mean() for i in range(3)]

    shared = list(trunk.parameters())
    opts = {} if chunk_size is None else {"chunk_size": chunk_size}
    b = balancers.create(name, tasks=list("abc"), **opts)
    step = b.backward(losses(0), shared=shared, second_losses=losses(1))
    assert calls == ([3, 3] if chunk_size is None else [2, 2])  # chunks of 2 + 1 tasks
    j1 = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(v, shared, retain_graph=True)])
                      for v in losses(0, hook=False)]).double()
    j2 = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(v, shared, retain_graph=True)])
                      for v in losses(1, hook=False)]).double()
    lam = torch.full((3,), 1 / 3, dtype=F64)
    expected = modo_step(lam, j1 @ j2.T, 1e-3, 0.1) if name == "modo" else \
        sdmgrad_solve(lam, j1 @ j2.T, 0.3, 10.0, 0.5, 20)[1]
    torch.testing.assert_close(step.weight_tensor.double(), expected, rtol=1e-5, atol=1e-7)
    update = torch.cat([p.grad.flatten() for p in shared]).double()
    torch.testing.assert_close(update, (j1 + j2).T @ expected / 2, rtol=1e-5, atol=1e-6)
    # the same tensors twice: one graph, kept for the second batch's passes
    for p in [*shared, *heads.parameters()]:
        p.grad = None
    same = losses(0, hook=False)
    b2 = balancers.create(name, tasks=list("abc"), **opts)
    step = b2.backward(same, shared=shared, second_losses=same)
    lam_same = modo_step(lam, j1 @ j1.T, 1e-3, 0.1) if name == "modo" else \
        sdmgrad_solve(lam, j1 @ j1.T, 0.3, 10.0, 0.5, 20)[1]
    torch.testing.assert_close(step.weight_tensor.double(), lam_same, rtol=1e-5, atol=1e-7)
    update = torch.cat([p.grad.flatten() for p in shared]).double()
    torch.testing.assert_close(update, j1.T @ lam_same, rtol=1e-5, atol=1e-6)


def test_gram_and_cross_are_finite_and_exact_for_huge_and_tiny_float32_blocks():
    # Two parameter blocks of two tasks each; a float32 product of gradients of 1e25 would
    # overflow (1e50), of 1e-25 underflow: the unit-scaled products give the float64 values.
    j1 = [jac(2, 3, 0), jac(2, 5, 1)]
    j2 = [jac(2, 3, 2), jac(2, 5, 3)]
    f1, f2 = torch.cat(j1, 1), torch.cat(j2, 1)
    for scale in (1e25, 1e-25, 1.0):
        gram, cross = _gram_and_cross([b.float() * scale for b in j1],
                                      [b.float() * scale for b in j2])
        torch.testing.assert_close(gram, f1 @ f1.T * scale**2, rtol=1e-5, atol=0)
        torch.testing.assert_close(cross, f1 @ f2.T * scale**2, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", ["modo", "sdmgrad", "moco"])
def test_resume_after_20_steps_equals_40_steps(name):
    # (SDMGrad's default inner solver nearly forgets its start in 20 large steps: a smaller
    # one shows that the saved weights matter)
    hp = {"modo": {"gamma": 0.05}, "sdmgrad": {"lr": 0.01, "n_iter": 2}, "moco": {}}[name]

    def step(b, s):
        j1, j2 = jac(3, 5, 100 + s), jac(3, 5, 200 + s)
        if name == "moco":
            p = nn.Parameter(torch.zeros(5, dtype=F64))
            st = b.backward([1 + j1[i] @ p for i in range(3)], shared=[p])
            return st.weight_tensor, p.grad
        g, _, st = two_batches(b, j1, j2)
        return st.weight_tensor, g

    full = balancers.create(name, tasks=list("abc"), **hp)
    ref = [step(full, s) for s in range(40)]
    first = balancers.create(name, tasks=list("abc"), **hp)
    for s in range(20):
        step(first, s)
    second = balancers.create(name, tasks=list("abc"), **hp)
    second.load_state_dict(first.state_dict())
    for s in range(20, 40):
        w, g = step(second, s)
        assert torch.equal(w, ref[s][0]) and torch.equal(g, ref[s][1]), s
    fresh = balancers.create(name, tasks=list("abc"), **hp)
    assert not torch.equal(step(fresh, 20)[0], ref[20][0])  # the state matters


def test_two_batch_interface_errors_name_the_missing_input():
    p = nn.Parameter(torch.zeros(2))
    losses = [p.sum(), 2 * p.sum()]
    for name in ("modo", "sdmgrad"):
        b = balancers.create(name, tasks=["a", "b"])
        assert b.needs_second_batch
        with pytest.raises(ValueError, match="second_losses"):
            b.backward(losses, shared=[p])
        with pytest.raises(KeyError, match="missing loss"):
            b.backward(losses, shared=[p], second_losses={"a": p.sum()})
        assert int(b.step) == 0 and b.weights.tolist() == [0.5, 0.5]  # nothing changed
        with pytest.raises(ValueError, match="grad_on='parameters'"):
            balancers.create(name, tasks=["a", "b"], grad_on="features")
    with pytest.raises(TypeError, match="second_losses"):
        balancers.create("mgda", tasks=["a", "b"]).backward(losses, shared=[p],
                                                             second_losses=losses)
