"""GradNorm: the weight update worked by hand, positivity, the choice of the last shared layer."""

from __future__ import annotations

import math

import pytest
import torch

from mtlkit.balancers._gradnorm import GradNorm


def losses_on(p: torch.nn.Parameter, directions: list[torch.Tensor], values: list[float]):
    """L_k = value_k + <D_k, p> at p = 0: gradient D_k, loss value_k."""
    return [v + (d * p).sum() for d, v in zip(directions, values)]


def adam_first_step(grad: torch.Tensor, lr: float) -> torch.Tensor:
    m_hat = (0.1 * grad) / (1 - 0.9)
    v_hat = (0.001 * grad * grad) / (1 - 0.999)
    return lr * m_hat / (v_hat.sqrt() + 1e-8)


def test_weights_move_gradient_norms_towards_the_target():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    da, db = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    b = GradNorm(["a", "b"], alpha=1.5, lr=0.05)
    step = b.backward(losses_on(p, [da, db], [1.0, 1.0]), shared=[p])
    # first step: r = 1, so the target is the mean weighted norm: (1 + 3) / 2 = 2
    assert step.weights == {"a": 1.0, "b": 1.0}  # the model update uses w(t)
    torch.testing.assert_close(p.grad, da + db)
    norms = torch.tensor([1.0, 3.0])
    grad = torch.sign(norms - 2.0) * norms  # d L_grad / d w = sign(w n - target) n = (-1, 3)
    expected = torch.ones(2) - adam_first_step(grad, 0.05)  # (1.05, 0.95), already sums to 2
    torch.testing.assert_close(b.task_weights, expected)
    # every weighted norm moved towards its target
    before, after = norms * 1.0, norms * b.task_weights
    assert ((after - 2.0).abs() < (before - 2.0).abs()).all()


def test_a_task_that_trains_slower_gains_weight():
    p = torch.nn.Parameter(torch.zeros(2))
    d = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]  # equal gradient norms
    b = GradNorm(["a", "b"], alpha=1.5, lr=0.01)
    b.backward(losses_on(p, d, [2.0, 4.0]), shared=[p])  # L(0) = (2, 4); equal norms: no change
    torch.testing.assert_close(b.task_weights, torch.ones(2))
    p.grad = None
    b.backward(losses_on(p, d, [2.0, 1.0]), shared=[p])  # ratios (1, 0.25): b trains faster
    r = torch.tensor([1.0, 0.25]) / 0.625
    target = 1.0 * r**1.5  # mean weighted norm is 1
    grad = torch.sign(1.0 - target) * 1.0  # (-1, +1)
    # Adam's second step with a zero first gradient: m = 0.1 g, v = 0.001 g^2, t = 2
    step = 0.01 * (0.1 * grad / (1 - 0.9**2)) / ((0.001 * grad**2 / (1 - 0.999**2)).sqrt() + 1e-8)
    torch.testing.assert_close(b.task_weights, 1.0 - step)
    assert b.task_weights[0] > 1 > b.task_weights[1]


def test_weights_stay_positive_and_sum_to_k():
    p = torch.nn.Parameter(torch.zeros(3))
    d = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 100.0, 0.0]),
         torch.tensor([0.0, 0.0, 0.01])]
    b = GradNorm(["a", "b", "c"], lr=5.0)  # a huge step would push weights below 0
    for _ in range(5):
        p.grad = None
        b.backward(losses_on(p, d, [1.0, 1.0, 1.0]), shared=[p])
        assert (b.task_weights > 0).all()
        assert b.task_weights.sum().item() == pytest.approx(3.0)


def test_last_shared_layer_selection():
    lin1, norm, lin2 = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
    shared = [*lin1.parameters(), *lin2.parameters(), *norm.parameters()]
    default = GradNorm(["a"]).select_layer(shared)
    assert [id(t) for t in default] == [id(t) for t in [lin2.weight, lin2.bias, *norm.parameters()]]
    assert GradNorm(["a"], last_shared=1).select_layer(shared) == [norm.bias]
    with pytest.raises(ValueError, match="last_shared=9 but shared has only 6"):
        GradNorm(["a"], last_shared=9).select_layer(shared)
    with pytest.raises(ValueError, match="last_shared must be a positive integer"):
        GradNorm(["a"], last_shared=0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        GradNorm(["a"], alpha=-1.0)


def test_norms_are_taken_on_the_last_layer_only():
    torch.manual_seed(0)
    first, last = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    x = torch.randn(5, 3)
    z = last(torch.tanh(first(x)))
    losses = [z[:, 0].pow(2).mean(), 10 * z[:, 1].pow(2).mean()]
    n = [math.sqrt(sum(float(g.pow(2).sum()) for g in torch.autograd.grad(
        loss, list(last.parameters()), retain_graph=True))) for loss in losses]
    b = GradNorm(["a", "b"], lr=0.1)
    b.backward(losses, shared=[*first.parameters(), *last.parameters()])
    grad = torch.sign(torch.tensor(n) - sum(n) / 2) * torch.tensor(n)
    expected = 1 - adam_first_step(grad, 0.1)
    torch.testing.assert_close(b.task_weights, expected * 2 / expected.sum())


def test_weighted_norms_settle_on_the_target():
    """alpha = 1, gradient norms (1, 2), loss ratios L(t)/L(0) = (3, 0.75): r = (1.6, 0.4), so
    the targets G_bar r_k satisfy w_a * 1 = 4 * w_b * 2; with w_a + w_b = 2 the fixed point is
    w = (16/9, 2/9), where every weighted norm equals its target."""
    p = torch.nn.Parameter(torch.zeros(2))
    d = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    b = GradNorm(["a", "b"], alpha=1.0, lr=0.01)
    seen = []
    for t in range(300):
        p.grad = None
        b.backward(losses_on(p, d, [1.0, 1.0] if t == 0 else [3.0, 0.75]), shared=[p])
        seen.append(b.task_weights.clone())
    w = torch.stack(seen[-50:]).mean(0)
    torch.testing.assert_close(w, torch.tensor([16 / 9, 2 / 9]), rtol=0, atol=5e-3)
    norms = w * torch.tensor([1.0, 2.0])
    target = norms.mean() * torch.tensor([1.6, 0.4])
    torch.testing.assert_close(norms, target, rtol=0, atol=2e-2)
